"""Inversion-DPO (ACM MM 2025; SPEC §4): the reference's deterministic guided DDIM-inversion trajectory, the
policy's guided ε at the same points, a weighted distance per sample, DPO on the distances.

With ``memory_light`` (default) the gradient is SPEC §4's exact two-pass gradient: a no-grad pass gives every
pair's distance and the loss; then each step i is recomputed with grad and back-propagated alone, each sample's
term scaled by ``∂loss/∂D`` — activation memory independent of N, same gradient as keeping all N policy
evaluations in one graph.
"""

from __future__ import annotations

import torch

from fastinpo import reference as ref_ops
from fastinpo.inversion import guided_eps, inversion_dpo_trajectory, zero_uncond
from fastinpo.losses import inversion_dpo_loss
from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs, dpo_metrics


class InversionDPO(Method):
    name = "inversion-dpo"
    epsilon_only = "SPEC §4"

    def _policy_eps(self, models: Models, traj, i: int, cond, uncond) -> torch.Tensor:
        return guided_eps(models.policy, traj.latents[i], int(traj.grid.timesteps[i]), cond, uncond,
                          self.config.guidance_scale)

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        cfg = self.config
        traj = inversion_dpo_trajectory(models.reference, inputs.z0, inputs.cond, self.schedule,
                                        num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                        backend=cfg.loss_backend)
        uncond = zero_uncond(inputs.cond)
        weights = traj.grid.weights.to(inputs.z0.device)
        N = traj.grid.num_steps
        if not cfg.memory_light:
            preds = torch.stack([self._policy_eps(models, traj, i, inputs.cond, uncond) for i in range(N)])
            out = inversion_dpo_loss(preds, traj.ref_eps, weights, cfg.beta, flip_sign=cfg.flip_sign,
                                     backend=cfg.loss_backend)
            return MethodOutput(out.loss, dpo_metrics(out))

        # pass 1, no grad: D per sample and the loss
        with torch.no_grad():
            preds = torch.stack([self._policy_eps(models, traj, i, inputs.cond, uncond) for i in range(N)])
            out = inversion_dpo_loss(preds, traj.ref_eps, weights, cfg.beta, flip_sign=cfg.flip_sign,
                                     backend=cfg.loss_backend)
            del preds
        # ∂loss/∂D through the same epilogue the loss uses (one definition of f)
        D = out.model_mse.detach().requires_grad_(True)
        with torch.enable_grad():
            epilogue = ref_ops.dpo_from_errors(D, torch.zeros_like(D), cfg.beta, 1.0 if cfg.flip_sign else -1.0)
            (grad_D,) = torch.autograd.grad(epilogue.loss, D)
        # pass 2: one step at a time with grad; Σ_i ∇(Σ_s g_s (w_i/N) mse_i,s) = ∇loss exactly
        for i in range(N):
            eps = self._policy_eps(models, traj, i, inputs.cond, uncond)
            mse = ref_ops.per_sample_mse(eps, traj.ref_eps[i])
            surrogate = (grad_D * (weights[i] / N) * mse).sum()
            models.run_backward(surrogate * loss_scale)
        return MethodOutput(out.loss.detach(), dpo_metrics(out), backward_done=True)
