"""Forward noising shared by SFT and Diffusion-DPO (SPEC §2): the same ε and t for the two images of a pair."""

from __future__ import annotations

import torch

from fastinpo.methods.base import PairRandomness
from fastinpo.ops.schedule import NoiseSchedule, forward_noise, velocity_target


def noised_pairs(z0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, rng: PairRandomness,
                 *, paired: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t_per_sample, target)`` for ``z0`` — ``(2B, ...)`` with ``paired`` (winner and loser share ε and
    t, SPEC §2), or ``(B, ...)`` winners only. ε is drawn per pair from its own stream. The target is ε, or the
    velocity for a v-prediction model."""
    noise = rng.randn(z0.shape[1:], z0.device)  # (B, ...)
    t = t.to(z0.device)
    if paired:
        noise, t = noise.repeat(2, *([1] * (z0.dim() - 1))), t.repeat(2)
    alpha = schedule.alphas_at(t)
    x_t = forward_noise(z0, noise, alpha)
    target = velocity_target(z0, noise, alpha) if schedule.prediction_type == "v_prediction" else noise
    return x_t, t, target
