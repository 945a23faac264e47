"""Fused Diffusion-DPO loss (SPEC §2) and the shared reduction machinery of the DPO-family losses.

Design (one forward pass over the big tensors, at most one backward pass, deterministic):

1. ``_sumsq_partials_kernel``: grid ``(rows, chunks)``. Each program reads one chunk of one sample of the
   policy prediction, the reference prediction and the target (or ``x̃``/``z0`` for the in-kernel InPO target),
   and writes the float32 sums of squared differences of its chunk into a partials buffer. A large sample
   (SDXL: 4×128×128) is thus spread over many programs, and there are no atomics: every partial has its own slot.
   Inversion-DPO (``N·2B`` rows): ``_weighted_distance_kernel`` then reduces each sample's N steps to its
   distance ``D`` (one program per sample, [steps × chunks] tiles), in parallel over samples.
2. ``_dpo_epilogue_kernel``: one program reads the (small) partials buffer in a fixed order, and writes the
   per-sample errors, the logits, the loss and the implicit accuracy. Same input → bit-identical output.
   ``LOSS_TYPE`` (constexpr) picks the per-pair loss of SPEC §2: 0 sigmoid ``softplus(-z)``, 1 hinge
   ``relu(1 - z)``, 2 IPO ``((z - 1/2) / tau)^2`` with ``tau = beta/2``.
3. ``_dpo_grad_kernel``: the only backward pass, ``coef_i * 2 * (model_pred - target) / n`` in ``model_pred``'s
   dtype, where ``coef_i`` (∂loss/∂m_i, including any gradient flowing into ``logits`` or ``model_mse``) is
   computed per program from a handful of scalars (with the derivative of the same ``LOSS_TYPE``). Saved for
   backward: ``model_pred``, the target inputs, and the ``(B,)`` logits; ``ref_pred`` is never saved.

Everything goes through two ``torch.library`` custom ops (``fastinpo_triton::dpo_fwd`` / ``dpo_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` traces a caller of the public loss. The same ops serve the
Inversion-DPO loss (:mod:`fastinpo.kernels.inversion_dpo`): its ``(N, 2B, ...)`` inputs are ``N·2B`` rows, the
per-step weights are applied in the epilogue, and there is no reference term.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastinpo.ops.outputs import DPOLossOutput
from fastinpo.ops.reference import LOSS_TYPES

#: input dtypes the kernels take (float64 stays on the reference: the kernels accumulate in float32)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``LOSS_TYPE`` constexpr of the kernels for each ``loss_type`` name
LOSS_TYPE_CODES = {name: code for code, name in enumerate(LOSS_TYPES)}


def on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU, not on the current one (a tensor on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def loss_type_code(loss_type: str) -> int:
    """The kernels' ``LOSS_TYPE`` for ``loss_type``; a clear error for an unknown name."""
    if loss_type not in LOSS_TYPE_CODES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of: {', '.join(LOSS_TYPES)}")
    return LOSS_TYPE_CODES[loss_type]

