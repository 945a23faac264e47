"""Flow-matching ops (SPEC §7): the training table and timestep density against diffusers, forward noising and the
velocity target, the InPO-for-flows levels, the Euler inversion (straight-line check, per-pair σ batch
independence, model calls on active samples only) and the Euler step op's reference backend and input checks.
The fast backends of the Euler step are tested in tests/test_extension_flow.py, tests/triton and
tests/test_ops_cuda.py."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

import fastinpo
from fastinpo.ops import reference
from fastinpo.ops.flow import (
    DEFAULT_MODE_SCALE,
    SD3_SCHEDULER_CONFIG,
    WEIGHTING_SCHEMES,
    FlowSchedule,
    flow_inpo_levels,
    per_sample,
)
from fastinpo.ops.inversion import select_cond
from tests.conftest import randn
from tests.tolerances import FLOAT32_ATOL, FLOAT32_RTOL, assert_close_fp32, assert_matches

SD3 = FlowSchedule.sd3()
EPS32 = torch.finfo(torch.float32).eps
CONFIGS = [
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},  # SD3 / SD3.5
    {"num_train_timesteps": 1000, "shift": 1.0},
    {"num_train_timesteps": 1000, "shift": 3},  # an int shift, as a hand-written config may say
    {"num_train_timesteps": 97, "shift": 6.5},
]


class VelocityModel:
    """A deterministic, per-sample velocity model (each row depends only on its own x, timestep and cond row) that
    records every call: how many rows, which timesteps, which sample ids (``cond["id"]``), the input dtype."""

    def __init__(self, channels: int = 4):
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels**0.5
        self.calls: list[dict] = []

    def __call__(self, x, t, cond):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        self.calls.append({"n": x.shape[0], "t": t.tolist(), "ids": cond["id"].tolist(), "dtype": x.dtype})
        h = torch.einsum("nchw,cd->ndhw", x.double(), self.w)
        emb = (t.double() / 1000.0).view(-1, 1, 1, 1) + cond["emb"].double().view(-1, 1, 1, 1)
        return (2 * torch.tanh(h + emb)).to(x.dtype)


def _cond(n, gen):
    return {"id": torch.arange(n), "emb": randn(n, generator=gen)}


# ---------------------------------------------------------------- the training table
@pytest.mark.parametrize("config", CONFIGS)
def test_schedule_equals_diffusers_tables(config):
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = FlowSchedule.from_config(config)
    assert ours.sigmas.dtype == ours.timesteps.dtype == torch.float32
    assert ours.num_train_timesteps == config["num_train_timesteps"]
    assert torch.equal(ours.sigmas, sched.sigmas) and torch.equal(ours.timesteps, sched.timesteps)
    # and SPEC §7's closed form in float64: s_i = (T - i) / T, σ_i = shift s_i / (1 + (shift - 1) s_i)
    T, shift = config["num_train_timesteps"], float(config["shift"])
    s = (T - torch.arange(T, dtype=torch.float64)) / T
    assert_close_fp32(ours.sigmas, shift * s / (1 + (shift - 1) * s), what="σ table")
    assert float(ours.sigmas[0]) == 1.0 and bool((ours.sigmas[1:] < ours.sigmas[:-1]).all())


def test_schedule_from_folder_file_and_scheduler(tmp_path):
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0",
              "num_train_timesteps": 1000, "shift": 3.0}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    for source in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json",
                   FlowMatchEulerDiscreteScheduler.from_config(config)):
        got = FlowSchedule.from_config(source)
        assert torch.equal(got.sigmas, SD3.sigmas) and got.shift == 3.0
    assert FlowSchedule.from_config(SD3_SCHEDULER_CONFIG).shift == 3.0


def test_schedule_refuses_dynamic_shifting_and_other_configs(tmp_path):
    with pytest.raises(ValueError, match="use_dynamic_shifting.*FLUX"):
        FlowSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    for key, value in (("use_karras_sigmas", True), ("invert_sigmas", True), ("shift_terminal", 0.02)):
        with pytest.raises(ValueError, match=key):
            FlowSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0, key: value})
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler.*DDIMScheduler"):
        FlowSchedule.from_config({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000})
    for shift in (0, -1.0, float("nan"), "3", True):
        with pytest.raises(ValueError, match="shift must be"):
            FlowSchedule.from_config({"num_train_timesteps": 1000, "shift": shift})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowSchedule.from_config({"num_train_timesteps": 0, "shift": 3.0})
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        FlowSchedule.from_config(tmp_path)


# ---------------------------------------------------------------- the timestep density
@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("params", [{}, {"logit_mean": 0.4, "logit_std": 1.7, "mode_scale": 0.8}])
def test_density_equals_diffusers_same_generator_same_draws(scheme, params):
    full = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": DEFAULT_MODE_SCALE, **params}
    ours_gen, theirs_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for batch in (1, 7, 64):
        ours = fastinpo.flow_density(scheme, batch, generator=ours_gen, **params)
        theirs = compute_density_for_timestep_sampling(scheme, batch, generator=theirs_gen, **full)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), (scheme, batch)
    # the same number of draws consumed: the generators stay in step
    assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_sample_flow_sigmas_indexes_the_table_like_diffusers_sd3_scripts(scheme):
    B = 257
    got = fastinpo.sample_flow_sigmas(SD3, B, weighting_scheme=scheme, generator=torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(scheme, B, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=DEFAULT_MODE_SCALE, generator=torch.Generator().manual_seed(5))
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    indices = (u * 1000).long()  # train_dreambooth_sd3.py: indices = (u * num_train_timesteps).long()
    assert torch.equal(got.u, u) and torch.equal(got.indices, indices)
    assert torch.equal(got.timesteps, sched.timesteps[indices]) and torch.equal(got.sigmas, sched.sigmas[indices])
    # one σ per pair, shared by winner and loser: winners first, then losers (SPEC §1)
    per = got.per_sample_sigmas()
    assert per.shape == (2 * B,) and torch.equal(per[:B], got.sigmas) and torch.equal(per[B:], got.sigmas)
    assert torch.equal(got.per_sample_timesteps(), per_sample(got.timesteps))
    if scheme == "logit_normal":  # the density's shape: u = sigmoid(N(0, 1)) has median 1/2
        assert 0.35 < float(got.u.median()) < 0.65


def test_sample_flow_sigmas_clips_the_index_to_the_table():
    # mode_scale < 0 pushes u above 1 for small draws: floor(u T) would index past the table; SPEC clips to T - 1
    got = fastinpo.sample_flow_sigmas(SD3, 400, weighting_scheme="mode", mode_scale=-2.0,
                                      generator=torch.Generator().manual_seed(0))
    assert bool((got.u >= 1).any())
    assert int(got.indices.max()) == 999 and int(got.indices.min()) >= 0
    assert torch.equal(got.sigmas, SD3.sigmas[got.indices])


def test_density_bad_inputs():
    with pytest.raises(ValueError, match="weighting_scheme.*logit_normal, uniform, mode"):
        fastinpo.flow_density("cosmap", 4)
    with pytest.raises(ValueError, match="batch_size"):
        fastinpo.flow_density("uniform", 0)
    with pytest.raises(ValueError, match="logit_std"):
        fastinpo.flow_density("logit_normal", 4, logit_std=-1.0)
    with pytest.raises(TypeError, match="indices must be an integer"):
        SD3.sigmas_at(torch.tensor([0.5]))


# ---------------------------------------------------------------- noising and target
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flow_noise_and_target(dtype, gen):
    n = 5
    z0_64, eps_64 = randn(n, 4, 9, 7, generator=gen, dtype=torch.float64), randn(n, 4, 9, 7, generator=gen,
                                                                                 dtype=torch.float64)
    sigma = SD3.sigmas[torch.tensor([0, 1, 500, 998, 999])]
    z0, eps = z0_64.to(dtype), eps_64.to(dtype)
    x = fastinpo.flow_noise(z0, eps, sigma)
    v = fastinpo.flow_target(z0, eps)
    assert x.dtype == v.dtype == torch.float32  # float32 whatever the input dtype (SPEC §7, §1)
    s = sigma.double().view(-1, 1, 1, 1)
    assert_close_fp32(x, (1 - s) * z0.double() + s * eps.double(), what="x")
    assert_close_fp32(v, eps.double() - z0.double(), what="v")
    # diffusers' FlowMatchEulerDiscreteScheduler.scale_noise: sigma * noise + (1 - sigma) * sample
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    theirs = sched.scale_noise(z0.float(), SD3.timesteps[torch.tensor([0, 1, 500, 998, 999])], eps.float())
    assert_close_fp32(x, theirs.double(), what="scale_noise")
    # σ = 0 is z0, σ = 1 is ε, exactly
    ends = fastinpo.flow_noise(z0_64[:2], eps_64[:2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(ends[0], z0_64[0]) and torch.equal(ends[1], eps_64[1])


def test_flow_inpo_target_formula(gen):
    z0, x = randn(4, 3, 5, 5, generator=gen, dtype=torch.float64), randn(4, 3, 5, 5, generator=gen,
                                                                          dtype=torch.float64)
    sigma = torch.tensor([0.003, 0.25, 0.9, 1.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    expected = (x - (1 - s) * z0) / s - z0
    assert_close_fp32(fastinpo.flow_inpo_target(x, z0, sigma), expected, what="v* float64")
    got32 = fastinpo.flow_inpo_target(x.float(), z0.float(), sigma.float())
    assert got32.dtype == torch.float32
    plain = (x.float() - (1 - s.float()) * z0.float()) / s.float() - z0.float()
    assert_matches(got32, expected, dtype=torch.float32, plain=plain, what="v* float32")


def test_noise_and_target_bad_inputs(gen):
    z0 = randn(4, 3, 5, 5, generator=gen)
    with pytest.raises(ValueError, match=r"sigma must have shape \(4,\)"):
        fastinpo.flow_noise(z0, z0, torch.rand(2))
    with pytest.raises(ValueError, match="shapes must match"):
        fastinpo.flow_target(z0, z0[:2])
    with pytest.raises(ValueError, match=r"sigma_t must have shape \(4,\)"):
        fastinpo.flow_inpo_target(z0, z0, torch.rand(4, 1))


# ---------------------------------------------------------------- InPO-for-flows levels
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("K", [1, 2, 3, 10, 28, 50])
def test_levels_equal_reversed_set_timesteps_with_zero_prepended(config, K):
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(K)
    assert float(sched.sigmas[-1]) == 0.0  # diffusers appends the terminal 0: reversed, it is g_0
    levels = flow_inpo_levels(FlowSchedule.from_config(config), K)
    assert levels.num_levels == K and levels.num_train_timesteps == config["num_train_timesteps"]
    assert levels.sigmas.dtype == torch.float32 and torch.equal(levels.sigmas, sched.sigmas.flip(0))
    assert float(levels.sigmas[0]) == 0.0 and float(levels.sigmas[-1]) == 1.0
    assert bool((levels.sigmas[1:] > levels.sigmas[:-1]).all())
    assert torch.equal(levels.timesteps, levels.sigmas * config["num_train_timesteps"])


def test_levels_default_k_and_bad_k():
    assert flow_inpo_levels(SD3).num_levels == 10
    for K in (0, 1001, 2.0, True):
        with pytest.raises(ValueError, match="num_levels"):
            flow_inpo_levels(SD3, K)


# ---------------------------------------------------------------- the Euler inversion
def _sigmas_around_levels(levels) -> torch.Tensor:
    """Per-pair σ_t: the table's smallest, exactly on levels, between levels, and 1."""
    g = levels.sigmas
    return torch.stack([SD3.sigmas[-1], g[1], (g[1] + g[2]) / 2, g[5], SD3.sigmas[300], g[-2] + 1e-3, g[-1]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_straight_line_check(dtype, gen):
    """SPEC §7: a model that predicts the exact constant velocity ε - z0 of a straight line recovers
    x̃ = (1 - σ_t) z0 + σ_t ε and v* = ε - z0 (up to rounding)."""
    levels = flow_inpo_levels(SD3, 10)
    sigma_t = _sigmas_around_levels(levels)
    B = sigma_t.shape[0]
    z0 = randn(2 * B, 4, 6, 5, generator=gen, dtype=dtype)
    eps = per_sample(randn(B, 4, 6, 5, generator=gen, dtype=dtype))  # one ε per pair
    cond = {"id": torch.arange(2 * B)}

    def exact_velocity(x, t, c):
        return (eps - z0)[c["id"]].to(x.dtype)

    inv = fastinpo.flow_inpo_invert(exact_velocity, z0, sigma_t.to(dtype), cond, levels)
    assert inv.latents.dtype == inv.target.dtype == dtype
    s = per_sample(sigma_t).double().view(-1, 1, 1, 1)
    x_expected = (1 - s) * z0.double() + s * eps.double()
    v_expected = eps.double() - z0.double()
    if dtype == torch.float64:
        assert_close_fp32(inv.latents, x_expected, rtol=1e-12, atol=1e-12, what="x̃ (float64 state)")
        assert_close_fp32(inv.target, v_expected, rtol=1e-9, atol=1e-9, what="v* (float64 state)")
    else:
        # float32 rounding: each of up to K steps rounds x + Δσ v once at the magnitude M of the terms, and the
        # clipped Δσ is rounded once; v* divides x̃'s error by σ_t (a wrong or unclipped step is off by Δσ |v|,
        # orders of magnitude more)
        M = float(z0.abs().max() + eps.abs().max())
        steps = per_sample(inv.num_steps).double().view(-1, 1, 1, 1)
        x_tol = (steps + 1) * EPS32 * M
        err_x = (inv.latents.double() - x_expected).abs()
        assert bool((err_x <= x_tol).all()), float((err_x - x_tol).max())
        v_tol = (x_tol + EPS32 * M) / s + 2 * EPS32 * M
        err_v = (inv.target.double() - v_expected).abs()
        assert bool((err_v <= v_tol).all()), float((err_v - v_tol).max())
    # the σ_t that sit exactly on a level end their last step there; the smallest σ takes one step
    assert inv.num_steps.tolist() == [1, 1, 2, 5, levels.num_steps(SD3.sigmas[300:301]).item(), 10, 10]


def test_inversion_matches_a_manual_euler_loop(gen):
    """The arithmetic of SPEC §7 written out for one pair: x ← x + (min(g_{k+1}, σ_t) - g_k) v(x, g_k T)."""
    levels = flow_inpo_levels(SD3, 10)
    z0, cond = randn(2, 4, 6, 5, generator=gen), _cond(2, gen)
    sigma_t = SD3.sigmas[137:138]  # between two levels
    model = VelocityModel()
    inv = fastinpo.flow_inpo_invert(model, z0, sigma_t, cond, levels)
    g = levels.sigmas.tolist()
    x, k, ref = z0.clone(), 0, VelocityModel()
    while g[k] < float(sigma_t):
        v = ref(x, torch.full((2,), g[k] * 1000, dtype=torch.float32), cond)
        d = torch.minimum(sigma_t, levels.sigmas[k + 1]) - levels.sigmas[k]
        x = x + d * v
        k += 1
    assert inv.num_steps.tolist() == [k] and [c["t"][0] for c in model.calls] == [c["t"][0] for c in ref.calls]
    assert model.calls[0]["t"] == [0.0, 0.0]  # the first call at timestep 0
    assert_close_fp32(inv.latents, x, what="x̃")
    assert_close_fp32(inv.target, fastinpo.flow_inpo_target(x, z0, per_sample(sigma_t)), what="v*")


def test_inversion_batch_independence_and_active_calls(gen):
    levels = flow_inpo_levels(SD3, 10)
    sigma_t = torch.stack([SD3.sigmas[450], SD3.sigmas[-1], levels.sigmas[-1], SD3.sigmas[120], levels.sigmas[3]])
    B = sigma_t.shape[0]
    z0, cond = randn(2 * B, 4, 6, 5, generator=gen), _cond(2 * B, gen)
    model = VelocityModel()
    inv = fastinpo.flow_inpo_invert(model, z0, sigma_t, cond, levels)

    g = levels.sigmas.tolist()
    steps = [sum(1 for k in range(10) if g[k] < float(s)) for s in sigma_t]
    assert inv.num_steps.tolist() == steps == levels.num_steps(sigma_t).tolist()
    assert inv.num_model_calls == max(steps) == len(model.calls)
    timesteps = levels.timesteps.tolist()
    for k, call in enumerate(model.calls):
        active = [i for i in range(B) if steps[i] > k]
        assert sorted(call["ids"]) == sorted(active + [i + B for i in active])  # active samples only
        assert call["n"] == 2 * len(active) and set(call["t"]) == {timesteps[k]}
    assert inv.samples_per_call == [c["n"] for c in model.calls]
    assert sum(inv.samples_per_call) == 2 * sum(steps)  # rows the model saw = 2 × steps of every pair

    for i in range(B):  # pair by pair, alone: its result does not depend on the others in the batch
        rows = torch.tensor([i, i + B])
        alone = fastinpo.flow_inpo_invert(VelocityModel(), z0[rows], sigma_t[i:i + 1], select_cond(cond, rows),
                                          levels)
        assert_close_fp32(inv.latents[rows], alone.latents, what=f"pair {i} x̃")
        assert_close_fp32(inv.target[rows], alone.target, what=f"pair {i} v*")


def test_inversion_sigma_on_device_of_z0_and_model_dtype(gen):
    model = VelocityModel()
    levels = flow_inpo_levels(SD3, 4)
    inv = fastinpo.flow_inpo_invert(model, randn(2, 4, 6, 5, generator=gen), torch.tensor([0.7]), _cond(2, gen),
                                    levels, model_dtype=torch.bfloat16)
    assert {c["dtype"] for c in model.calls} == {torch.bfloat16}
    assert inv.latents.dtype == inv.target.dtype == torch.float32


def test_inversion_bad_inputs(gen):
    levels = flow_inpo_levels(SD3, 10)
    z0, cond = randn(4, 4, 6, 5, generator=gen), _cond(4, gen)
    ok = torch.tensor([0.5, 0.7])
    with pytest.raises(ValueError, match="even"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0[:3], ok, cond, levels)
    with pytest.raises(ValueError, match=r"sigma_t must have shape \(2,\)"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0, torch.tensor([0.5]), cond, levels)
    with pytest.raises(TypeError, match="sigma_t must have a floating dtype"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0, torch.tensor([1, 1]), cond, levels)
    for bad in (0.0, 1.5, math.nan, -0.2):
        with pytest.raises(ValueError, match=r"sigma_t must lie in \(0, 1\]"):
            fastinpo.flow_inpo_invert(VelocityModel(), z0, torch.tensor([0.5, bad]), cond, levels)
    with pytest.raises(TypeError, match="levels must be a FlowInPOLevels"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0, ok, cond, levels.sigmas)
    with pytest.raises(ValueError, match="4 rows"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0, ok, _cond(2, gen), levels)
    with pytest.raises(ValueError, match="velocity shaped like"):
        fastinpo.flow_inpo_invert(lambda x, t, c: x[:, :1], z0, ok, cond, levels)
    with pytest.raises(TypeError, match="z0 must have a floating dtype"):
        fastinpo.flow_inpo_invert(VelocityModel(), z0.long(), ok, cond, levels)


# ---------------------------------------------------------------- the Euler step: reference backend, checks
def test_euler_step_reference_per_sample_and_dtypes(gen):
    n = 5
    x64, v64 = randn(n, 4, 13, 17, generator=gen, dtype=torch.float64), randn(n, 4, 13, 17, generator=gen,
                                                                               dtype=torch.float64)
    d = torch.tensor([0.0089, 0.27, -0.05, 1.0, 0.0])
    expected = reference.flow_euler_step(x64, v64, d.double())
    for i in range(n):  # each row is a plain scalar step
        assert torch.equal(expected[i], x64[i] + float(d[i].double()) * v64[i])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, v = x64.to(dtype), v64.to(dtype)
        got = fastinpo.flow_euler_step(x, v, d, backend="reference")
        assert got.dtype == dtype
        exp = reference.flow_euler_step(x.double(), v.double(), d.double())
        plain = x + d.to(dtype).view(-1, 1, 1, 1) * v
        assert_matches(got, exp, dtype=dtype, plain=plain, what=f"{dtype} Euler step")
    assert FLOAT32_RTOL and FLOAT32_ATOL  # the tolerance table the comparisons above read


def test_euler_step_bad_inputs(gen):
    x, v = randn(3, 4, 5, generator=gen), randn(3, 4, 5, generator=gen)
    d = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="shapes must match"):
        fastinpo.flow_euler_step(x, v[:, :2], d)
    with pytest.raises(ValueError, match=r"d_sigma must have shape \(3,\)"):
        fastinpo.flow_euler_step(x, v, d[:2])
    with pytest.raises(ValueError, match="d_sigma must be finite"):
        fastinpo.flow_euler_step(x, v, torch.tensor([0.1, math.inf, 0.3]))
    with pytest.raises(TypeError, match="d_sigma must have a floating dtype"):
        fastinpo.flow_euler_step(x, v, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        fastinpo.flow_euler_step(x, 0.5, d)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fastinpo.flow_euler_step(x.long(), v, d)
    with pytest.raises(ValueError, match="n >= 1"):
        fastinpo.flow_euler_step(x[:0], v[:0], d[:0])
    with pytest.raises(ValueError, match="unknown backend"):
        fastinpo.flow_euler_step(x, v, d, backend="cuda")
    # float64 stays on the reference: Triton (where installed) refuses it by name; without Triton it is not registered
    triton_message = ("backend 'triton' cannot run flow_euler_step here: float64" if importlib.util.find_spec("triton")
                      else "backend 'triton' is not implemented for flow_euler_step")
    with pytest.raises(ValueError, match=triton_message):
        fastinpo.flow_euler_step(x.double(), v.double(), d.double(), backend="triton")


def test_schedule_device_tables_are_cached():
    sched = FlowSchedule.from_config(SD3_SCHEDULER_CONFIG)
    sigmas, timesteps = sched.tables("cpu")
    assert sched.tables(torch.device("cpu"))[0] is sigmas  # one copy per device, reused every step
    assert torch.equal(sigmas, sched.sigmas) and torch.equal(timesteps, sched.timesteps)


def test_num_steps_is_the_inversions_own_count(gen):
    """A caller that plans the policy calls ahead (ZeRO-3 lockstep pads every rank to the same count) must get the
    inversion's own counts, σ_t exactly on a level and float64 state included."""
    levels = flow_inpo_levels(SD3, 10)
    sigma_t = torch.cat([levels.sigmas[1:], SD3.sigmas[::97]])
    B = sigma_t.shape[0]
    for dtype in (torch.float32, torch.float64):
        z0 = randn(2 * B, 2, 3, 3, generator=gen, dtype=dtype)
        model = VelocityModel(channels=2)
        inv = fastinpo.flow_inpo_invert(model, z0, sigma_t.to(dtype), _cond(2 * B, gen), levels)
        assert torch.equal(inv.num_steps, levels.num_steps(sigma_t.to(dtype)))
        assert inv.num_steps[:10].tolist() == list(range(1, 11))  # σ_t = g_k takes k steps
