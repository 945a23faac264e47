"""DDIM inversion: the single step, the batched DDIM-InPO policy inversion, and the Inversion-DPO trajectory.

The model is any callable ``model(x, t, cond) -> eps``: ``x`` is ``(n, ...)`` (cast to ``model_dtype`` if one is
given), ``t`` an int64 tensor ``(n,)`` of timesteps (possibly negative: InPO's first call is at level
``-T//K + steps_offset``, which goes into the time embedding as in the official code), and ``cond`` a pytree
(tensor, dict, list, tuple or ``None``) whose tensors all have the batch as dim 0. The callable's output is
read as float32 (float64 for float64 latents): every inversion state stays in that precision (SPEC §3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastinpo.ops import checks, dispatch, reference
from fastinpo.ops.schedule import (
    InPOGrid,
    InversionDPOGrid,
    NoiseSchedule,
    inpo_grid,
    inpo_noise_sigma,
    inversion_dpo_grid,
)

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

dispatch.register("ddim_inversion_step", "reference", reference.ddim_inversion_step)


def _check_step_inputs(x, eps, alpha_from, alpha_to) -> None:
    checks.tensor("x", x)
    checks.tensor("eps", eps)
    checks.same_shape(("x", "eps"), (x, eps))
    checks.same_device(("x", "eps"), (x, eps))
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be (n, ...) with n >= 1, got {tuple(x.shape)}")
    for name, a in (("alpha_from", alpha_from), ("alpha_to", alpha_to)):
        checks.per_sample_vector(name, a, x.shape[0], x.device)
        checks.alpha_range(name, a)


def ddim_inversion_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One DDIM inversion step with per-sample alphas (SPEC §3).

    ``x_next = sqrt(a_to) * (x - sqrt(1 - a_from) * eps) / sqrt(a_from) + sqrt(1 - a_to) * eps``, float32 math.

    Args:
        x, eps: ``(n, ...)`` state and the model's ε at the source level.
        alpha_from, alpha_to: ``(n,)`` ᾱ of each sample's source and target level, in (0, 1]
            (see :meth:`NoiseSchedule.alphas_at`, which maps a negative level to ``ᾱ_init``).
        backend: ``"reference"``, ``"triton"``, ``"ext"``, or ``None`` for the dispatcher's choice.

    Returns:
        ``(n, ...)`` in ``x``'s dtype.
    """
    _check_step_inputs(x, eps, alpha_from, alpha_to)
    _, fn = dispatch.resolve("ddim_inversion_step", backend, (x, eps, alpha_from, alpha_to))
    return fn(x, eps, alpha_from, alpha_to)


