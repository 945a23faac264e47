"""What every training method shares: its inputs, its output, the two models it sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastinpo.ops.schedule import NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def stream_seed(seed: int, position: int, stream: int) -> int:
    """The seed of one random stream of the pair at ``position`` in the run's data stream (64-bit mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 1) % 2**64
    x ^= x >> 31
    return x % (2**63 - 1)


@dataclass
class PairRandomness:
    """Every random number of a micro-batch, drawn per pair from streams seeded by (seed, the pair's position in
    the run's data stream). A pair therefore gets the same timestep, noise, latent sample and caption dropout
    whatever the micro-batch size, the gradient accumulation or the number of ranks it is trained with — which
    is what makes a 2-rank run equal a 1-process run with the same global batch, and resume exact.

    Attributes:
        pair: one device generator per pair (latent sample, caption dropout, forward noise ε), in that order.
        host: one CPU generator per pair (the training timestep: drawn on the host, so planning the InPO
            inversion's batch sizes needs no device sync).
        samples: ``2B`` device generators, winners then losers (InPO's per-sample inversion noise).
    """

    pair: list[torch.Generator]
    host: list[torch.Generator]
    samples: list[torch.Generator]

    @classmethod
    def for_positions(cls, seed: int, positions: list[int], device: torch.device | str) -> PairRandomness:
        def gen(dev, position, stream):
            return torch.Generator(dev).manual_seed(stream_seed(seed, position, stream))

        return cls(pair=[gen(device, p, 0) for p in positions], host=[gen("cpu", p, 1) for p in positions],
                   samples=[gen(device, p, 2) for p in positions] + [gen(device, p, 3) for p in positions])

    def randn(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        """``(B, *shape)``: one draw of ``shape`` per pair from its own stream."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in self.pair])

    def rand(self, device) -> torch.Tensor:
        """``(B,)`` uniform [0, 1) per pair."""
        return torch.cat([torch.rand(1, generator=g, device=device) for g in self.pair])

    def timesteps(self, num_train_timesteps: int) -> torch.Tensor:
        """``(B,)`` int64 on the host, ``t ~ U{0..T-1}`` per pair."""
        return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in self.host])


@dataclass
class StepInputs:
    """One micro-batch, ready for a method.

    Attributes:
        z0: ``(2B, C, h, w)`` float32 clean latents (a fresh posterior sample), winners first.
        cond: UNet conditioning pytree with ``2B`` rows (caption dropout already applied per pair).
        rng: the micro-batch's per-pair random streams.
        rows: ``(B,)`` int64 source-row indices of the pairs (host), the key of per-pair caches; None when the
            inputs do not come from a dataset.
    """

    z0: torch.Tensor
    cond: Any
    rng: PairRandomness
    rows: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.z0.shape[0] // 2


@dataclass
class Models:
    """The policy (with grad) and the frozen reference (called without grad), both ``(x, t, cond) -> eps``.

    Attributes:
        inversion: the model InPO inverts with (SPEC §3: the policy). None means ``policy`` itself; under ZeRO-3
            it can be a replicated copy of the policy refreshed after every optimizer step, because calling the
            sharded policy would all-gather every weight at each of the up to K inversion calls.
        backward: how a method that runs its own backward (Inversion-DPO's memory-light gradient) back-propagates
            a loss. None means ``loss.backward()``; DeepSpeed needs ``engine.backward`` (its gradient reduction
            and loss scaling hang off it).
    """

    policy: Model
    reference: Model
    inversion: Model | None = None
    backward: Callable[[torch.Tensor], Any] | None = None

    def run_backward(self, loss: torch.Tensor) -> None:
        if self.backward is not None:
            self.backward(loss)
        else:
            loss.backward()


@dataclass
class MethodOutput:
    """A method's result for one micro-batch.

    ``loss`` is differentiable unless ``backward_done``: a method that runs its own backward (Inversion-DPO's
    memory-light gradient) has already accumulated ``loss_scale * ∇loss`` into the parameters' ``.grad``.
    ``metrics`` are device tensors (no host sync); scalars. ``dpo``: a DPO-family method's per-pair loss output
    (logits, per-sample errors), which preference validation reads (None for SFT).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    backward_done: bool = False
    dpo: Any = None


class Method:
    """Base class: ``method(inputs, models, loss_scale) -> MethodOutput``."""

    name = "base"
    needs_reference = True
    #: the SPEC section of a method whose math is written for epsilon prediction (its inversion and target), or
    #: ``None`` for a method that also trains v-prediction models
    epsilon_only: str | None = None

    def __init__(self, config, schedule: NoiseSchedule):
        if self.epsilon_only and schedule.prediction_type != "epsilon":
            raise ValueError(f"{self.name} needs an epsilon-prediction model ({self.epsilon_only}); this one "
                             f"predicts {schedule.prediction_type}")
        self.config = config
        self.schedule = schedule

    def sample_timesteps(self, inputs: StepInputs) -> torch.Tensor:
        """One training timestep per pair, ``t ~ U{0..T-1}``, drawn on the host (returned on the host)."""
        return inputs.rng.timesteps(self.schedule.num_train_timesteps)

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
