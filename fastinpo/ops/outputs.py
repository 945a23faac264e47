"""Result types shared by the reference and the fast paths."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DPOLossOutput(NamedTuple):
    """What every DPO-family loss returns (a NamedTuple, so ``torch.compile`` traces it).

    Attributes:
        loss: scalar, float32 (float64 for float64 inputs): the mean over pairs of the ``loss_type``'s per-pair
            loss (``-logsigmoid(logits)`` by default; SPEC §2); differentiable with respect to the policy's
            predictions only.
        logits: ``(B,)``, one per pair.
        model_mse: ``(2B,)``, the policy's per-sample error (Inversion-DPO: the per-sample distance D).
        ref_mse: ``(2B,)``, the reference's per-sample error (Inversion-DPO: zeros).
        implicit_acc: scalar, ``mean(logits > 0) + 0.5 * mean(logits == 0)`` (ties get half credit).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    model_mse: torch.Tensor
    ref_mse: torch.Tensor
    implicit_acc: torch.Tensor