# ----------------------------------------------------------------------------------------------- pytree helpers
def select_cond(cond: Any, index: torch.Tensor) -> Any:
    """``cond`` restricted to the samples in ``index`` (every tensor is indexed along dim 0)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, index.to(cond.device))
    if isinstance(cond, dict):
        return {k: select_cond(v, index) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(select_cond(v, index) for v in cond)
    raise TypeError(f"cond must be a tensor, dict, list, tuple or None, got {type(cond).__name__}")


def slice_cond(cond: Any, n: int) -> Any:
    """The first ``n`` rows of every tensor of ``cond`` (views, no copy)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[:n]
    if isinstance(cond, dict):
        return {k: slice_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(slice_cond(v, n) for v in cond)
    raise TypeError(f"cond must be a tensor, dict, list, tuple or None, got {type(cond).__name__}")


def concat_cond(first: Any, second: Any) -> Any:
    """Two conds of the same structure stacked along dim 0 (e.g. ``[uncond; cond]`` for one CFG call)."""
    if first is None and second is None:
        return None
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.cat([first, second], 0)
    if isinstance(first, dict) and isinstance(second, dict) and first.keys() == second.keys():
        return {k: concat_cond(first[k], second[k]) for k in first}
    if isinstance(first, (list, tuple)) and type(first) is type(second) and len(first) == len(second):
        return type(first)(concat_cond(a, b) for a, b in zip(first, second, strict=False))
    raise TypeError(f"cond structures differ: {type(first).__name__} vs {type(second).__name__}")


def tile_cond(cond: Any, k: int) -> Any:
    """``cond`` repeated ``k`` times along dim 0 (``[cond; cond; ...]``): the conditioning of a call that stacks
    ``k`` blocks of the same samples, e.g. several Inversion-DPO steps in one UNet call."""
    if k == 1 or cond is None:
        return cond
    if isinstance(cond, torch.Tensor):
        return cond.repeat(k, *([1] * (cond.dim() - 1)))
    if isinstance(cond, dict):
        return {key: tile_cond(v, k) for key, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(tile_cond(v, k) for v in cond)
    raise TypeError(f"cond must be a tensor, dict, list, tuple or None, got {type(cond).__name__}")


def zero_uncond(cond: Any, keep: Sequence[str] = ("time_ids",)) -> Any:
    """The Inversion-DPO unconditional branch (SPEC §4): every tensor of ``cond`` zeroed, except dict entries
    named in ``keep`` (SDXL's ``time_ids`` stay those of the conditional branch)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return torch.zeros_like(cond)
    if isinstance(cond, dict):
        return {k: (v if k in keep else zero_uncond(v, keep)) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(zero_uncond(v, keep) for v in cond)
    raise TypeError(f"cond must be a tensor, dict, list, tuple or None, got {type(cond).__name__}")


def _call_model(model: Model, x: torch.Tensor, level: int | float | torch.Tensor, cond: Any, model_dtype,
                out_dtype, *, t_dtype: torch.dtype = torch.int64, output: str = "eps") -> torch.Tensor:
    """One model call; ``level`` is one timestep for every sample or an ``(n,)`` tensor of per-sample ones, passed
    as ``t_dtype`` (int64 DDIM levels; float32 ``σ·T`` for flow models, whose output is a velocity)."""
    if isinstance(level, torch.Tensor):
        t = level.to(device=x.device, dtype=t_dtype)
    else:
        t = torch.full((x.shape[0],), level, dtype=t_dtype, device=x.device)
    pred = model(x if model_dtype is None else x.to(model_dtype), t, cond)
    if not isinstance(pred, torch.Tensor) or pred.shape != x.shape:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"the model must return {output} shaped like its input {tuple(x.shape)}, got {got}")
    return pred.to(out_dtype)


def guided_eps(
    model: Model,
    x: torch.Tensor,
    level: int | torch.Tensor,
    cond: Any,
    uncond: Any,
    guidance_scale: float,
    *,
    model_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``ε^cfg = ε(x, t, ∅) + g * (ε(x, t, c) - ε(x, t, ∅))`` with one model call on ``[x; x]``, float32 result.

    ``level`` is one timestep, or an ``(n,)`` tensor of per-sample timesteps. ``guidance_scale == 1`` makes a
    single conditional call (the same value, half the work).
    """
    out_dtype = reference.accumulation_dtype(x.dtype)
    if guidance_scale == 1.0:
        return _call_model(model, x, level, cond, model_dtype, out_dtype)
    both_levels = torch.cat([level, level]) if isinstance(level, torch.Tensor) else level
    both = _call_model(model, torch.cat([x, x], 0), both_levels, concat_cond(uncond, cond), model_dtype,
                       out_dtype)
    eps_u, eps_c = both.chunk(2, 0)
    return reference.cfg_combine(eps_u, eps_c, guidance_scale)


# ----------------------------------------------------------------------------------------------- DDIM-InPO
@dataclass
class InPOInversion:
    """Result of :func:`inpo_invert`.

    Attributes:
        latents: ``(2B, ...)`` the inverted latents ``x̃`` (float32; float64 for float64 ``z0``), caller's order.
        num_steps: ``(B,)`` int64, inversion steps (= policy evaluations) each pair took, in ``[1, K]``.
        end_levels: ``(B,)`` int64, the grid level each pair reached (not its ``t``; SPEC §3).
        num_model_calls: model calls made (= the largest ``num_steps``).
        samples_per_call: how many samples each call saw (``2 × active pairs``).
    """

    latents: torch.Tensor
    num_steps: torch.Tensor
    end_levels: torch.Tensor
    num_model_calls: int
    samples_per_call: list[int]


def _draw_noise(generator, shape, dtype, device) -> torch.Tensor:
    """N(0, I) noise of ``shape``: one draw from one generator, or one draw per row from a list of generators
    (each sample's draws then depend on nothing but its own generator: batch-independent)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in generator])


def inpo_invert(
    model: Model,
    z0: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    schedule: NoiseSchedule,
    *,
    num_levels: int = 10,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    model_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> InPOInversion:
    """DDIM-InPO policy inversion of a batch of pairs, each up to its own timestep (SPEC §3).

    For each source level ``τ`` of the grid (``g_{-1}, g_0, …, g_{K-2}``) in increasing order, the pairs with
    ``τ < t`` are active: one model call on exactly those samples (winners and losers of the active pairs,
    gathered into one batch) gives ``eps = ε_θ(x, τ, c)``, then ``x = step(x, eps, τ → τ + T//K)`` and
    ``x += η σ n`` with ``n ~ N(0, I)`` independent per sample. Pairs are laid out in order of decreasing step
    count, winner and loser side by side, so the active samples at every step are a prefix of the batch and each
    model call gets a view of it; results come back in the caller's order.

    Args:
        model: the **policy**, ``model(x, t, cond) -> eps``, called without grad (wrap it in ``torch.no_grad``
            yourself if it has parameters; this function does so).
        z0: ``(2B, ...)`` clean latents, winners first.
        t: ``(B,)`` int64, each pair's sampled training timestep in ``[0, T)``; on the CPU (no device sync to
            plan the batch sizes) or on ``z0``'s device.
        cond: conditioning pytree with ``2B`` rows (same as training, no CFG).
        schedule: the model's :class:`NoiseSchedule`.
        num_levels: K (official 10).
        eta: noise scale η >= 0 (official 0.1; 0 is deterministic).
        generator: one ``torch.Generator``, or one per sample (``2B`` of them, caller's order) so that each
            sample's noise does not depend on the rest of the batch; on ``z0``'s device.
        model_dtype: dtype the model input is cast to (the state itself stays float32).
        backend: backend of the inversion step (see :func:`ddim_inversion_step`).

    Returns:
        :class:`InPOInversion`. Costs one host sync (the step counts) when ``t`` is on an accelerator.
    """
    checks.tensor("z0", z0)
    B = checks.paired("z0", z0)
    checks.tensor("t", t, floating=False)
    if t.dtype.is_floating_point or t.dtype == torch.bool or tuple(t.shape) != (B,):
        raise ValueError(f"t must be an integer tensor of shape ({B},) (one timestep per pair), got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.device != z0.device and t.device.type != "cpu":
        raise ValueError(f"t must be on the CPU or on {z0.device} like z0, got {t.device}")
    eta = checks.finite_float("eta", eta, minimum=0.0)
    checks.cond_rows("cond", cond, 2 * B)
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != 2 * B or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator must be a torch.Generator or a sequence of {2 * B} of them (one per sample)")
    for g in [generator] if isinstance(generator, torch.Generator) else generator or []:
        if g.device.type != z0.device.type:
            raise ValueError(f"generator is on {g.device}, but z0 is on {z0.device}: noise is drawn on z0's device")
    T = schedule.num_train_timesteps
    t_host = t.tolist()  # the one host sync: step counts decide the batch size of every model call
    if min(t_host) < 0 or max(t_host) >= T:
        raise ValueError(f"t must lie in [0, {T}), got values in [{min(t_host)}, {max(t_host)}]")

    grid: InPOGrid = inpo_grid(schedule, num_levels)
    src_host = grid.source_levels.tolist()
    counts = [sum(1 for s in src_host if s < ti) for ti in t_host]
    # Prefix layout: pairs sorted by decreasing step count (stable), each pair's winner and loser side by side,
    # so the samples active at step k are the first 2 * n_k rows — a view, no gather, for every model call.
    order = sorted(range(B), key=lambda i: -counts[i])
    perm = [row for p in order for row in (p, p + B)]
    _, step_fn = dispatch.resolve("ddim_inversion_step", backend, (z0,))

    acc = reference.accumulation_dtype(z0.dtype)
    device = z0.device
    perm_index = torch.tensor(perm, dtype=torch.int64, device=device)
    x = z0.detach().to(acc).index_select(0, perm_index)  # a fresh float32 copy in prefix layout
    cond_perm = select_cond(cond, perm_index)
    gens = [generator[i] for i in perm] if isinstance(generator, list) else generator
    samples_per_call: list[int] = []
    with torch.no_grad():
        for k in range(max(counts)):
            n = 2 * sum(1 for c in counts if c > k)
            x_in = x[:n]
            eps = _call_model(model, x_in, src_host[k], slice_cond(cond_perm, n), model_dtype, acc)
            a_from = torch.full((n,), schedule.alpha_init if src_host[k] < 0 else
                                float(schedule.alphas_cumprod[src_host[k]]), dtype=acc, device=device)
            a_to = torch.full_like(a_from, float(schedule.alphas_cumprod[int(grid.levels[k])]))
            x_new = step_fn(x_in, eps, a_from, a_to)
            if eta > 0:
                sigma = inpo_noise_sigma(a_from[:1], a_to[:1])
                noise = _draw_noise(gens if not isinstance(gens, list) else gens[:n], (n, *x.shape[1:]), acc, device)
                x_new = x_new + eta * sigma.view(*([1] * x.dim())) * noise
            x[:n] = x_new
            samples_per_call.append(n)

    latents = torch.empty_like(x).index_copy_(0, perm_index, x)  # back to the caller's order
    num_steps = torch.tensor(counts, dtype=torch.int64, device=device)
    return InPOInversion(
        latents=latents,
        num_steps=num_steps,
        end_levels=grid.levels.to(device)[num_steps - 1],
        num_model_calls=len(samples_per_call),
        samples_per_call=samples_per_call,
    )


# ----------------------------------------------------------------------------------------------- Inversion-DPO
@dataclass
class InversionDPOTrajectory:
    """Result of :func:`inversion_dpo_trajectory`.

    Attributes:
        latents: ``(N, 2B, ...)`` float32, ``x^(i)`` for ``i = 0..N-1`` (``x^(0) = x^(1) = z0`` on SD configs).
        ref_eps: ``(N, 2B, ...)`` float32, the reference's guided ``ε_ref^cfg(x^(i), t_i, c)``.
        grid: the :class:`InversionDPOGrid` (timesteps ``t_i`` and weights ``w_i``).
    """

    latents: torch.Tensor
    ref_eps: torch.Tensor
    grid: InversionDPOGrid


def inversion_dpo_trajectory(
    ref_model: Model,
    z0: torch.Tensor,
    cond: Any,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 40,
    guidance_scale: float = 2.0,
    uncond: Any = None,
    model_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> InversionDPOTrajectory:
    """The deterministic Inversion-DPO trajectory of the **reference** model (SPEC §4).

    ``x^(0) = z0``; ``eps_i = ε_ref^cfg(x^(i), t_i, c)`` (evaluated at the *target* level ``t_i``, as the released
    code does), ``x^(i+1) = step(x^(i), eps_i, t_i - T//N → t_i)``. ``x^(N)`` is never used, so N model calls.

    Args:
        ref_model: ``model(x, t, cond) -> eps``, called without grad.
        z0: ``(2B, ...)`` clean latents (winners and losers are inverted together, in one batch).
        cond: conditioning pytree with ``2B`` rows.
        schedule: the model's :class:`NoiseSchedule`.
        num_steps: N (official SDXL 80, default 40).
        guidance_scale: g (official 2.0).
        uncond: the unconditional pytree; default :func:`zero_uncond` of ``cond`` (zero embeddings, same
            ``time_ids``).
        model_dtype: dtype the model input is cast to.
        backend: backend of the inversion step.
    """
    checks.tensor("z0", z0)
    B = checks.paired("z0", z0)
    guidance_scale = checks.finite_float("guidance_scale", guidance_scale)
    checks.cond_rows("cond", cond, 2 * B)
    grid = inversion_dpo_grid(schedule, num_steps)
    if uncond is None:
        uncond = zero_uncond(cond)
    checks.cond_rows("uncond", uncond, 2 * B)
    advance = _trajectory_stepper(z0, schedule, grid, backend)
    x = z0.detach().to(reference.accumulation_dtype(z0.dtype))
    latents, eps_all = [], []
    with torch.no_grad():
        for i in range(grid.num_steps):
            level = int(grid.timesteps[i])
            eps = guided_eps(ref_model, x, level, cond, uncond, float(guidance_scale), model_dtype=model_dtype)
            latents.append(x)
            eps_all.append(eps)
            x = advance(x, eps, i)
    return InversionDPOTrajectory(torch.stack(latents), torch.stack(eps_all), grid)


def _trajectory_stepper(z0: torch.Tensor, schedule: NoiseSchedule, grid: InversionDPOGrid, backend: str | None):
    """``advance(x, eps, i) -> x^(i+1)``: the DDIM step of Inversion-DPO step ``i`` (SPEC §4), one definition for
    the trajectory and its replay from cached ε."""
    _, step_fn = dispatch.resolve("ddim_inversion_step", backend, (z0,))
    acc = reference.accumulation_dtype(z0.dtype)
    n = z0.shape[0]

    def advance(x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        if i + 1 >= grid.num_steps:  # x^(N) is never used
            return x
        src = int(grid.source_levels[i])
        a_from = torch.full((n,), schedule.alpha_init if src < 0 else float(schedule.alphas_cumprod[src]),
                            dtype=acc, device=z0.device)
        a_to = torch.full_like(a_from, float(schedule.alphas_cumprod[int(grid.timesteps[i])]))
        return step_fn(x, eps, a_from, a_to)

    return advance


def replay_inversion_dpo_trajectory(
    z0: torch.Tensor,
    ref_eps: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    num_steps: int,
    backend: str | None = None,
) -> InversionDPOTrajectory:
    """The trajectory of :func:`inversion_dpo_trajectory` rebuilt from its ε (e.g. read from the on-disk cache of
    :mod:`fastinpo.data.trajectory_cache`) with N elementwise steps and no model call: ``x^(0) = z0``,
    ``x^(i+1) = step(x^(i), ref_eps[i], ...)``. Same steps, same backend, so the same latents.

    Args:
        z0: ``(2B, ...)`` clean latents.
        ref_eps: ``(N, 2B, ...)`` the reference's guided ε along the trajectory.
    """
    checks.tensor("z0", z0)
    grid = inversion_dpo_grid(schedule, num_steps)
    if ref_eps.shape != (grid.num_steps, *z0.shape):
        raise ValueError(f"ref_eps must be (N, *z0.shape) = {(grid.num_steps, *z0.shape)}, got {tuple(ref_eps.shape)}")
    advance = _trajectory_stepper(z0, schedule, grid, backend)
    acc = reference.accumulation_dtype(z0.dtype)
    x = z0.detach().to(acc)
    ref_eps = ref_eps.to(device=z0.device, dtype=acc)
    latents = []
    with torch.no_grad():
        for i in range(grid.num_steps):
            latents.append(x)
            x = advance(x, ref_eps[i], i)
    return InversionDPOTrajectory(torch.stack(latents), ref_eps, grid)
