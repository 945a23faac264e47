"""Inversion-DPO (ACM MM 2025; SPEC §4): the reference's deterministic guided DDIM-inversion trajectory, the
policy's guided ε at the same points, a weighted distance per sample, DPO on the distances.

With ``memory_light`` (default) the gradient is SPEC §4's exact two-pass gradient: a no-grad pass gives every
pair's distance and the loss; then the steps are recomputed with grad, ``grad_steps_per_call`` at a time, and
back-propagated, each sample's term scaled by ``∂loss/∂D`` — activation memory independent of N, same gradient
as keeping all N policy evaluations in one graph.

Given the trajectory, the N policy evaluations are independent of each other, so several steps go through the
UNet in one call (per-sample timesteps): ``nograd_steps_per_call`` in the no-grad pass (no activations are
kept, so this costs little memory) and ``grad_steps_per_call`` with grad. Fewer, larger calls are what count
where per-call overhead dominates (small models, small batches).

The reference trajectory depends only on the frozen reference and the pair's fixed inputs, so with a
:class:`fastinpo.data.trajectory_cache.TrajectoryCache` (``method.trajectory_cache_dir``) its ε is computed once per
pair and read back in later epochs; the latents are replayed from it with N elementwise steps.
"""

from __future__ import annotations

import torch

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs, dpo_metrics
from fastinpo.ops import reference as ref_ops
from fastinpo.ops.inversion import (
    guided_eps,
    inversion_dpo_trajectory,
    replay_inversion_dpo_trajectory,
    tile_cond,
    zero_uncond,
)
from fastinpo.ops.losses import inversion_dpo_loss_grid_weights as inversion_dpo_loss


class InversionDPO(Method):
    name = "inversion-dpo"
    epsilon_only = "SPEC §4"
    #: the on-disk reference-trajectory cache (:class:`fastinpo.data.trajectory_cache.TrajectoryCache`), set by the
    #: trainer when ``method.trajectory_cache_dir`` is configured
    trajectory_cache = None

    def _policy_eps(self, models: Models, traj, steps: range, cond, uncond) -> torch.Tensor:
        """``(len(steps), 2B, ...)``: the policy's guided ε at trajectory steps ``steps``, in one UNet call."""
        k, n = len(steps), traj.latents.shape[1]
        x = traj.latents[steps.start:steps.stop].reshape(k * n, *traj.latents.shape[2:])
        levels = traj.grid.timesteps[steps.start:steps.stop].to(torch.int64).repeat_interleave(n)
        eps = guided_eps(models.policy, x, levels, tile_cond(cond, k), tile_cond(uncond, k),
                         self.config.guidance_scale)
        return eps.view(k, n, *eps.shape[1:])

    def _trajectory(self, inputs: StepInputs, models: Models):
        cfg = self.config
        cache = self.trajectory_cache
        if cache is not None and inputs.rows is not None:
            cached = cache.load(inputs.rows, inputs.z0.device)
            if cached is not None:
                return replay_inversion_dpo_trajectory(inputs.z0, cached, self.schedule, num_steps=cfg.num_steps,
                                                       backend=cfg.loss_backend)
        traj = inversion_dpo_trajectory(models.reference, inputs.z0, inputs.cond, self.schedule,
                                        num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                        backend=cfg.loss_backend)
        if cache is not None and inputs.rows is not None:
            cache.store(inputs.rows, traj.ref_eps)
        return traj

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        cfg = self.config
        traj = self._trajectory(inputs, models)
        uncond = zero_uncond(inputs.cond)
        weights = traj.grid.weights.to(inputs.z0.device)
        N = traj.grid.num_steps

        def chunks(k: int):
            return [range(s, min(s + k, N)) for s in range(0, N, k)]

        def all_preds(k: int) -> torch.Tensor:
            return torch.cat([self._policy_eps(models, traj, c, inputs.cond, uncond) for c in chunks(k)])

        if not cfg.memory_light:
            out = inversion_dpo_loss(all_preds(cfg.grad_steps_per_call), traj.ref_eps, weights, cfg.beta,
                                     flip_sign=cfg.flip_sign, backend=cfg.loss_backend)
            return MethodOutput(out.loss, dpo_metrics(out), dpo=out)

        # pass 1, no grad: D per sample and the loss
        with torch.no_grad():
            preds = all_preds(cfg.nograd_steps_per_call)
            out = inversion_dpo_loss(preds, traj.ref_eps, weights, cfg.beta, flip_sign=cfg.flip_sign,
                                     backend=cfg.loss_backend)
            del preds
        if not torch.is_grad_enabled():  # called without grad (validation): the loss, no backward
            return MethodOutput(out.loss, dpo_metrics(out), backward_done=True, dpo=out)
        # ∂loss/∂D through the same epilogue the loss uses (one definition of f)
        D = out.model_mse.detach().requires_grad_(True)
        with torch.enable_grad():
            epilogue = ref_ops.dpo_from_errors(D, torch.zeros_like(D), cfg.beta, 1.0 if cfg.flip_sign else -1.0)
            (grad_D,) = torch.autograd.grad(epilogue.loss, D)
        # pass 2: a few steps at a time with grad; Σ_i ∇(Σ_s g_s (w_i/N) mse_i,s) = ∇loss exactly
        for c in chunks(cfg.grad_steps_per_call):
            eps = self._policy_eps(models, traj, c, inputs.cond, uncond)
            surrogate = eps.new_zeros(())
            for j, i in enumerate(c):
                mse = ref_ops.per_sample_mse(eps[j], traj.ref_eps[i])
                surrogate = surrogate + (grad_D * (weights[i] / N) * mse).sum()
            models.run_backward(surrogate * loss_scale)
        return MethodOutput(out.loss.detach(), dpo_metrics(out), backward_done=True, dpo=out)
