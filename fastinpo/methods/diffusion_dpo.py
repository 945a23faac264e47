"""Diffusion-DPO (Wallace et al. 2023; SPEC §2): forward-noised pairs, one policy and one reference call."""

from __future__ import annotations

import torch

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs, dpo_metrics
from fastinpo.methods.noising import noised_pairs
from fastinpo.ops.losses import diffusion_dpo_loss


class DiffusionDPO(Method):
    name = "diffusion-dpo"

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        x_t, t, target = noised_pairs(inputs.z0, self.sample_timesteps(inputs), self.schedule, inputs.rng)
        model_pred = models.policy(x_t, t, inputs.cond)  # [winners; losers] in one call
        with torch.no_grad():
            ref_pred = models.reference(x_t, t, inputs.cond)
        out = diffusion_dpo_loss(model_pred, ref_pred, target, self.config.beta, backend=self.config.loss_backend)
        return MethodOutput(out.loss, dpo_metrics(out), dpo=out)
