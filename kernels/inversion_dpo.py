"""Fused Inversion-DPO accumulation (SPEC §4): ``D = (1/N) Σ_i w_i * mse(model_preds[i], ref_preds[i])``.

Two ways to use it:

- the plain loss, :func:`inversion_dpo_loss` (the registered ``"triton"`` implementation): the ``(N, 2B, ...)``
  inputs are read once as ``N·2B`` rows by the partial-sum kernel of :mod:`fastinpo.kernels.dpo_loss`, and the
  epilogue kernel applies the weights, the ``1/N``, the logits, the loss and the accuracy in a fixed order; the
  backward pass writes ``coef_b * (w_i/N) * 2 * (model_preds[i] - ref_preds[i]) / n`` in one pass;
- the memory-light two-pass gradient of SPEC §4 (activation memory independent of N): a no-grad first pass calls
  :func:`accumulate_step` once per step to build ``D`` (float32, in place, deterministic); :func:`distance_coef`
  turns ``D`` into ``coef_b = ∂loss/∂D_b``; the second pass recomputes each step with grad and back-propagates
  :func:`step_grad` (``coef_b * (w_i/N) * 2 * (model_pred_i - ref_pred_i) / n``) through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinpo.kernels import dpo_loss as _dl
from fastinpo.ops import reference
from fastinpo.ops.outputs import DPOLossOutput


@triton.jit
def _accumulate_rows_kernel(part_ptr, w_ptr, d_ptr, n, num_chunks, num_steps, BLOCK_C: tl.constexpr):
    # D[row] += (w / N) * (Σ_c partials[row, c]) / n, one program per row, chunks summed in a fixed order
    row = tl.program_id(0).to(tl.int64)
    oc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, num_chunks, BLOCK_C):
        cc = c0 + oc
        acc += tl.load(part_ptr + row * num_chunks + cc, mask=cc < num_chunks, other=0.0)
    mse = tl.sum(acc, axis=0) / n
    w = tl.load(w_ptr).to(tl.float32)
    d = tl.load(d_ptr + row)
    tl.store(d_ptr + row, d + (w / num_steps) * mse)


def _check(model_preds, ref_preds, batch_dims):
    _dl._check_dtypes(model_preds=model_preds, ref_preds=ref_preds)
    if model_preds.shape != ref_preds.shape:
        raise ValueError(f"shapes must match: {tuple(model_preds.shape)} vs {tuple(ref_preds.shape)}")
    if model_preds.device != ref_preds.device:
        raise ValueError(f"tensors must be on one device: {model_preds.device} vs {ref_preds.device}")
    if model_preds.dim() < batch_dims + 1:
        raise ValueError(f"expected at least {batch_dims + 1} dims, got shape {tuple(model_preds.shape)}")
    R2 = model_preds.shape[batch_dims - 1]
    if R2 == 0 or R2 % 2:
        raise ValueError(f"the batch dim must be 2B with B >= 1, got shape {tuple(model_preds.shape)}")


def _weight_tensor(weight, device) -> torch.Tensor:
    """A weight (Python number or tensor) as a 1-element float32 device tensor, without a host sync."""
    return torch.as_tensor(weight, dtype=torch.float32, device=device).detach().reshape(1)


def inversion_dpo_loss(model_preds, ref_preds, weights, beta, flip_sign=False, loss_type="sigmoid") -> DPOLossOutput:
    """Fused Inversion-DPO loss: same signature and result as ``reference.inversion_dpo_loss``."""
    _check(model_preds, ref_preds, 2)
    _dl.loss_type_code(loss_type)
    w = weights.detach().to(device=model_preds.device, dtype=torch.float32).contiguous()
    k = _dl._k(beta, 1.0 if flip_sign else -1.0)
    out = _dl.dpo_fwd(model_preds, None, ref_preds.detach(), None, None, w, 2, k, loss_type)
    return DPOLossOutput(*out)


def inversion_dpo_distance(model_preds, ref_preds, weights) -> torch.Tensor:
    """``D`` ``(2B,)`` float32 of ``(N, 2B, ...)`` inputs (differentiable w.r.t. ``model_preds``)."""
    return inversion_dpo_loss(model_preds, ref_preds, weights, 1.0).model_mse


@torch.no_grad()
def accumulate_step(D_accum: torch.Tensor, model_pred_i, ref_pred_i, weight_i, N: int, *, block=None) -> torch.Tensor:
    """``D_accum += (w_i / N) * mse(model_pred_i, ref_pred_i)`` in place (first pass of the two-pass gradient).

    Args:
        D_accum: ``(2B,)`` float32 accumulator (start from zeros), same device.
        model_pred_i, ref_pred_i: ``(2B, ...)`` predictions at step i (fp32/fp16/bf16, any strides).
        weight_i: ``w_i`` as a Python number or a 0-d / 1-element tensor (read on device: no sync).
        N: the number of steps.
        block: tile width override (tests use a small one to split a sample across programs).

    Deterministic: the per-sample sums are reduced in a fixed order, and steps are added in call order.
    """
    _check(model_pred_i, ref_pred_i, 1)
    R2 = model_pred_i.shape[0]
    if D_accum.shape != (R2,) or D_accum.dtype != torch.float32 or not D_accum.is_contiguous():
        raise ValueError(
            f"D_accum must be a contiguous float32 ({R2},) tensor, got {D_accum.dtype} {tuple(D_accum.shape)}"
        )
    a = _dl.as_rows(model_pred_i.detach(), R2)
    t = _dl.as_rows(ref_pred_i.detach(), R2)
    part = _dl.sumsq_partials(a, None, t, block=block)
    C = part.shape[-1]
    w = _weight_tensor(weight_i, a.device)
    with _dl.on_device(a):
        _accumulate_rows_kernel[(R2,)](
            part,
            w,
            D_accum,
            a.shape[1],
            C,
            int(N),
            BLOCK_C=min(1024, max(16, triton.next_power_of_2(C))),
        )
    return D_accum


def distance_coef(D: torch.Tensor, beta: float, flip_sign: bool = False, loss_type: str = "sigmoid") -> torch.Tensor:
    """``coef_b = ∂loss/∂D_b`` ``(2B,)`` of the Inversion-DPO loss at distances ``D`` (reference epilogue's
    autograd on a ``(2B,)`` vector: nothing re-derived)."""
    with torch.enable_grad():
        d = D.detach().to(torch.float32).requires_grad_(True)
        out = reference.dpo_from_errors(
            d, torch.zeros_like(d), beta, sign=1.0 if flip_sign else -1.0, loss_type=loss_type
        )
        (coef,) = torch.autograd.grad(out.loss, d)
    return coef


@torch.no_grad()
def step_grad(coef: torch.Tensor, model_pred_i, ref_pred_i, weight_i, N: int, *, block=None) -> torch.Tensor:
    """``coef_b * (w_i / N) * 2 * (model_pred_i - ref_pred_i) / n`` in ``model_pred_i``'s dtype, one pass.

    The gradient of the Inversion-DPO loss with respect to step i's policy prediction, given
    ``coef = distance_coef(D, beta)``; back-propagate it with ``model_pred_i.backward(step_grad(...))``.
    """
    _check(model_pred_i, ref_pred_i, 1)
    R2 = model_pred_i.shape[0]
    c = coef.detach().to(device=model_pred_i.device, dtype=torch.float32).contiguous()
    if c.shape != (R2,):
        raise ValueError(f"coef must be ({R2},), got {tuple(c.shape)}")
    w = _weight_tensor(weight_i, model_pred_i.device)
    # rows = 2B with a one-element weight table: the kernel reads w[row // 2B] = w[0] and divides by N
    return _dl.grad_rows(
        c, model_pred_i.detach(), ref_pred_i.detach(), None, None, w, 1, 0.0, block=block, num_steps=int(N)
    )