# Grid axes 1 and 2 are limited to 65535 on CUDA: chunks go on axis 1, so a chunk grows before it overflows.
_MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _sumsq_partials_kernel(
    a_ptr,
    b_ptr,
    t_ptr,
    z_ptr,
    alpha_ptr,
    part_ptr,
    n,
    num_chunks,
    a_stride,
    b_stride,
    t_stride,
    z_stride,
    slot_size,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    HAS_B: tl.constexpr,
    INPO: tl.constexpr,
):
    # int64 row index: row * stride exceeds 2**31 for an SDXL batch of 64 pairs times N steps.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = chunk.to(tl.int64) * (BLOCK * TILES)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    if INPO:
        # eps* = (x - sqrt(a) z0) / sqrt(1 - a), same order of operations as reference.inpo_target
        alpha = tl.load(alpha_ptr + row).to(tl.float32)
        # IEEE sqrt/div (sqrt_rn/div_rn), as torch computes them: tl.sqrt and '/' are approximate on CUDA
        sa = tl.sqrt_rn(alpha)
        s1a = tl.sqrt_rn(1.0 - alpha)
    for i in range(TILES):
        idx = start + i * BLOCK + offs
        mask = idx < n
        # masked lanes load 0 everywhere, so they add (0 - 0)^2 = 0 (also through the InPO formula)
        t = tl.load(t_ptr + row * t_stride + idx, mask=mask, other=0.0).to(tl.float32)
        if INPO:
            z = tl.load(z_ptr + row * z_stride + idx, mask=mask, other=0.0).to(tl.float32)
            t = tl.div_rn(t - sa * z, s1a)
        a = tl.load(a_ptr + row * a_stride + idx, mask=mask, other=0.0).to(tl.float32)
        d = a - t
        acc_a += d * d
        if HAS_B:
            b = tl.load(b_ptr + row * b_stride + idx, mask=mask, other=0.0).to(tl.float32)
            e = b - t
            acc_b += e * e
    # one private slot per (row, chunk): no atomics, so the final order of additions is fixed
    out = part_ptr + row * num_chunks + chunk
    tl.store(out, tl.sum(acc_a, axis=0))
    if HAS_B:
        tl.store(out + slot_size, tl.sum(acc_b, axis=0))


