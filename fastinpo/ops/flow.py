"""Flow-matching arithmetic (SPEC §7): the rectified-flow training table, the timestep density, forward noising,
the velocity target, the InPO-for-flows levels, the Euler inversion of the policy's ODE and the Euler step op.

Rectified-flow models (diffusers ``SD3Transformer2DModel`` with ``FlowMatchEulerDiscreteScheduler``) predict a
velocity ``v = ε - z0`` of the straight line ``x_σ = (1 - σ) z0 + σ ε``; the model's timestep input is ``σ * T`` (a
float). Everything is float32 (float64 for float64 inputs); only model inputs are cast to the compute dtype.
The schedule is always built from the model's own scheduler config (SD3 / SD3.5: ``num_train_timesteps = 1000``,
``shift = 3.0``); dynamic shifting (FLUX) is refused.

InPO for flows is fastinpo's own extension of DDIM-InPO (no paper reports it): see :func:`flow_inpo_invert`.

The model of the inversion is any callable ``model(x, timestep, cond) -> v``: ``x`` is ``(n, ...)`` (cast to
``model_dtype`` if one is given), ``timestep`` a float32 tensor ``(n,)`` of ``σ * T`` values, and ``cond`` a pytree
(tensor, dict, list, tuple or ``None``) whose tensors all have the batch as dim 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastinpo.ops import checks, dispatch, reference
from fastinpo.ops.inversion import _call_model, select_cond, slice_cond
from fastinpo.ops.schedule import _load_config

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

#: The scheduler config of SD3 / SD3.5 (``scheduler/scheduler_config.json``; the keys that matter for the math).
SD3_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

#: The timestep densities of diffusers' ``compute_density_for_timestep_sampling`` that fastinpo offers.
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "mode")

#: diffusers' SD3 training scripts' default ``mode_scale``.
DEFAULT_MODE_SCALE = 1.29

# FlowMatchEulerDiscreteScheduler options that change the sampler's sigmas (and so the InPO-for-flows levels);
# SD3 / SD3.5 use none of them, and SPEC §7 pins the arithmetic without them.
_UNSUPPORTED_TRUE_OPTIONS = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                             "stochastic_sampling")

dispatch.register("flow_euler_step", "reference", reference.flow_euler_step)


# ----------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class FlowSchedule:
    """The training table of a rectified-flow model (SPEC §7), as diffusers' ``FlowMatchEulerDiscreteScheduler``
    builds it in ``__init__``.

    Attributes:
        sigmas: ``(T,)`` float32 on CPU, ``σ_i = shift * s_i / (1 + (shift - 1) * s_i)`` with
            ``s_i = (T - i) / T`` for ``i = 0..T-1`` (descending from 1 to ``σ(1/T)``); the scheduler's ``.sigmas``.
        timesteps: ``(T,)`` float32, ``σ_i * T``: the model's timestep input (the scheduler's ``.timesteps``).
        shift: the config's ``shift`` (SD3 / SD3.5: 3.0).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    shift: float
    _device_tables: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, timesteps)`` on ``device``, cached per device: a training loop copies them once (a
        host-to-device copy each step would be a host sync in the hot loop)."""
        key = torch.device(device)
        cached = self._device_tables.get(key)
        if cached is None:
            cached = (self.sigmas.to(key), self.timesteps.to(key))
            self._device_tables[key] = cached
        return cached

    @classmethod
    def from_config(cls, config) -> FlowSchedule:
        """Build from a scheduler config: a dict, a diffusers scheduler, a ``scheduler_config.json`` or its folder
        (a model folder with ``scheduler/scheduler_config.json`` works too). Missing keys take the
        ``FlowMatchEulerDiscreteScheduler`` class defaults (``shift = 1.0``: an SD3 config always states 3.0).

        Raises:
            ValueError: dynamic shifting (``use_dynamic_shifting = true``, FLUX-style resolution-dependent
                shifting), a sigma-conversion option that SPEC §7 does not define, a config of another
                scheduler class, or an invalid ``num_train_timesteps`` / ``shift``.
        """
        raw = _load_config(config)
        cls_name = raw.get("_class_name")
        if cls_name is not None and cls_name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"a flow schedule needs a FlowMatchEulerDiscreteScheduler config, got {cls_name!r} "
                             "(a DDPM/DDIM config belongs to an ε- or v-prediction model: use NoiseSchedule)")
        if raw.get("use_dynamic_shifting", False):
            raise ValueError(
                "use_dynamic_shifting = true (resolution-dependent timestep shifting, as FLUX uses) is not supported: "
                "fastinpo trains SD3 / SD3.5 flow models with a fixed shift (SPEC §7); FLUX is out of scope")
        bad = [k for k in _UNSUPPORTED_TRUE_OPTIONS if raw.get(k, False)]
        if raw.get("shift_terminal"):
            bad.append("shift_terminal")
        if bad:
            raise ValueError(f"scheduler options {', '.join(bad)} change the sigmas and are not supported "
                             "(SD3 / SD3.5 use none of them; SPEC §7)")
        steps = raw.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {steps!r}")
        shift = raw.get("shift", 1.0)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        # the same float32 operations, in the same order, as FlowMatchEulerDiscreteScheduler.__init__
        s = torch.arange(steps, 0, -1, dtype=torch.float32) / steps
        sigmas = shift * s / (1 + (shift - 1) * s)
        return cls(sigmas=sigmas, timesteps=sigmas * steps, shift=float(shift))

    @classmethod
    def sd3(cls) -> FlowSchedule:
        """The SD3 / SD3.5 schedule (T = 1000, shift 3.0)."""
        return cls.from_config(SD3_SCHEDULER_CONFIG)

    def sigmas_at(self, indices: torch.Tensor) -> torch.Tensor:
        """``σ_i`` of integer ``indices`` (any shape, values in ``[0, T)``), float32 on ``indices``' device."""
        if indices.is_floating_point():
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        return self.tables(indices.device)[0][indices]


