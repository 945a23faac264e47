"""Forward noising shared by SFT and Diffusion-DPO (SPEC §2): the same ε and t for the two images of a pair."""

from __future__ import annotations

import torch

from fastinpo.schedule import NoiseSchedule, forward_noise, velocity_target


def noised_pairs(z0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator,
                 *, paired: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t_per_sample, target)`` for ``z0`` ``(n, ...)``; with ``paired`` (n = 2B, t ``(B,)``) winner and
    loser share ε and t. The target is ε, or the velocity for a v-prediction model."""
    n = z0.shape[0]
    base = n // 2 if paired else n
    noise = torch.randn((base, *z0.shape[1:]), generator=generator, device=z0.device, dtype=torch.float32)
    t = t.to(z0.device)
    if paired:
        noise, t = noise.repeat(2, *([1] * (z0.dim() - 1))), t.repeat(2)
    alpha = schedule.alphas_at(t)
    x_t = forward_noise(z0, noise, alpha)
    target = velocity_target(z0, noise, alpha) if schedule.prediction_type == "v_prediction" else noise
    return x_t, t, target
