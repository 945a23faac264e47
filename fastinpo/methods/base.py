"""What every training method shares: its inputs, its output, the two models it sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastinpo.schedule import NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class StepInputs:
    """One micro-batch, ready for a method.

    Attributes:
        z0: ``(2B, C, h, w)`` float32 clean latents (a fresh posterior sample), winners first.
        cond: UNet conditioning pytree with ``2B`` rows (caption dropout already applied per pair).
        generator: device generator for this micro-step's randomness (noise, InPO η noise).
        host_generator: CPU generator for timesteps (drawn on the host so no device sync is needed to plan the
            InPO inversion's batch sizes).
    """

    z0: torch.Tensor
    cond: Any
    generator: torch.Generator
    host_generator: torch.Generator

    @property
    def num_pairs(self) -> int:
        return self.z0.shape[0] // 2


@dataclass
class Models:
    """The policy (with grad) and the frozen reference (called without grad), both ``(x, t, cond) -> eps``."""

    policy: Model
    reference: Model


@dataclass
class MethodOutput:
    """A method's result for one micro-batch.

    ``loss`` is differentiable unless ``backward_done``: a method that runs its own backward (Inversion-DPO's
    memory-light gradient) has already accumulated ``loss_scale * ∇loss`` into the parameters' ``.grad``.
    ``metrics`` are device tensors (no host sync); scalars.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    backward_done: bool = False


class Method:
    """Base class: ``method(inputs, models, loss_scale) -> MethodOutput``."""

    name = "base"
    needs_reference = True

    def __init__(self, config, schedule: NoiseSchedule):
        self.config = config
        self.schedule = schedule

    def sample_timesteps(self, inputs: StepInputs) -> torch.Tensor:
        """One training timestep per pair, ``t ~ U{0..T-1}``, drawn on the host (returned on the host)."""
        T = self.schedule.num_train_timesteps
        return torch.randint(0, T, (inputs.num_pairs,), generator=inputs.host_generator)

    def __call__(self, inputs: StepInputs, models: Models, loss_scale: float = 1.0) -> MethodOutput:
        raise NotImplementedError


def dpo_metrics(out) -> dict[str, torch.Tensor]:
    """The logged DPO quantities: loss, implicit accuracy, policy / reference MSE, reward margin (mean logit)."""
    return {
        "loss": out.loss.detach(),
        "implicit_acc": out.implicit_acc.detach(),
        "model_mse": out.model_mse.detach().mean(),
        "ref_mse": out.ref_mse.detach().mean(),
        "reward_margin": out.logits.detach().mean(),
    }
