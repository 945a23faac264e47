"""Noise-schedule arithmetic: the ᾱ table, the inversion grids, per-sample gathers and the InPO noise σ.

Everything here is the reference arithmetic of SPEC.md §3–4, in float32 (float64 when asked), computed from
the **model's** scheduler config. diffusers' DDIM scheduler *classes* default to ``set_alpha_to_one=True`` and
``clip_sample=True``; SD1.5/SDXL configs say ``False`` for both, and the difference changes results, so a
schedule is always built from a config (:meth:`NoiseSchedule.from_config`), never from class defaults.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastinpo.ops import checks

#: The scheduler config shared by Stable Diffusion 1.5 and SDXL (the keys that matter for the math).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _load_config(config) -> dict[str, Any]:
    """A scheduler config as a dict, from a dict, a diffusers scheduler, a ``scheduler_config.json`` or its folder."""
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "config") and hasattr(config.config, "items"):  # a diffusers scheduler instance
        return dict(config.config)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            candidates = [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"no scheduler config in {path}: expected one of {', '.join(str(c) for c in candidates)}"
                )
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"scheduler config {path} does not exist")
        with open(path) as f:
            return json.load(f)
    raise TypeError(
        "config must be a dict, a diffusers scheduler, or the path of a scheduler_config.json (or its folder), "
        f"got {type(config).__name__}"
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """The ᾱ table of a model's noise schedule and the DDIM settings that SPEC.md's arithmetic reads.

    Attributes:
        alphas_cumprod: ``(T,)`` float32 on CPU, ``ᾱ_t`` for ``t = 0..T-1`` exactly as diffusers computes it.
        alpha_init: ``ᾱ_init`` used for a negative source level (SPEC §3): 1 if ``set_alpha_to_one`` else ``ᾱ_0``.
        steps_offset: added to every level of the InPO grid (SD configs: 1).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (what the UNet predicts).
        set_alpha_to_one: the config flag behind ``alpha_init``.
    """

    alphas_cumprod: torch.Tensor
    alpha_init: float
    steps_offset: int
    prediction_type: str
    set_alpha_to_one: bool
    _device_tables: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked once here, so that every consumer (the reference, Triton and C++ steps, the InPO target) sees a
        # valid table, and every backend refuses the same schedules: the hot loops read it unchecked.
        table = self.alphas_cumprod
        if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.numel() == 0:
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor (num_train_timesteps >= 1), got "
                             f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
        bad = ~(torch.isfinite(table) & (table > 0) & (table < 1))
        if bool(bad.any()):
            t = int(bad.nonzero()[0])
            raise ValueError(f"every ᾱ_t must lie in (0, 1) (a cumulative product of 1 - β_t with 0 < β_t < 1), got "
                             f"ᾱ_{t} = {float(table[t])}: check the scheduler config's betas "
                             "(beta_start, beta_end, beta_schedule, trained_betas)")
        if not (math.isfinite(self.alpha_init) and 0 < self.alpha_init <= 1):
            raise ValueError(f"alpha_init must lie in (0, 1], got {self.alpha_init}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config) -> NoiseSchedule:
        """Build from a scheduler config (dict, diffusers scheduler, ``scheduler_config.json`` or its folder).

        The ᾱ table comes from diffusers (``DDIMScheduler.from_config``), so every beta schedule diffusers knows is
        supported and the table is bit-identical to the one the official codes use. Keys missing from the config
        take diffusers' DDIM class defaults — which for ``set_alpha_to_one`` is ``True``: a config that omits it
        is not an SD config, and gets what the official codes would get from it.
        """
        from diffusers import DDIMScheduler  # diffusers is a core dependency; imported here to keep import light

        raw = _load_config(config)
        raw.pop("_class_name", None)
        raw.pop("_diffusers_version", None)
        steps = raw.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {steps!r}")
        sched = DDIMScheduler.from_config(raw)
        prediction_type = sched.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        table = sched.alphas_cumprod.to(torch.float32).clone()
        set_one = bool(sched.config.set_alpha_to_one)
        return cls(
            alphas_cumprod=table,
            alpha_init=1.0 if set_one else float(table[0]),
            steps_offset=int(sched.config.steps_offset),
            prediction_type=prediction_type,
            set_alpha_to_one=set_one,
        )

    @classmethod
    def stable_diffusion(cls) -> NoiseSchedule:
        """The SD1.5 / SDXL schedule (scaled_linear 0.00085–0.012, T = 1000, no clipping, ``ᾱ_init = ᾱ_0``)."""
        return cls.from_config(SD_SCHEDULER_CONFIG)

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ᾱ table on ``device`` (cached per device and dtype so a training loop copies it once)."""
        key = (torch.device(device), dtype)
        cached = self._device_tables.get(key)
        if cached is None:
            cached = self.alphas_cumprod.to(device=key[0], dtype=dtype)
            self._device_tables[key] = cached
        return cached

    def alphas_at(self, levels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-sample ᾱ of integer ``levels`` (any shape): ``ᾱ_level``, and ``ᾱ_init`` where ``level < 0``."""
        return gather_alphas(self.table(levels.device, dtype), levels, self.alpha_init)


def gather_alphas(table: torch.Tensor, levels: torch.Tensor, alpha_init: float) -> torch.Tensor:
    """Per-sample ``ᾱ`` gather with the negative-level rule of SPEC §3.

    Args:
        table: ``(T,)`` ᾱ table (float32 or float64), on the device of ``levels``.
        levels: integer tensor of any shape, values in ``[-T, T)``.
        alpha_init: the value returned where ``levels < 0``.

    Returns:
        A tensor shaped like ``levels`` with ``table.dtype``: ``table[level]`` if ``level >= 0`` else ``alpha_init``.
    """
    if levels.is_floating_point():
        raise TypeError(f"levels must be an integer tensor, got {levels.dtype}")
    T = table.shape[0]
    safe = levels.clamp(min=0)
    if levels.numel() and bool((levels >= T).any()):
        raise ValueError(f"levels must be < T = {T}, got max {int(levels.max())}")
    gathered = table[safe]
    return torch.where(levels < 0, torch.as_tensor(alpha_init, dtype=table.dtype, device=table.device), gathered)


@dataclass(frozen=True)
class InPOGrid:
    """The DDIM-InPO inversion grid of SPEC §3 ("leading" spacing, K levels).

    Attributes:
        stride: ``T // K``, the distance between two levels.
        levels: ``(K,)`` int64, ``g_k = k * stride + steps_offset`` for ``k = 0..K-1`` (where steps end).
        source_levels: ``(K,)`` int64, ``(g_{-1}, g_0, …, g_{K-2})`` with ``g_{-1} = g_0 - stride`` (negative):
            step ``k`` goes from ``source_levels[k]`` to ``levels[k]`` and evaluates the model at the source.
    """

    stride: int
    levels: torch.Tensor
    source_levels: torch.Tensor

    @property
    def num_levels(self) -> int:
        return int(self.levels.shape[0])

    def num_steps(self, t: torch.Tensor) -> torch.Tensor:
        """Steps taken by a pair sampled at ``t`` (int tensor, any shape): ``#{k : source_levels[k] < t}``.

        Between 1 and K for every ``t`` in ``[0, T)`` (6.382 on average for K = 10, T = 1000).
        """
        src = self.source_levels.to(t.device)
        return (src.view(*([1] * t.dim()), -1) < t.unsqueeze(-1)).sum(-1)

    def end_level(self, t: torch.Tensor) -> torch.Tensor:
        """The level a pair sampled at ``t`` ends on: ``levels[num_steps(t) - 1]``."""
        return self.levels.to(t.device)[self.num_steps(t) - 1]


def inpo_grid(schedule: NoiseSchedule, num_levels: int = 10) -> InPOGrid:
    """The InPO grid for ``K = num_levels`` (official 10): see :class:`InPOGrid` and SPEC §3.

    Example (SD schedule, K = 10): ``source_levels = (-99, 1, 101, …, 801)``, ``levels = (1, 101, …, 901)``.
    """
    T = schedule.num_train_timesteps
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or not 1 <= num_levels <= T:
        raise ValueError(f"num_levels (K) must be an int in [1, {T}], got {num_levels!r}")
    stride = T // num_levels
    levels = torch.arange(num_levels, dtype=torch.int64) * stride + schedule.steps_offset
    if int(levels[-1]) >= T:
        raise ValueError(f"the InPO grid's last level {int(levels[-1])} is outside the table (T = {T})")
    return InPOGrid(stride=stride, levels=levels, source_levels=levels - stride)


@dataclass(frozen=True)
class InversionDPOGrid:
    """The Inversion-DPO grid of SPEC §4 (N steps, leading spacing, ``steps_offset = 0``).

    Attributes:
        stride: ``T // N``.
        timesteps: ``(N,)`` int64, ``t_i = i * stride``: where the models are evaluated.
        source_levels: ``(N,)`` int64, ``t_i - stride``: the level ``x^(i)`` sits on (negative for ``i = 0``).
        weights: ``(N,)`` float32, ``w_i = 1 / (2 ᾱ_{t_i})``.
    """

    stride: int
    timesteps: torch.Tensor
    source_levels: torch.Tensor
    weights: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def inversion_dpo_grid(schedule: NoiseSchedule, num_steps: int = 40) -> InversionDPOGrid:
    """The Inversion-DPO grid for ``N = num_steps`` (official SDXL 80, default 40): see :class:`InversionDPOGrid`."""
    T = schedule.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps (N) must be an int in [1, {T}], got {num_steps!r}")
    stride = T // num_steps
    timesteps = torch.arange(num_steps, dtype=torch.int64) * stride
    weights = 1.0 / (2.0 * schedule.alphas_cumprod[timesteps])
    return InversionDPOGrid(stride=stride, timesteps=timesteps, source_levels=timesteps - stride, weights=weights)


def inpo_noise_sigma(alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """The InPO noise scale of SPEC §3, in float32 (float64 for float64 inputs).

    ``σ² = ((1 - a_from) / (1 - a_to)) * (1 - a_to / a_from)``; any matching shapes. ``σ = 0`` when
    ``a_from = 1`` (``set_alpha_to_one``).
    """
    dtype = torch.promote_types(alpha_from.dtype, torch.float32)
    a_from, a_to = alpha_from.to(dtype), alpha_to.to(dtype)
    var = ((1 - a_from) / (1 - a_to)) * (1 - a_to / a_from)
    return var.clamp(min=0).sqrt()


def forward_noise(z0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε`` (SPEC §2), float32 math, per-sample ``alpha_t`` ``(n,)``."""
    a = _per_sample(alpha_t, z0)
    return a.sqrt() * z0.to(a.dtype) + (1 - a).sqrt() * noise.to(a.dtype)


def velocity_target(z0: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z0``, float32 math, per-sample ``alpha_t``."""
    a = _per_sample(alpha_t, z0)
    return a.sqrt() * noise.to(a.dtype) - (1 - a).sqrt() * z0.to(a.dtype)


def _per_sample(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha`` ``(n,)`` as float32 (or float64), viewed to broadcast over the trailing dims of ``like``."""
    dtype = torch.promote_types(torch.promote_types(alpha.dtype, like.dtype), torch.float32)
    checks.per_sample_vector("alpha_t", alpha, like.shape[0], like.device)
    return alpha.to(dtype).view(-1, *([1] * (like.dim() - 1)))