# ----------------------------------------------------------------------------------------------- density
def flow_density(
    weighting_scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = DEFAULT_MODE_SCALE,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``u`` in [0, 1] drawn from the timestep density: exactly diffusers' ``compute_density_for_timestep_sampling``
    (the same generator gives the same draws).

    - ``"logit_normal"``: ``u = sigmoid(N(logit_mean, logit_std))`` (SD3's default, mean 0, std 1);
    - ``"uniform"``: ``u ~ U[0, 1)``;
    - ``"mode"``: ``u = 1 - r - mode_scale * (cos²(π r / 2) - 1 + r)`` with ``r ~ U[0, 1)``.

    Returns:
        ``(batch_size,)`` float32 on ``device``.
    """
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r}; expected one of: "
                         f"{', '.join(WEIGHTING_SCHEMES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if weighting_scheme == "logit_normal":
        logit_mean = checks.finite_float("logit_mean", logit_mean)
        logit_std = checks.finite_float("logit_std", logit_std, minimum=0.0)
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
        return torch.nn.functional.sigmoid(u)
    r = torch.rand(size=(batch_size,), device=device, generator=generator)
    if weighting_scheme == "mode":
        mode_scale = checks.finite_float("mode_scale", mode_scale)
        return 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    return r


@dataclass(frozen=True)
class FlowTimesteps:
    """Per-pair training timesteps of a flow model (SPEC §7): one σ per pair, shared by its winner and loser.

    Attributes:
        u: ``(B,)`` float32, the density draws.
        indices: ``(B,)`` int64, ``i = floor(u * T)`` clipped to ``[0, T - 1]``.
        sigmas: ``(B,)`` float32, ``σ_i``.
        timesteps: ``(B,)`` float32, ``σ_i * T`` (the model's timestep input).
    """

    u: torch.Tensor
    indices: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def per_sample_sigmas(self) -> torch.Tensor:
        """``(2B,)``: each pair's σ for its winner and its loser, winners first (:func:`per_sample`)."""
        return per_sample(self.sigmas)

    def per_sample_timesteps(self) -> torch.Tensor:
        """``(2B,)``: each pair's ``σ * T`` for its winner and its loser, winners first."""
        return per_sample(self.timesteps)


def per_sample(per_pair: torch.Tensor) -> torch.Tensor:
    """A per-pair vector ``(B, ...)`` repeated for the winners then the losers: ``(2B, ...)`` (SPEC §1 layout)."""
    return torch.cat([per_pair, per_pair], 0)


def sample_flow_sigmas(
    schedule: FlowSchedule,
    num_pairs: int,
    *,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = DEFAULT_MODE_SCALE,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> FlowTimesteps:
    """Draw one training σ per pair (SPEC §7): ``u`` from :func:`flow_density`, ``i = floor(u * T)`` clipped to
    ``T - 1``, ``σ = σ_i``, timestep ``σ_i * T`` — as diffusers' SD3 training scripts index
    ``scheduler.timesteps`` / ``scheduler.sigmas``.

    Args:
        schedule: the model's :class:`FlowSchedule`.
        num_pairs: B (one draw per pair; expand with :meth:`FlowTimesteps.per_sample_sigmas`).
        weighting_scheme: ``"logit_normal"`` (default), ``"uniform"`` or ``"mode"``.
        device, generator: where and with what the draws are made (same as diffusers' function).
    """
    u = flow_density(weighting_scheme, num_pairs, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                     device=device, generator=generator)
    T = schedule.num_train_timesteps
    indices = (u * T).long().clamp(0, T - 1)
    sigmas, timesteps = schedule.tables(u.device)
    return FlowTimesteps(u=u, indices=indices, sigmas=sigmas[indices], timesteps=timesteps[indices])


# ----------------------------------------------------------------------------------------------- noising, target
def _per_sample_view(name: str, value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    checks.per_sample_vector(name, value, like.shape[0], like.device)
    return value.to(dtype).view(-1, *([1] * (like.dim() - 1)))


def flow_noise(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward noising (SPEC §7): ``x = (1 - σ) z0 + σ ε``, float32 math.

    Args:
        z0, eps: ``(n, ...)`` clean latents and noise ``ε ~ N(0, I)`` (one ε per pair, repeated for winner and
            loser, is the caller's job: :func:`per_sample`).
        sigma: ``(n,)`` per-sample σ in [0, 1].

    Returns:
        ``(n, ...)`` float32 (float64 for float64 inputs).
    """
    checks.same_shape(("z0", "eps"), (z0, eps))
    acc = reference.accumulation_dtype(z0.dtype, eps.dtype, sigma.dtype)
    s = _per_sample_view("sigma", sigma, z0, acc)
    return (1 - s) * z0.to(acc) + s * eps.to(acc)


def flow_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity target (SPEC §7): ``v = ε - z0``, float32 math.

    Args:
        z0, eps: ``(n, ...)`` clean latents and the noise they were noised with.

    Returns:
        ``(n, ...)`` float32 (float64 for float64 inputs).
    """
    checks.same_shape(("z0", "eps"), (z0, eps))
    acc = reference.accumulation_dtype(z0.dtype, eps.dtype)
    return eps.to(acc) - z0.to(acc)


def flow_inpo_target(x_t: torch.Tensor, z0: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """The InPO-for-flows target (SPEC §7): ``ε* = (x̃ - (1 - σ_t) z0) / σ_t``, ``v* = ε* - z0``, float32 math.

    Args:
        x_t: ``(n, ...)`` inverted latents ``x̃`` (at ``σ_t``).
        z0: ``(n, ...)`` clean latents.
        sigma_t: ``(n,)`` per-sample σ_t in (0, 1].

    Returns:
        ``v*`` ``(n, ...)`` float32 (float64 for float64 inputs).
    """
    checks.same_shape(("x_t", "z0"), (x_t, z0))
    acc = reference.accumulation_dtype(x_t.dtype, z0.dtype, sigma_t.dtype)
    s = _per_sample_view("sigma_t", sigma_t, z0, acc)
    z = z0.to(acc)
    eps_star = (x_t.to(acc) - (1 - s) * z) / s
    return eps_star - z


# ----------------------------------------------------------------------------------------------- InPO levels
@dataclass(frozen=True)
class FlowInPOLevels:
    """The levels of the InPO-for-flows Euler inversion (SPEC §7).

    Attributes:
        sigmas: ``(K + 1,)`` float32, ``g_0 = 0 < g_1 < … < g_K = 1``: the reversed ``.sigmas`` of
            ``FlowMatchEulerDiscreteScheduler.from_config(config).set_timesteps(K)`` (whose last entry is the
            appended 0) — the levels a K-step Euler sampler of the pipeline visits, diffusers' double shift included.
        num_train_timesteps: T; the model is evaluated at timestep ``g_k * T``.
    """

    sigmas: torch.Tensor
    num_train_timesteps: int

    @property
    def num_levels(self) -> int:
        """K (the number of Euler steps of a full inversion)."""
        return int(self.sigmas.shape[0]) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """``(K + 1,)`` float32, ``g_k * T``: the model's timestep input at each level."""
        return self.sigmas * self.num_train_timesteps

    def num_steps(self, sigma_t: torch.Tensor) -> torch.Tensor:
        """Euler steps (= policy calls) of a pair at ``sigma_t`` (any shape): ``#{k < K : g_k < σ_t}``, in
        ``[1, K]`` for ``σ_t`` in (0, 1]. Compared in float32 (float64 for a float64 ``sigma_t``): the one
        definition :func:`flow_inpo_invert` uses (on σ_t in its state's precision: float32, float64 for float64
        latents), so a caller that plans calls ahead (ZeRO-3 lockstep) gets the inversion's own counts."""
        dtype = torch.promote_types(sigma_t.dtype, torch.float32)
        src = self.sigmas[:-1].to(device=sigma_t.device, dtype=dtype)
        return (src.view(*([1] * sigma_t.dim()), -1) < sigma_t.to(dtype).unsqueeze(-1)).sum(-1)


def flow_inpo_levels(schedule: FlowSchedule, num_levels: int = 10) -> FlowInPOLevels:
    """The InPO-for-flows levels for ``K = num_levels`` (default 10), computed as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)`` does (float64 linspace of ``σ_max T .. σ_min T``, divided
    by T, shifted again, cast to float32, 0 appended), then reversed: ``(0, g_1, …, g_K = 1)``.
    """
    T = schedule.num_train_timesteps
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or not 1 <= num_levels <= T:
        raise ValueError(f"num_levels (K) must be an int in [1, {T}], got {num_levels!r}")
    sigma_max, sigma_min = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    t = np.linspace(sigma_max * T, sigma_min * T, num_levels)
    s = t / T
    s = schedule.shift * s / (1 + (schedule.shift - 1) * s)
    sched_sigmas = torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])
    return FlowInPOLevels(sigmas=sched_sigmas.flip(0).contiguous(), num_train_timesteps=T)


# ----------------------------------------------------------------------------------------------- Euler step
def _check_euler_inputs(x, v, d_sigma) -> None:
    checks.tensor("x", x)
    checks.tensor("v", v)
    checks.same_shape(("x", "v"), (x, v))
    checks.same_device(("x", "v"), (x, v))
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be (n, ...) with n >= 1, got {tuple(x.shape)}")
    checks.per_sample_vector("d_sigma", d_sigma, x.shape[0], x.device)
    if not bool(torch.isfinite(d_sigma).all()):  # one tiny device sync on CUDA, like ddim_inversion_step's check
        raise ValueError(f"d_sigma must be finite, got values such as {d_sigma[~torch.isfinite(d_sigma)][:4].tolist()}")


def flow_euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    d_sigma: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One Euler step of the flow ODE with per-sample step sizes (SPEC §7): ``x_next = x + Δσ * v``, float32 math.

    Args:
        x, v: ``(n, ...)`` state and the model's velocity at the source level.
        d_sigma: ``(n,)`` per-sample ``Δσ`` (positive when inverting, negative when sampling), finite.
        backend: ``"reference"``, ``"triton"``, ``"ext"``, or ``None`` for the dispatcher's choice.

    Returns:
        ``(n, ...)`` in ``x``'s dtype.
    """
    _check_euler_inputs(x, v, d_sigma)
    _, fn = dispatch.resolve("flow_euler_step", backend, (x, v, d_sigma))
    return fn(x, v, d_sigma)


# ----------------------------------------------------------------------------------------------- InPO for flows
@dataclass
class FlowInPOInversion:
    """Result of :func:`flow_inpo_invert`.

    Attributes:
        latents: ``(2B, ...)`` the inverted latents ``x̃`` at each pair's ``σ_t`` (float32; float64 for float64
            ``z0``), caller's order.
        target: ``(2B, ...)`` the target velocity ``v* = ε* - z0`` with ``ε* = (x̃ - (1 - σ_t) z0) / σ_t``, same dtype.
        num_steps: ``(B,)`` int64, Euler steps (= policy calls) each pair took, in ``[1, K]``.
        num_model_calls: model calls made (= the largest ``num_steps``).
        samples_per_call: how many samples each call saw (``2 × active pairs``).
    """

    latents: torch.Tensor
    target: torch.Tensor
    num_steps: torch.Tensor
    num_model_calls: int
    samples_per_call: list[int]


def _call_velocity_model(model: Model, x: torch.Tensor, timestep: float, cond: Any, model_dtype,
                         out_dtype) -> torch.Tensor:
    """One model call at one timestep ``σ * T`` for every sample (a float32 ``(n,)`` tensor), output read as
    ``out_dtype``."""
    return _call_model(model, x, timestep, cond, model_dtype, out_dtype, t_dtype=torch.float32, output="a velocity")


def flow_inpo_invert(
    model: Model,
    z0: torch.Tensor,
    sigma_t: torch.Tensor,
    cond: Any,
    levels: FlowInPOLevels,
    *,
    model_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> FlowInPOInversion:
    """InPO-for-flows policy inversion of a batch of pairs, each up to its own ``σ_t`` (SPEC §7; fastinpo's own
    extension of DDIM-InPO, no paper reports it).

    The Euler inversion of the policy's ODE ``dx/dσ = v_θ(x, σT, c)``: start at ``x = z0`` (float32); for
    ``k = 0, 1, …`` the pairs with ``g_k < σ_t`` are active: one model call on exactly those samples (winners and
    losers of the active pairs) at timestep ``g_k T`` (the first call at 0) gives ``v``, then
    ``x = x + (min(g_{k+1}, σ_t) - g_k) v`` — the last step of each pair is clipped so that ``x̃`` sits exactly at
    its ``σ_t``. Deterministic. Pairs are laid out in order of decreasing step count, winner and loser side by side,
    so the active samples at every step are a prefix of the batch and each model call gets a view of it (the layout
    of :func:`fastinpo.ops.inversion.inpo_invert`); results come back in the caller's order.

    Args:
        model: the **policy**, ``model(x, timestep, cond) -> v`` (``timestep`` a float32 ``(n,)`` of ``σ T``),
            called under ``torch.no_grad``.
        z0: ``(2B, ...)`` clean latents, winners first.
        sigma_t: ``(B,)`` floating, each pair's sampled training σ in (0, 1] (e.g.
            :attr:`FlowTimesteps.sigmas`); on the CPU (no device sync to plan the batch sizes) or on ``z0``'s device.
        cond: conditioning pytree with ``2B`` rows (same as training, no CFG).
        levels: the :class:`FlowInPOLevels` of the model's schedule (:func:`flow_inpo_levels`).
        model_dtype: dtype the model input is cast to (the state itself stays float32).
        backend: backend of the Euler step (see :func:`flow_euler_step`).

    Returns:
        :class:`FlowInPOInversion`. Costs one host sync (the step counts) when ``sigma_t`` is on an accelerator.
    """
    checks.tensor("z0", z0)
    B = checks.paired("z0", z0)
    checks.tensor("sigma_t", sigma_t)
    if tuple(sigma_t.shape) != (B,):
        raise ValueError(f"sigma_t must have shape ({B},) (one σ per pair), got {tuple(sigma_t.shape)}")
    if sigma_t.device != z0.device and sigma_t.device.type != "cpu":
        raise ValueError(f"sigma_t must be on the CPU or on {z0.device} like z0, got {sigma_t.device}")
    if not isinstance(levels, FlowInPOLevels):
        raise TypeError(f"levels must be a FlowInPOLevels (flow_inpo_levels(schedule, K)), got {type(levels).__name__}")
    checks.cond_rows("cond", cond, 2 * B)
    acc = reference.accumulation_dtype(z0.dtype)
    # σ_t as the state's precision; the one host sync: step counts decide the batch size of every model call
    sig_host = sigma_t.detach().to(device="cpu", dtype=acc)
    bad = ~(torch.isfinite(sig_host) & (sig_host > 0) & (sig_host <= 1))
    if bool(bad.any()):
        raise ValueError(f"sigma_t must lie in (0, 1], got values such as {sig_host[bad][:4].tolist()}")
    g = levels.sigmas.to(acc)
    counts = levels.num_steps(sig_host).tolist()

    # Prefix layout: pairs sorted by decreasing step count (stable), each pair's winner and loser side by side,
    # so the samples active at step k are the first 2 * n_k rows — a view, no gather, for every model call.
    order = sorted(range(B), key=lambda i: -counts[i])
    perm = [row for p in order for row in (p, p + B)]
    _, step_fn = dispatch.resolve("flow_euler_step", backend, (z0,))

    device = z0.device
    perm_index = torch.tensor(perm, dtype=torch.int64, device=device)
    x = z0.detach().to(acc).index_select(0, perm_index)  # a fresh float32 copy in prefix layout
    sig_perm = per_sample(sig_host).index_select(0, perm_index.cpu()).to(device)
    cond_perm = select_cond(cond, perm_index)
    g_dev = g.to(device)
    timesteps = levels.timesteps.tolist()
    samples_per_call: list[int] = []
    with torch.no_grad():
        for k in range(max(counts)):
            n = 2 * sum(1 for c in counts if c > k)
            x_in = x[:n]
            v = _call_velocity_model(model, x_in, timesteps[k], slice_cond(cond_perm, n), model_dtype, acc)
            # Δσ = min(g_{k+1}, σ_t) - g_k per sample: the last step of a pair lands exactly on its σ_t
            d_sigma = torch.minimum(sig_perm[:n], g_dev[k + 1]) - g_dev[k]
            x[:n] = step_fn(x_in, v, d_sigma)
            samples_per_call.append(n)

    latents = torch.empty_like(x).index_copy_(0, perm_index, x)  # back to the caller's order
    sig_samples = per_sample(sig_host).to(device)
    return FlowInPOInversion(
        latents=latents,
        target=flow_inpo_target(latents, z0.detach().to(acc), sig_samples),
        num_steps=torch.tensor(counts, dtype=torch.int64, device=device),
        num_model_calls=len(samples_per_call),
        samples_per_call=samples_per_call,
    )
