"""Fused DDIM inversion step (SPEC §3), one pass over ``x`` and ``eps``:

``x_next = sqrt(a_to) * (x - sqrt(1 - a_from) * eps) / sqrt(a_from) + sqrt(1 - a_to) * eps`` in float32, with

- per-sample ᾱ given as vectors (the registered ``"ddim_inversion_step"`` op), or gathered in-kernel from the ᾱ
  table by per-sample integer level (a negative level reads ``ᾱ_init``, as :func:`fastinpo.ops.schedule.gather_alphas`);
- optional classifier-free guidance: ``eps`` is ``(2n, ...)`` = ``[uncond; cond]`` and ``eps = u + g (c - u)``
  is formed in registers (the ``(n, ...)`` guided ε is never written);
- optional InPO noise ``x_next += noise_scale[s] * N(0, 1)`` drawn in-kernel with Philox (``tl.randn``): the
  draw of element ``j`` of sample ``s`` depends only on ``(seed, s, j)``, so a seed reproduces it exactly;
- optional per-sample ``active`` mask (inactive samples are copied through unchanged and their ``eps`` is not
  read) and an in-place mode (``out=x``; inactive samples are then not touched at all).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastinpo.kernels.dpo_loss import SUPPORTED_DTYPES, as_rows

_MAX_GRID_YZ = 65535


# seed: not specialised by value (i32/i64, %16, ==1 would each compile a variant on first use: GPU review item 10)
@triton.jit(do_not_specialize=["seed"])
def _ddim_step_kernel(
    x_ptr,
    eps_ptr,
    out_ptr,
    afrom_ptr,
    ato_ptr,
    tfrom_ptr,
    tto_ptr,
    active_ptr,
    nscale_ptr,
    alpha_init,
    g,
    seed,
    n_levels,
    n,
    n_rows,
    x_stride,
    eps_stride,
    out_stride,
    BLOCK: tl.constexpr,
    GATHER: tl.constexpr,
    CFG: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    # blocks of a sample on axis 0 (no 65535 limit), samples on axis 1; int64 rows: row * stride > 2**31
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if GATHER:
        i_from = tl.load(tfrom_ptr + row)
        i_to = tl.load(tto_ptr + row)
        # clamped into the table as csrc/ddim_step.h does: a level >= T, or a sentinel on an inactive sample,
        # never reads out of bounds (a sticky CUDA error); an inactive sample's result is discarded below
        j_from = tl.minimum(tl.maximum(i_from, 0), n_levels - 1)
        j_to = tl.minimum(tl.maximum(i_to, 0), n_levels - 1)
        a_from = tl.where(i_from < 0, alpha_init, tl.load(afrom_ptr + j_from).to(tl.float32))
        a_to = tl.where(i_to < 0, alpha_init, tl.load(afrom_ptr + j_to).to(tl.float32))
    else:
        a_from = tl.load(afrom_ptr + row).to(tl.float32)
        a_to = tl.load(ato_ptr + row).to(tl.float32)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_ACTIVE:
        # broadcast the per-sample flag to a block before combining masks (a scalar i1 & block mask is not
        # accepted by the interpreter's masked load)
        act = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(active_ptr + row).to(tl.int32)) != 0
        emask = mask & act  # an inactive sample's eps is never read
    else:
        emask = mask
    if IN_PLACE:
        xmask = emask  # in place, an inactive sample is neither read nor written
    else:
        xmask = mask
    x = tl.load(x_ptr + row * x_stride + offs, mask=xmask, other=0.0)
    xf = x.to(tl.float32)
    e = tl.load(eps_ptr + row * eps_stride + offs, mask=emask, other=0.0).to(tl.float32)
    if CFG:
        c = tl.load(eps_ptr + (row + n_rows) * eps_stride + offs, mask=emask, other=0.0).to(tl.float32)
        e = e + g * (c - e)  # reference.cfg_combine: u + g * (c - u)
    # same order of operations as reference.ddim_inversion_step (diffusers' DDIMInverseScheduler.step), with
    # IEEE sqrt/div (sqrt_rn/div_rn) as torch computes them: tl.sqrt and '/' are approximate on CUDA
    x0 = tl.div_rn(xf - tl.sqrt_rn(1.0 - a_from) * e, tl.sqrt_rn(a_from))
    res = tl.sqrt_rn(a_to) * x0 + tl.sqrt_rn(1.0 - a_to) * e
    if HAS_NOISE:
        # Philox key = (seed, sample): the high 32 bits of the 64-bit seed carry the sample index, so samples
        # get independent streams and consecutive seeds do not shift one sample's noise onto another's
        key = (row << 32) + seed  # seed = (noise_sample_base << 32) + the user seed in [0, 2**32): host-checked
        z = tl.randn(key, offs)
        res = res + tl.load(nscale_ptr + row).to(tl.float32) * z
    if HAS_ACTIVE:
        res = tl.where(act, res, xf)
    tl.store(out_ptr + row * out_stride + offs, res.to(out_ptr.dtype.element_ty), mask=xmask)


def _launch(x, eps, out, afrom, ato, tfrom, tto, alpha_init, cfg_scale, active, noise_seed, noise_scale, block):
    """``x``/``eps``/``out`` are row views; ``out`` may be ``x`` itself (in place)."""
    n_rows, n = x.shape
    if n_rows > _MAX_GRID_YZ:
        raise ValueError(f"{n_rows} samples exceed the kernel grid limit of {_MAX_GRID_YZ}")
    if n >= 2**31:
        raise ValueError(f"a sample of {n} elements is too large for the kernels (limit 2**31 - 1)")
    if n == 0:
        return
    BLOCK = block or 1024
    gather = tfrom is not None
    # launch on the tensors' device, not the current one (GPU review item 7: cuda:1 without set_device)
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launch_kernel(x, eps, out, afrom, ato, tfrom, tto, alpha_init, cfg_scale, active, noise_seed, noise_scale,
                       BLOCK, gather, n, n_rows)


def _launch_kernel(x, eps, out, afrom, ato, tfrom, tto, alpha_init, cfg_scale, active, noise_seed, noise_scale,
                   BLOCK, gather, n, n_rows):
    _ddim_step_kernel[(triton.cdiv(n, BLOCK), n_rows)](
        x,
        eps,
        out,
        afrom,
        ato if ato is not None else afrom,
        tfrom if gather else afrom,
        tto if gather else afrom,
        active if active is not None else afrom,
        noise_scale if noise_scale is not None else afrom,
        float(alpha_init),
        float(cfg_scale) if cfg_scale is not None else 0.0,
        int(noise_seed) if noise_seed is not None else 0,
        afrom.shape[0] if gather else 1,  # the ᾱ table's length (gather mode: afrom is the table)
        n,
        n_rows,
        x.stride(0),
        eps.stride(0),
        out.stride(0),
        BLOCK=BLOCK,
        GATHER=gather,
        CFG=cfg_scale is not None,
        HAS_ACTIVE=active is not None,
        HAS_NOISE=noise_scale is not None,
        IN_PLACE=out.data_ptr() == x.data_ptr(),
    )


def _check_dtype(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the triton kernels take float32/float16/bfloat16, got {t.dtype}")


def _vec(name, v, n, device, dtype):
    v = torch.as_tensor(v, device=device)
    if v.shape != (n,):
        raise ValueError(f"{name} must be ({n},), got {tuple(v.shape)}")
    return v.detach().to(dtype).contiguous()


# ------------------------------------------------------------------------------------- registered implementation
@torch.library.custom_op("fastinpo_triton::ddim_inversion_step", mutates_args=())
def ddim_inversion_step(
    x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> torch.Tensor:
    """Same signature and result as ``reference.ddim_inversion_step`` (per-sample ᾱ vectors, ``x``'s dtype)."""
    _check_dtype("x", x)
    _check_dtype("eps", eps)
    n = x.shape[0]
    xr, er = as_rows(x, n), as_rows(eps, n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    afrom = _vec("alpha_from", alpha_from, n, x.device, torch.float32)
    ato = _vec("alpha_to", alpha_to, n, x.device, torch.float32)
    _launch(xr, er, out.view(n, -1), afrom, ato, None, None, 1.0, None, None, None, None, None)
    return out


@ddim_inversion_step.register_fake
def _ddim_fake(x, eps, alpha_from, alpha_to):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------------------- the full fused step
@torch.no_grad()
def ddim_inversion_step_fused(
    x: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    alpha_init: float,
    *,
    cfg_scale: float | None = None,
    active: torch.Tensor | None = None,
    noise_seed: int | None = None,
    noise_scale: torch.Tensor | None = None,
    noise_sample_base: int = 0,
    out: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """One DDIM inversion step with everything around it fused (see the module docstring).

    Args:
        x: ``(n, ...)`` state (float32 per SPEC §3; fp16/bf16 accepted), any strides.
        eps: ``(n, ...)``, or ``(2n, ...)`` = ``[uncond; cond]`` when ``cfg_scale`` is given.
        alphas_cumprod: ``(T,)`` ᾱ table on ``x``'s device.
        t_from, t_to: ``(n,)`` integer source/target levels; a negative level reads ``alpha_init``.
        alpha_init: ``ᾱ_init`` (SD configs: ``ᾱ_0``).
        cfg_scale: guidance scale g; ``eps = u + g (c - u)``.
        active: ``(n,)`` bool; inactive samples are returned unchanged.
        noise_seed: Philox seed in ``[0, 2**32)``, required with ``noise_scale``. The noise of a sample depends
            only on ``(noise_seed, noise_sample_base + its row, element)``: a call that repeats the seed and the
            sample numbers repeats the noise, so use a new seed at every step (e.g. drawn from the run's
            generator) and give every sample of the run its own number (GPU review item 9).
        noise_scale: ``(n,)`` per-sample scale of the added N(0, 1) noise (InPO: ``eta * sigma``).
        noise_sample_base: the run-wide number of ``x``'s first sample, in ``[0, 2**31 - n]``: e.g.
            ``rank * samples_per_rank`` under data parallelism, or a sample's position when ``x`` is a slice of a
            larger batch — the same sample then gets the same noise however the batch is split.
        out: output tensor (``x`` itself for in place), shaped and typed like ``x``.
        block: tile width override (tests).

    Returns:
        ``out`` (a new tensor in ``x``'s dtype when ``out`` is None).
    """
    _check_dtype("x", x)
    _check_dtype("eps", eps)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be (n, ...) with n >= 1, got {tuple(x.shape)}")
    n = x.shape[0]
    want = (2 * n, *x.shape[1:]) if cfg_scale is not None else tuple(x.shape)
    if tuple(eps.shape) != want:
        raise ValueError(f"eps must be {want} ({'[uncond; cond]' if cfg_scale is not None else 'like x'}), "
                         f"got {tuple(eps.shape)}")
    dev = x.device
    if eps.device != dev or alphas_cumprod.device != dev:
        raise ValueError("x, eps and alphas_cumprod must be on one device")
    if t_from.is_floating_point() or t_to.is_floating_point():
        raise TypeError("t_from and t_to must be integer tensors")
    table = alphas_cumprod.detach().to(torch.float32).contiguous()
    tfrom = _vec("t_from", t_from, n, dev, torch.int64)
    tto = _vec("t_to", t_to, n, dev, torch.int64)
    act = _vec("active", active, n, dev, torch.int8) if active is not None else None
    if noise_scale is not None:
        if noise_seed is None or not (0 <= int(noise_seed) < 2**32):
            raise ValueError(f"noise needs an integer noise_seed in [0, 2**32), got {noise_seed!r}")
        ns = _vec("noise_scale", noise_scale, n, dev, torch.float32)
        if not (0 <= int(noise_sample_base) <= 2**31 - n):
            raise ValueError(f"noise_sample_base must be in [0, 2**31 - {n}], got {noise_sample_base!r}")
        # the kernel's Philox key is (row << 32) + seed: sample numbers offset by the base are the same key with
        # (base << 32) folded into the 64-bit seed argument (no kernel change, one more i64 variant)
        noise_seed = (int(noise_sample_base) << 32) + int(noise_seed)
    else:
        ns = None
    # levels >= T are not checked here (it would cost a device sync per step; gather_alphas is the checked path):
    # the kernel clamps them into the table, as the C++/CUDA extension does
    xr = as_rows(x, n)
    er = as_rows(eps, eps.shape[0])
    result = out
    if out is None:
        result = torch.empty(x.shape, dtype=x.dtype, device=dev)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != dev:
        raise ValueError(f"out must be shaped and typed like x ({tuple(x.shape)}, {x.dtype}), "
                         f"got {tuple(out.shape)}, {out.dtype}")
    if out is not None and out.data_ptr() == x.data_ptr():
        # in place: write through x's row view; if x needed a copy, the copy is updated and copied back below
        outr = xr
    else:
        outr = as_rows(result, n)
        if not _is_view_of(outr, result):
            outr = torch.empty((n, xr.shape[1]), dtype=x.dtype, device=dev)
    _launch(xr, er, outr, table, None, tfrom, tto, alpha_init, cfg_scale, act, noise_seed, ns, block)
    if not _is_view_of(outr, result):
        result.copy_(outr.view(x.shape))
    return result


def _is_view_of(v: torch.Tensor, x: torch.Tensor) -> bool:
    """True when the row view ``v`` writes into ``x``'s memory (same storage and start)."""
    return v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and v.data_ptr() == x.data_ptr() and (
        v.numel() == x.numel()
    )
