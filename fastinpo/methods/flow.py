"""The methods on rectified-flow models (SD3 / SD3.5; SPEC §7): flow SFT, Flow-DPO and InPO for flows.

Per pair one training σ (``σ_i`` of the training table at ``i = floor(u T)``, ``u`` from ``method.timestep_density``,
drawn from the pair's host stream) and one ε (its device stream), shared by the winner and the loser;
``x = (1 - σ) z0 + σ ε``, target ``v = ε - z0``; the model sees ``x`` and the timestep ``σ T`` and predicts a
velocity. Flow-DPO is exactly :func:`fastinpo.diffusion_dpo_loss` on velocities (no per-timestep weighting).
InPO for flows — **fastinpo's own extension, no paper reports it** — replaces the forward noising by the Euler
inversion of the policy's ODE up to each pair's σ (:func:`fastinpo.ops.flow.flow_inpo_invert`) and the target by
``v* = ε* - z0``. Inversion-DPO is not defined for flows and is refused (:func:`build_flow_method`).
"""

from __future__ import annotations

import torch

from fastinpo.methods.base import Method, MethodOutput, Models, PairRandomness, StepInputs, dpo_metrics
from fastinpo.ops.flow import (
    FlowSchedule,
    FlowTimesteps,
    flow_inpo_invert,
    flow_inpo_levels,
    flow_noise,
    flow_target,
    per_sample,
    sample_flow_sigmas,
)
from fastinpo.ops.inversion import slice_cond
from fastinpo.ops.losses import diffusion_dpo_loss, sft_loss


class FlowMethod(Method):
    """A method on a flow model: the σ draw and the forward noising of SPEC §7."""

    def __init__(self, config, schedule: FlowSchedule):
        if not isinstance(schedule, FlowSchedule):
            raise TypeError(f"{self.name} on a flow model needs a FlowSchedule, got {type(schedule).__name__}")
        self.config = config
        self.schedule = schedule

    def sample_sigmas(self, inputs: StepInputs) -> FlowTimesteps:
        """One σ per pair from its own host stream (so it does not depend on batch size, accumulation or ranks);
        ``(B,)`` fields on the host."""
        return self.sigmas_for(inputs.rng)

    def sigmas_for(self, rng: PairRandomness) -> FlowTimesteps:
        """:meth:`sample_sigmas` from the pairs' random streams alone."""
        c = self.config
        draws = [sample_flow_sigmas(self.schedule, 1, weighting_scheme=c.timestep_density, logit_mean=c.logit_mean,
                                    logit_std=c.logit_std, mode_scale=c.mode_scale, generator=g)
                 for g in rng.host]
        return FlowTimesteps(*(torch.cat([getattr(d, f) for d in draws]) for f in ("u", "indices", "sigmas",
                                                                                    "timesteps")))

    def sample_timesteps(self, inputs: StepInputs) -> torch.Tensor:
        """The model's timestep input ``σ T`` per pair (host)."""
        return self.sample_sigmas(inputs).timesteps

    @staticmethod
    def noised(z0: torch.Tensor, ts: FlowTimesteps, inputs: StepInputs, *, paired: bool):
        """``(x, timestep, target)`` for ``z0`` (``(2B, ...)`` paired: winner and loser share σ and ε; or winners
        ``(B, ...)``). ε is drawn per pair from its own stream."""
        eps = inputs.rng.randn(z0.shape[1:], z0.device)  # (B, ...)
        sigma, timestep = ts.sigmas.to(z0.device), ts.timesteps.to(z0.device)
        if paired:
            eps, sigma, timestep = per_sample(eps), per_sample(sigma), per_sample(timestep)
        return flow_noise(z0, eps, sigma), timestep, flow_target(z0, eps)


class FlowSFT(FlowMethod):
    """Flow SFT (SPEC §7): ``mean(mse(v_θ(x, σT, c), ε - z0))`` on the winners."""

    name = "sft"
    needs_reference = False

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        B = inputs.num_pairs
        x, timestep, target = self.noised(inputs.z0[:B], self.sample_sigmas(inputs), inputs, paired=False)
        loss = sft_loss(models.policy(x, timestep, slice_cond(inputs.cond, B)), target)
        return MethodOutput(loss, {"loss": loss.detach(), "model_mse": loss.detach()})


class FlowDPO(FlowMethod):
    """Flow-DPO (Liu et al. 2025; SPEC §7): §2's Diffusion-DPO loss on velocities, constant β."""

    name = "diffusion-dpo"

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        x, timestep, target = self.noised(inputs.z0, self.sample_sigmas(inputs), inputs, paired=True)
        model_pred = models.policy(x, timestep, inputs.cond)
        with torch.no_grad():
            ref_pred = models.reference(x, timestep, inputs.cond)
        out = diffusion_dpo_loss(model_pred, ref_pred, target, self.config.beta, backend=self.config.loss_backend)
        return MethodOutput(out.loss, dpo_metrics(out), dpo=out)


class FlowInPO(FlowMethod):
    """InPO for flows (fastinpo's own extension; SPEC §7): the policy's Euler inversion up to each pair's σ (K =
    ``method.inversion_levels`` levels of a K-step Euler sampler, deterministic), then Flow-DPO on the inverted
    latents against ``v* = ε* - z0``."""

    name = "inpo"

    def __init__(self, config, schedule: FlowSchedule):
        super().__init__(config, schedule)
        self.levels = flow_inpo_levels(schedule, config.inversion_levels)

    def inversion_calls(self, rng: PairRandomness) -> torch.Tensor:
        """``(B,)`` policy calls each pair's inversion will make (what ZeRO-3's lockstep pads to)."""
        return self.levels.num_steps(self.sigmas_for(rng).sigmas)

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        ts = self.sample_sigmas(inputs)  # on the host: the inversion plans its batch sizes without a sync
        inverter = models.inversion if models.inversion is not None else models.policy
        inv = flow_inpo_invert(inverter, inputs.z0, ts.sigmas, inputs.cond, self.levels,
                               backend=self.config.loss_backend)
        timestep = per_sample(ts.timesteps).to(inputs.z0.device)
        model_pred = models.policy(inv.latents, timestep, inputs.cond)
        with torch.no_grad():
            ref_pred = models.reference(inv.latents, timestep, inputs.cond)
        out = diffusion_dpo_loss(model_pred, ref_pred, inv.target, self.config.beta,
                                 backend=self.config.loss_backend)
        metrics = dpo_metrics(out)
        metrics["inversion_steps"] = inv.num_steps.float().mean()
        return MethodOutput(out.loss, metrics, dpo=out)


FLOW_METHODS: dict[str, type[FlowMethod]] = {m.name: m for m in (FlowSFT, FlowDPO, FlowInPO)}


def build_flow_method(config, schedule: FlowSchedule) -> FlowMethod:
    if config.name == "inversion-dpo":
        raise ValueError("inversion-dpo is not defined for flow-matching models (SD3): its per-step weights come "
                         "from the DDPM ELBO (SPEC §7). Use sft, diffusion-dpo (Flow-DPO) or inpo (InPO for flows)")
    if config.name not in FLOW_METHODS:
        raise ValueError(f"unknown method {config.name!r} for a flow model; choose one of {', '.join(FLOW_METHODS)}")
    return FLOW_METHODS[config.name](config, schedule)
