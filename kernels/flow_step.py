"""Euler step of a rectified-flow ODE (SPEC §7), one pass over ``x`` and ``v``:

``x_next = x + Δσ * v`` in float32, with a per-sample ``Δσ`` (the InPO-for-flows inversion clips each pair's last
step to its own ``σ_t``, so the step sizes differ across the batch). Same grid layout as
:mod:`fastinpo.kernels.ddim_step`: blocks of a sample on axis 0, samples on axis 1, int64 row offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinpo.kernels.dpo_loss import SUPPORTED_DTYPES, as_rows, on_device

_MAX_GRID_YZ = 65535


@triton.jit
def _flow_euler_step_kernel(
    x_ptr,
    v_ptr,
    out_ptr,
    d_ptr,
    n,
    x_stride,
    v_stride,
    out_stride,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # int64 rows: row * stride > 2**31 at large batches
    d = tl.load(d_ptr + row).to(tl.float32)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * v_stride + offs, mask=mask, other=0.0).to(tl.float32)
    res = x + d * v  # reference.flow_euler_step
    tl.store(out_ptr + row * out_stride + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


def _check_dtype(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the triton kernels take float32/float16/bfloat16, got {t.dtype}")


@torch.library.custom_op("fastinpo_triton::flow_euler_step", mutates_args=())
def flow_euler_step(x: torch.Tensor, v: torch.Tensor, d_sigma: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``reference.flow_euler_step`` (per-sample ``Δσ``, ``x``'s dtype)."""
    _check_dtype("x", x)
    _check_dtype("v", v)
    n = x.shape[0]
    if tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if tuple(d_sigma.shape) != (n,):
        raise ValueError(f"d_sigma must be ({n},), got {tuple(d_sigma.shape)}")
    if n > _MAX_GRID_YZ:
        raise ValueError(f"{n} samples exceed the kernel grid limit of {_MAX_GRID_YZ}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    row = x.numel() // n if n else 0
    if n == 0 or row == 0:
        return out
    if row >= 2**31:
        raise ValueError(f"a sample of {row} elements is too large for the kernels (limit 2**31 - 1)")
    xr, vr, outr = as_rows(x, n), as_rows(v, n), out.view(n, row)
    d = d_sigma.detach().to(device=x.device, dtype=torch.float32).contiguous()
    BLOCK = 1024
    with on_device(x):
        _flow_euler_step_kernel[(triton.cdiv(row, BLOCK), n)](
            xr, vr, outr, d, row, xr.stride(0), vr.stride(0), outr.stride(0), BLOCK=BLOCK,
        )
    return out


@flow_euler_step.register_fake
def _flow_euler_step_fake(x, v, d_sigma):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