@triton.jit
def _row_sums(base_ptr, rows, rmask, num_chunks, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the partials of each row in ``rows`` (a [BLOCK_B] int64 vector), in a fixed order."""
    oc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, num_chunks, BLOCK_C):
        cc = c0 + oc
        m = rmask[:, None] & (cc[None, :] < num_chunks)
        acc += tl.load(base_ptr + rows[:, None] * num_chunks + cc[None, :], mask=m, other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)); log1p via Goldberg's trick because tl has no portable log1p and a plain
    # log(1 + e) loses everything once e < 2**-24 (logits of magnitude > ~17, common at beta = 5000).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    den = tl.where(u == 1.0, 1.0, u - 1.0)  # no 0/0 in the branch that tl.where discards
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / den))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _sigmoid(x):
    # exp of -|x| only: no overflow at the |logits| ~ 1e4 that beta = 5000 produces
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pair_loss(z, tau, LOSS_TYPE: tl.constexpr):
    """The per-pair loss of the logits ``z`` (SPEC §2; ``reference.preference_loss``)."""
    if LOSS_TYPE == 0:
        out = _softplus(-z)
    elif LOSS_TYPE == 1:
        out = tl.maximum(1.0 - z, 0.0)
    else:
        q = tl.div_rn(z - 0.5, tau)
        out = q * q
    return out


@triton.jit
def _pair_loss_grad(z, tau, LOSS_TYPE: tl.constexpr):
    """d(per-pair loss)/dz; at the hinge's kink (z = 1) 0, as torch's relu."""
    if LOSS_TYPE == 0:
        out = -_sigmoid(-z)
    elif LOSS_TYPE == 1:
        out = tl.where(z < 1.0, -1.0, 0.0)
    else:
        out = 2.0 * tl.div_rn(tl.div_rn(z - 0.5, tau), tau)
    return out


@triton.jit
def _weighted_distance_kernel(
    part_ptr, w_ptr, d_ptr, R2, n, num_chunks, num_steps, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr
):
    # Inversion-DPO: D[s] = (1/N) Σ_i w_i (Σ_c partials[i, s, c]) / n, one program per sample s, reducing
    # [steps × chunks] tiles (all N steps of a sample in a few rounds of loads, not N dependent ones), fixed order.
    s = tl.program_id(0).to(tl.int64)
    on = tl.arange(0, BLOCK_N)
    oc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for i0 in range(0, num_steps, BLOCK_N):
        ii = i0 + on
        im = ii < num_steps
        w = tl.load(w_ptr + ii, mask=im, other=0.0).to(tl.float32)
        rows = ii.to(tl.int64) * R2 + s
        for c0 in range(0, num_chunks, BLOCK_C):
            cc = c0 + oc
            mask = im[:, None] & (cc[None, :] < num_chunks)
            p = tl.load(part_ptr + rows[:, None] * num_chunks + cc[None, :], mask=mask, other=0.0)
            acc += w[:, None] * p
    tl.store(d_ptr + s, tl.sum(tl.sum(acc, axis=1), axis=0) / n / num_steps)


@triton.jit
def _dpo_epilogue_kernel(
    part_ptr,
    m_ptr,
    r_ptr,
    logits_ptr,
    loss_ptr,
    acc_ptr,
    B,
    n,
    num_chunks,
    slot,
    k,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_REF: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
):
    # A single program: the partials buffer is tiny (2 × 2B × chunks floats), and one program is what makes
    # the loss a fixed-order (deterministic) reduction without a second launch.
    ob = tl.arange(0, BLOCK_B)
    tau = tl.abs(k)  # beta / 2 (IPO)
    zero_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    loss_sum = tl.sum(zero_vec, axis=0)
    n_pos = tl.sum(zero_vec, axis=0)
    n_zero = tl.sum(zero_vec, axis=0)
    for b0 in range(0, B, BLOCK_B):
        bb = (b0 + ob).to(tl.int64)
        bm = bb < B
        mw = _row_sums(part_ptr, bb, bm, num_chunks, BLOCK_B, BLOCK_C) / n
        ml = _row_sums(part_ptr, bb + B, bm, num_chunks, BLOCK_B, BLOCK_C) / n
        if HAS_REF:
            base = part_ptr + slot
            rw = _row_sums(base, bb, bm, num_chunks, BLOCK_B, BLOCK_C) / n
            rl = _row_sums(base, bb + B, bm, num_chunks, BLOCK_B, BLOCK_C) / n
        else:
            rw = tl.zeros([BLOCK_B], dtype=tl.float32)
            rl = tl.zeros([BLOCK_B], dtype=tl.float32)
        logits = k * ((mw - ml) - (rw - rl))
        tl.store(m_ptr + bb, mw, mask=bm)
        tl.store(m_ptr + B + bb, ml, mask=bm)
        tl.store(r_ptr + bb, rw, mask=bm)
        tl.store(r_ptr + B + bb, rl, mask=bm)
        tl.store(logits_ptr + bb, logits, mask=bm)
        loss_sum += tl.sum(tl.where(bm, _pair_loss(logits, tau, LOSS_TYPE), 0.0), axis=0)
        n_pos += tl.sum(tl.where(bm & (logits > 0), 1.0, 0.0), axis=0)
        n_zero += tl.sum(tl.where(bm & (logits == 0), 1.0, 0.0), axis=0)
    tl.store(loss_ptr, loss_sum / B)
    tl.store(acc_ptr, n_pos / B + 0.5 * (n_zero / B))


@triton.jit
def _dpo_grad_kernel(
    a_ptr,
    t_ptr,
    z_ptr,
    alpha_ptr,
    w_ptr,
    gloss_ptr,
    glogits_ptr,
    gm_ptr,
    logits_ptr,
    grad_ptr,
    B,
    n,
    num_steps,
    k,
    a_stride,
    t_stride,
    z_stride,
    BLOCK: tl.constexpr,
    INPO: tl.constexpr,
    HAS_W: tl.constexpr,
    COEF_GIVEN: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    HAS_GLOSS: tl.constexpr,
    HAS_GLOGITS: tl.constexpr,
    HAS_GM: tl.constexpr,
):
    # blocks on axis 0 (no 65535 limit), rows on axis 1
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    s = row % (2 * B)  # sample within the (2B,) batch
    if COEF_GIVEN:
        # the caller gives d loss / d m_s directly (memory-light two-pass Inversion-DPO gradient)
        coef = tl.load(gm_ptr + s).to(tl.float32)
    else:
        # Outputs that did not reach the loss send no gradient (HAS_* False, nothing loaded or allocated for them).
        b = s % B
        tau = tl.abs(k)  # beta / 2 (IPO)
        g_logit = tl.zeros([1], dtype=tl.float32)
        if HAS_GLOSS:
            # d loss / d logit_b = (per-pair loss)'(logit_b) / B
            logit = tl.load(logits_ptr + b)
            g_logit += tl.load(gloss_ptr) * (_pair_loss_grad(logit, tau, LOSS_TYPE) / B)
        if HAS_GLOGITS:  # any gradient flowing into the logits output
            g_logit += tl.load(glogits_ptr + b)
        # logits = k ((m_w - m_l) - ...): d logit / d m is +k for winners, -k for losers
        sgn = 1.0 - 2.0 * (s >= B).to(tl.float32)
        coef = tl.sum(sgn * k * g_logit, axis=0)
        if HAS_GM:  # any gradient flowing into the model_mse output
            coef += tl.load(gm_ptr + s)
    if HAS_W:
        coef = coef * tl.load(w_ptr + row // (2 * B)).to(tl.float32) / num_steps
    scale = coef * 2.0 / n
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + row * t_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if INPO:
        alpha = tl.load(alpha_ptr + row).to(tl.float32)
        z = tl.load(z_ptr + row * z_stride + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.div_rn(t - tl.sqrt_rn(alpha) * z, tl.sqrt_rn(1.0 - alpha))
    a = tl.load(a_ptr + row * a_stride + offs, mask=mask, other=0.0).to(tl.float32)
    g = scale * (a - t)
    tl.store(grad_ptr + row * n + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------- launchers
def as_rows(x: torch.Tensor, nrows: int) -> torch.Tensor:
    """``x`` as ``(nrows, n)`` with unit inner stride: a view when the strides allow it (e.g. a batch slice),
    a contiguous copy only when they do not (e.g. a transposed H/W)."""
    n = x.numel() // nrows if nrows else 0
    try:
        v = x.view(nrows, n)
    except RuntimeError:
        v = None
    if v is None or (n > 1 and v.stride(1) != 1):
        v = x.contiguous().view(nrows, n)
    return v


def reduction_config(rows: int, n: int, device: torch.device, block: int | None = None, tiles: int | None = None):
    """``(BLOCK, TILES, num_chunks)`` of the partial-sum kernel: a chunk is ``BLOCK * TILES`` elements.

    On CUDA the chunk grows (up to 16 tiles) while the grid stays ≥ ~1024 programs, so large batches do fewer,
    longer programs and B = 1 still spreads each sample over many SMs. Under the interpreter each program costs
    Python time, so one 1024-wide tile per program. The config depends only on the shape, so a given shape always
    reduces in the same order (determinism). It depends on ``rows`` too: the same sample in a batch of another
    size may be summed in other chunks and differ in the last bits (not batch-invariant; GPU review item 11).
    """
    if block is None:
        block = 1024
    if tiles is None:
        tiles = 1
        if device.type == "cuda":
            while tiles < 16 and rows * triton.cdiv(n, block * tiles * 2) >= 1024:
                tiles *= 2
    while triton.cdiv(n, block * tiles) > _MAX_GRID_YZ:
        tiles *= 2
    return block, tiles, max(1, triton.cdiv(n, block * tiles))


def sumsq_partials(a, b, t, z=None, alpha=None, *, block=None, tiles=None):
    """Float32 partial sums of squares, ``(S, rows, chunks)`` with ``S = 2`` when ``b`` is given, else 1.

    ``a``, ``b``, ``t``, ``z`` are ``(rows, n)`` row views (see :func:`as_rows`); with ``z`` and ``alpha`` the
    target is the InPO ``ε* = (t - sqrt(α) z) / sqrt(1 - α)`` computed in-kernel.
    """
    rows, n = a.shape
    if n >= 2**31:
        raise ValueError(f"a sample of {n} elements is too large for the kernels (limit 2**31 - 1)")
    BLOCK, TILES, C = reduction_config(rows, n, a.device, block, tiles)
    S = 2 if b is not None else 1
    part = torch.empty((S, rows, C), dtype=torch.float32, device=a.device)
    inpo = z is not None
    with on_device(a):
        _sumsq_partials_kernel[(rows, C)](
            a,
            b if b is not None else a,
            t,
            z if inpo else t,
            alpha if inpo else part,
            part,
            n,
            C,
            a.stride(0),
            b.stride(0) if b is not None else 0,
            t.stride(0),
            z.stride(0) if inpo else 0,
            rows * C,
            BLOCK=BLOCK,
            TILES=TILES,
            HAS_B=b is not None,
            INPO=inpo,
        )
    return part


def weighted_distance(part, weights, R2, n, num_steps):
    """Inversion-DPO's ``D`` ``(2B,)`` float32 from the partials ``(1, N·2B, chunks)`` of ``model_preds`` vs
    ``ref_preds`` (rows step-major) and the per-step weights: ``(1/N) Σ_i w_i mse_i``, in parallel over samples."""
    C = part.shape[-1]
    D = torch.empty(R2, dtype=torch.float32, device=part.device)
    BLOCK_N = min(16, max(2, triton.next_power_of_2(num_steps)))
    BLOCK_C = min(max(16, triton.next_power_of_2(C)), max(16, 2048 // BLOCK_N))
    with on_device(part):
        _weighted_distance_kernel[(R2,)](part, weights, D, R2, n, C, num_steps, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    return D


def _epilogue(part, B, n, k, has_ref, loss_type="sigmoid"):
    C = part.shape[-1]
    dev = part.device
    m = torch.empty(2 * B, dtype=torch.float32, device=dev)
    r = torch.empty(2 * B, dtype=torch.float32, device=dev)
    logits = torch.empty(B, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    acc = torch.empty((), dtype=torch.float32, device=dev)
    BLOCK_B = min(64, triton.next_power_of_2(B))
    BLOCK_C = min(max(16, triton.next_power_of_2(C)), max(16, 4096 // BLOCK_B))
    with on_device(part):
        _dpo_epilogue_kernel[(1,)](
            part,
            m,
            r,
            logits,
            loss,
            acc,
            B,
            n,
            C,
            2 * B * C,  # elements per slot of the partials buffer
            float(k),
            BLOCK_B=BLOCK_B,
            BLOCK_C=BLOCK_C,
            HAS_REF=has_ref,
            LOSS_TYPE=loss_type_code(loss_type),
        )
    return loss, logits, m, r, acc


def _unpack(a: torch.Tensor, batch_dims: int):
    """rows, 2B, N, n of an ``(2B, ...)`` (batch_dims 1) or ``(N, 2B, ...)`` (batch_dims 2) input."""
    R2 = a.shape[batch_dims - 1]
    N = a.shape[0] if batch_dims == 2 else 1
    rows = R2 * N
    n = a.numel() // rows if rows else 0
    return rows, R2, N, n


def grad_rows(
    coef_or_none,
    a,
    t,
    z,
    alpha,
    weights,
    batch_dims,
    k,
    *,
    grads=None,
    logits=None,
    block=None,
    num_steps=None,
    loss_type="sigmoid",
):
    """Launch the backward kernel; returns the gradient of ``a`` (contiguous, ``a``'s dtype and shape).

    With ``coef_or_none`` (a ``(2B,)`` float32 ∂loss/∂m) the DPO epilogue's gradient is skipped; ``num_steps``
    overrides the ``N`` that the weights are divided by (one step of an N-step loss); ``loss_type`` is the
    forward's (its derivative enters the coefficient). ``grads = (g_loss, g_logits, g_m)``: float32 contiguous, or
    ``None`` for an output that sends no gradient.
    """
    rows, R2, N, n = _unpack(a, batch_dims)
    if num_steps is not None:
        N = num_steps
    B = R2 // 2
    ar, tr = as_rows(a, rows), as_rows(t, rows)
    zr = as_rows(z, rows) if z is not None else tr
    grad = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if rows > _MAX_GRID_YZ:
        raise ValueError(f"{rows} rows exceed the kernel grid limit of {_MAX_GRID_YZ}")
    BLOCK = block or 1024
    if coef_or_none is not None:
        gm, gloss, glogits, lg = coef_or_none, coef_or_none, coef_or_none, coef_or_none
        present = (False, False, False)
    else:
        gloss, glogits, gm = grads
        present = tuple(g is not None for g in grads)
        gloss, glogits, gm = (g if g is not None else logits for g in grads)  # placeholders, never read
        lg = logits
    with on_device(a):
        _dpo_grad_kernel[(triton.cdiv(n, BLOCK), rows)](
            ar,
            tr,
            zr,
            alpha if alpha is not None else tr,
            weights if weights is not None else tr,
            gloss,
            glogits,
            gm,
            lg,
            grad,
            B,
            n,
            N,
            float(k),
            ar.stride(0),
            tr.stride(0),
            zr.stride(0),
            BLOCK=BLOCK,
            INPO=z is not None,
            HAS_W=weights is not None,
            COEF_GIVEN=coef_or_none is not None,
            LOSS_TYPE=loss_type_code(loss_type),
            HAS_GLOSS=present[0],
            HAS_GLOGITS=present[1],
            HAS_GM=present[2],
        )
    return grad


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fastinpo_triton::dpo_fwd", mutates_args=())
def dpo_fwd(
    a: torch.Tensor,
    b: torch.Tensor | None,
    t: torch.Tensor,
    z: torch.Tensor | None,
    alpha: torch.Tensor | None,
    weights: torch.Tensor | None,
    batch_dims: int,
    k: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logits, m, r, acc)`` of a DPO-family loss (see the module docstring).

    ``a``: policy predictions ``(2B, ...)`` (``batch_dims=1``) or ``(N, 2B, ...)`` (``batch_dims=2``, with
    per-step ``weights``); ``b``: reference predictions or None; ``t``: the target (or ``x̃`` with ``z``/``alpha``
    for the InPO target, or the reference predictions for Inversion-DPO); ``k = sign * 0.5 * beta``;
    ``loss_type``: ``"sigmoid"``, ``"hinge"`` or ``"ipo"`` (SPEC §2).
    """
    rows, R2, N, n = _unpack(a, batch_dims)
    part = sumsq_partials(
        as_rows(a, rows),
        as_rows(b, rows) if b is not None else None,
        as_rows(t, rows),
        as_rows(z, rows) if z is not None else None,
        alpha,
    )
    if weights is not None:
        # Inversion-DPO: the N steps reduced per sample in parallel, then the epilogue of a (2B,) distance
        D = weighted_distance(part, weights, R2, n, N)
        return _epilogue(D.view(1, R2, 1), R2 // 2, 1, k, has_ref=False, loss_type=loss_type)
    return _epilogue(part, R2 // 2, n, k, has_ref=b is not None, loss_type=loss_type)


@dpo_fwd.register_fake
def _dpo_fwd_fake(a, b, t, z, alpha, weights, batch_dims, k, loss_type="sigmoid"):
    R2 = a.shape[batch_dims - 1]
    f32 = dict(dtype=torch.float32, device=a.device)
    return (
        a.new_empty((), **f32),
        a.new_empty((R2 // 2,), **f32),
        a.new_empty((R2,), **f32),
        a.new_empty((R2,), **f32),
        a.new_empty((), **f32),
    )


@torch.library.custom_op("fastinpo_triton::dpo_bwd", mutates_args=())
def dpo_bwd(
    g_loss: torch.Tensor | None,
    g_logits: torch.Tensor | None,
    g_m: torch.Tensor | None,
    logits: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor | None,
    alpha: torch.Tensor | None,
    weights: torch.Tensor | None,
    batch_dims: int,
    k: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Gradient of a DPO-family loss with respect to ``a`` (one pass; ``a``'s dtype). A ``None`` output gradient
    (that output did not reach what is differentiated) is skipped in-kernel, not materialised as zeros."""
    f32 = dict(dtype=torch.float32, device=a.device)
    grads = tuple(g.to(**f32).contiguous() if g is not None else None for g in (g_loss, g_logits, g_m))
    return grad_rows(
        None, a, t, z, alpha, weights, batch_dims, k, grads=grads, logits=logits.contiguous(), loss_type=loss_type
    )


@dpo_bwd.register_fake
def _dpo_bwd_fake(g_loss, g_logits, g_m, logits, a, t, z, alpha, weights, batch_dims, k, loss_type="sigmoid"):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _setup_context(ctx, inputs, output):
    a, b, t, z, alpha, weights, batch_dims, k, loss_type = inputs
    # gradients of outputs that did not reach the loss stay None (no zero-fill launches; the kernel skips them)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, t, z, alpha, weights, output[1])
    ctx.batch_dims = batch_dims
    ctx.k = k
    ctx.loss_type = loss_type


def _backward(ctx, g_loss, g_logits, g_m, g_r, g_acc):
    a, t, z, alpha, weights, logits = ctx.saved_tensors
    if g_loss is None and g_logits is None and g_m is None:
        return None, None, None, None, None, None, None, None, None
    grad = dpo_bwd(g_loss, g_logits, g_m, logits, a, t, z, alpha, weights, ctx.batch_dims, ctx.k, ctx.loss_type)
    return grad, None, None, None, None, None, None, None, None


dpo_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public entry points
def _k(beta: float, sign: float) -> float:
    # the same Python-float product as reference.dpo_from_errors (sign * 0.5 * beta), rounded once to float32
    return sign * 0.5 * float(beta)


def _check_dtypes(**tensors):
    for name, x in tensors.items():
        if x is not None and x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the triton kernels take float32/float16/bfloat16, got {x.dtype}")


def diffusion_dpo_loss(model_pred, ref_pred, target, beta, loss_type="sigmoid") -> DPOLossOutput:
    """Fused Diffusion-DPO loss: same signature and result as ``reference.diffusion_dpo_loss``."""
    _check_dtypes(model_pred=model_pred, ref_pred=ref_pred, target=target)
    loss_type_code(loss_type)
    out = dpo_fwd(model_pred, ref_pred.detach(), target.detach(), None, None, None, 1, _k(beta, -1.0), loss_type)
    return DPOLossOutput(*out)


def inpo_dpo_loss(model_pred, ref_pred, x_t, z0, alpha_t, beta, loss_type="sigmoid") -> DPOLossOutput:
    """Fused DDIM-InPO loss: ``diffusion_dpo_loss(model_pred, ref_pred, inpo_target(x_t, z0, alpha_t), beta,
    loss_type)`` with the target ``ε* = (x̃ - sqrt(ᾱ_t) z0) / sqrt(1 - ᾱ_t)`` computed in-kernel (never
    materialized).

    Args:
        model_pred, ref_pred, x_t, z0: ``(2B, ...)`` on one device, same shape.
        alpha_t: ``(2B,)`` ᾱ of each sample's sampled ``t``, in (0, 1).
        beta: temperature > 0; loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"`` (SPEC §2).
    """
    _check_dtypes(model_pred=model_pred, ref_pred=ref_pred, x_t=x_t, z0=z0)
    loss_type_code(loss_type)
    if not (model_pred.shape == ref_pred.shape == x_t.shape == z0.shape):
        raise ValueError(
            f"shapes must match: model_pred {tuple(model_pred.shape)}, ref_pred {tuple(ref_pred.shape)}, "
            f"x_t {tuple(x_t.shape)}, z0 {tuple(z0.shape)}"
        )
    if model_pred.dim() < 2 or model_pred.shape[0] % 2 or model_pred.shape[0] == 0:
        raise ValueError(f"model_pred must be (2B, ...) with B >= 1, got {tuple(model_pred.shape)}")
    if alpha_t.shape != (model_pred.shape[0],):
        raise ValueError(f"alpha_t must be ({model_pred.shape[0]},), got {tuple(alpha_t.shape)}")
    alpha = alpha_t.detach().to(device=model_pred.device, dtype=torch.float32).contiguous()
    out = dpo_fwd(model_pred, ref_pred.detach(), x_t.detach(), z0.detach(), alpha, None, 1, _k(beta, -1.0), loss_type)
    return DPOLossOutput(*out)
