"""DDIM-InPO (CVPR 2025; SPEC §3): invert each pair with the policy up to its own t, then Diffusion-DPO on the
inverted latents against the reparametrized target ε*."""

from __future__ import annotations

import torch

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs, dpo_metrics
from fastinpo.ops.inversion import inpo_invert
from fastinpo.ops.losses import diffusion_dpo_loss, inpo_target


class InPO(Method):
    name = "inpo"
    epsilon_only = "SPEC §3"

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        t_host = self.sample_timesteps(inputs)  # on the host: inpo_invert plans its batch sizes without a sync
        inverter = models.inversion if models.inversion is not None else models.policy
        inv = inpo_invert(inverter, inputs.z0, t_host, inputs.cond, self.schedule,
                          num_levels=self.config.inversion_levels, eta=self.config.eta,
                          generator=inputs.rng.samples, backend=self.config.loss_backend)
        t = t_host.to(inputs.z0.device).repeat(2)
        target = inpo_target(inv.latents, inputs.z0, self.schedule.alphas_at(t))
        model_pred = models.policy(inv.latents, t, inputs.cond)
        with torch.no_grad():
            ref_pred = models.reference(inv.latents, t, inputs.cond)
        out = diffusion_dpo_loss(model_pred, ref_pred, target, self.config.beta, backend=self.config.loss_backend)
        metrics = dpo_metrics(out)
        metrics["inversion_steps"] = inv.num_steps.float().mean()
        return MethodOutput(out.loss, metrics, dpo=out)
