"""Registers the Triton implementations with the dispatcher (called by ``fastinpo.ops.dispatch`` at first dispatch).

This module must not import Triton: each implementation imports its kernel module on first call, so a process
that never runs a Triton kernel never pays for importing it.

Where the kernels run:

- CUDA tensors: always (the automatic choice picks Triton there);
- CPU tensors: only through Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), and only
  when asked for by name (``backend="triton"`` or ``FASTINPO_BACKEND=triton``). The automatic choice on CPU stays
  the reference even with the interpreter on: the interpreter is a test vehicle, orders of magnitude slower.

float64 inputs are refused (the kernels accumulate in float32; the reference keeps float64 in float64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from fastinpo.ops import dispatch


def can_run(tensors: Sequence[torch.Tensor]) -> str | None:
    """``None`` when the Triton kernels can run on ``tensors``, else why not."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors:
        return "no tensor inputs"
    kinds = sorted({t.device.type for t in tensors})
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs (the Triton kernels accumulate in float32; the reference keeps float64)"
    if kinds == ["cuda"]:
        return None
    if kinds == ["cpu"]:
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors run Triton kernels only through its interpreter (set TRITON_INTERPRET=1 before import)"
    return f"tensors on {', '.join(kinds)}; the Triton kernels run on CUDA (or on CPU with TRITON_INTERPRET=1)"


def auto_can_run(tensors: Sequence[torch.Tensor]) -> str | None:
    """The automatic choice: CUDA tensors only (never the interpreter)."""
    reason = can_run(tensors)
    if reason is not None:
        return reason
    if any(t.device.type != "cuda" for t in tensors if isinstance(t, torch.Tensor)):
        return "the automatic choice uses Triton on CUDA tensors only (the interpreter must be asked for by name)"
    return None


def _diffusion_dpo_loss(model_pred, ref_pred, target, beta):
    from fastinpo.kernels import dpo_loss

    return dpo_loss.diffusion_dpo_loss(model_pred, ref_pred, target, beta)


def _inversion_dpo_loss(model_preds, ref_preds, weights, beta, flip_sign=False):
    from fastinpo.kernels import inversion_dpo

    return inversion_dpo.inversion_dpo_loss(model_preds, ref_preds, weights, beta, flip_sign)


def _ddim_inversion_step(x, eps, alpha_from, alpha_to):
    from fastinpo.kernels import ddim_step

    return ddim_step.ddim_inversion_step(x, eps, alpha_from, alpha_to)


def _flow_euler_step(x, v, d_sigma):
    from fastinpo.kernels import flow_step

    return flow_step.flow_euler_step(x, v, d_sigma)


def register() -> None:
    """Register the ``"triton"`` backend of every op that has a kernel."""
    for op, fn in (
        ("diffusion_dpo_loss", _diffusion_dpo_loss),
        ("inversion_dpo_loss", _inversion_dpo_loss),
        ("ddim_inversion_step", _ddim_inversion_step),
        ("flow_euler_step", _flow_euler_step),
    ):
        dispatch.register(op, "triton", fn, can_run, auto=True, auto_can_run=auto_can_run)
