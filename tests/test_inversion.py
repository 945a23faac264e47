"""DDIM inversion: the step against diffusers' arithmetic, the batched InPO inversion (per-pair timesteps,
batch independence, model calls on active samples only) and the Inversion-DPO trajectory (SPEC §3–4)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler

import fastinpo
from fastinpo.ops import reference
from fastinpo.ops.inversion import concat_cond, select_cond, zero_uncond
from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG, NoiseSchedule
from tests.conftest import randn
from tests.tolerances import assert_close_fp32, assert_matches

SD = NoiseSchedule.stable_diffusion()


def _inverse_scheduler(num_steps: int, **overrides) -> DDIMInverseScheduler:
    sched = DDIMInverseScheduler.from_config({**SD_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(num_steps)
    return sched


class RecordingModel:
    """A deterministic, per-sample ε model (each row depends only on its own x, t and cond row) that records
    every call: how many rows, which timesteps, which sample ids (``cond["id"]``)."""

    def __init__(self, channels: int = 4):
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels**0.5
        self.calls: list[dict] = []

    def __call__(self, x, t, cond):
        self.calls.append({"n": x.shape[0], "t": t.tolist(), "ids": cond["id"].tolist(), "dtype": x.dtype})
        h = torch.einsum("nchw,cd->ndhw", x.double(), self.w)
        emb = (t.double() / 1000.0).view(-1, 1, 1, 1) + cond["emb"].double().view(-1, 1, 1, 1)
        return torch.tanh(h + emb).to(x.dtype)


def _cond(n, gen):
    return {"id": torch.arange(n), "emb": randn(n, generator=gen)}


# ---------------------------------------------------------------- the step
@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_step_matches_diffusers_inverse_step_arithmetic(num_steps, gen):
    """diffusers (installed, >= 0.2x) labels an inverse step by its TARGET level b and steps from b - T//n;
    SPEC labels by the source. Compare the arithmetic from level a to level b, not the labels."""
    sched = _inverse_scheduler(num_steps)
    stride = 1000 // num_steps
    for b in (1 + stride * k for k in (0, 1, num_steps // 2, num_steps - 1)):
        a = b - stride
        x, eps = randn(3, 4, 9, 7, generator=gen), randn(3, 4, 9, 7, generator=gen)
        expected = sched.step(eps, b, x).prev_sample
        levels_from, levels_to = torch.full((3,), a), torch.full((3,), b)
        got = fastinpo.ddim_inversion_step(x, eps, SD.alphas_at(levels_from), SD.alphas_at(levels_to))
        assert_close_fp32(got, expected, what=f"step {a}->{b}")
        # and in float64 against the same diffusers arithmetic carried out in float64
        got64 = fastinpo.ddim_inversion_step(x.double(), eps.double(), SD.alphas_at(levels_from, torch.float64),
                                             SD.alphas_at(levels_to, torch.float64))
        assert_close_fp32(got64, expected, what=f"float64 step {a}->{b}")


def test_step_per_sample_alphas_and_dtypes(gen):
    levels_from = torch.tensor([-99, 1, 401, 801, 0])
    levels_to = levels_from + 100
    a_from, a_to = SD.alphas_at(levels_from), SD.alphas_at(levels_to)
    x64 = randn(5, 4, 13, 17, generator=gen, dtype=torch.float64)
    e64 = randn(5, 4, 13, 17, generator=gen, dtype=torch.float64)
    expected = reference.ddim_inversion_step(x64, e64, a_from.double(), a_to.double())
    for i in range(5):  # each row is a plain scalar-alpha step
        sched = _inverse_scheduler(10)
        row = sched.step(e64[i:i + 1].float(), int(levels_to[i]), x64[i:i + 1].float()).prev_sample
        assert_close_fp32(expected[i:i + 1], row, what=f"row {i}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, e = x64.to(dtype), e64.to(dtype)
        got = fastinpo.ddim_inversion_step(x, e, a_from, a_to)
        assert got.dtype == dtype
        exp = reference.ddim_inversion_step(x.double(), e.double(), a_from.double(), a_to.double())
        shape = (-1, 1, 1, 1)
        af, at = a_from.to(dtype).view(shape), a_to.to(dtype).view(shape)
        plain = at.sqrt() * (x - (1 - af).sqrt() * e) / af.sqrt() + (1 - at).sqrt() * e
        assert_matches(got, exp, dtype=dtype, plain=plain, what=f"{dtype} step")


# ---------------------------------------------------------------- DDIM-InPO inversion
def test_inpo_inversion_matches_diffusers_loop_spec_example(gen):
    """t = 450 takes the steps from -99, 1, 101, 201, 301, 401 and ends at level 501 (SPEC §3)."""
    model = RecordingModel()
    z0 = randn(2, 4, 6, 5, generator=gen)
    cond = _cond(2, gen)
    inv = fastinpo.inpo_invert(model, z0, torch.tensor([450]), cond, SD)
    assert inv.num_steps.tolist() == [6] and inv.end_levels.tolist() == [501]
    assert [c["t"][0] for c in model.calls] == [-99, 1, 101, 201, 301, 401]
    sched = _inverse_scheduler(10)
    x = z0.clone()
    for source in (-99, 1, 101, 201, 301, 401):
        eps = RecordingModel()(x, torch.full((2,), source), cond)
        x = sched.step(eps, source + 100, x).prev_sample  # diffusers labels by the target level
    assert inv.latents.dtype == torch.float32
    assert_close_fp32(inv.latents, x, what="inverted latents")


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_inpo_batch_independence_and_active_calls(eta, gen):
    t = torch.tensor([450, 0, 999, 120, 1])
    B = t.shape[0]
    z0 = randn(2 * B, 4, 6, 5, generator=gen)
    cond = _cond(2 * B, gen)
    seeds = [100 + i for i in range(2 * B)]
    model = RecordingModel()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    inv = fastinpo.inpo_invert(model, z0, t, cond, SD, eta=eta, generator=gens)

    steps = [6, 1, 10, 3, 1]
    assert inv.num_steps.tolist() == steps
    assert inv.num_model_calls == max(steps) == len(model.calls)
    source_levels = [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801]
    for k, call in enumerate(model.calls):
        active = [i for i in range(B) if steps[i] > k]
        assert sorted(call["ids"]) == sorted(active + [i + B for i in active])  # active samples only
        assert call["n"] == 2 * len(active) and set(call["t"]) == {source_levels[k]}
    assert inv.samples_per_call == [c["n"] for c in model.calls]

    for i in range(B):  # pair by pair, alone, with the same per-sample noise generators
        rows = torch.tensor([i, i + B])
        alone = fastinpo.inpo_invert(
            RecordingModel(), z0[rows], t[i:i + 1], select_cond(cond, rows), SD, eta=eta,
            generator=[torch.Generator().manual_seed(seeds[i]), torch.Generator().manual_seed(seeds[i + B])],
        )
        assert_close_fp32(inv.latents[rows], alone.latents, what=f"pair {i}")


def test_inpo_noise_is_used_and_reproducible(gen):
    t = torch.tensor([700, 300])
    z0, cond = randn(4, 4, 6, 5, generator=gen), _cond(4, gen)
    det = fastinpo.inpo_invert(RecordingModel(), z0, t, cond, SD, eta=0.0)
    a = fastinpo.inpo_invert(RecordingModel(), z0, t, cond, SD, eta=0.1, generator=torch.Generator().manual_seed(3))
    b = fastinpo.inpo_invert(RecordingModel(), z0, t, cond, SD, eta=0.1, generator=torch.Generator().manual_seed(3))
    c = fastinpo.inpo_invert(RecordingModel(), z0, t, cond, SD, eta=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents) and not torch.equal(a.latents, det.latents)
    # winner and loser of a pair get different noise: their deviations from the deterministic path differ
    dev = a.latents - det.latents
    assert not torch.allclose(dev[0], dev[2])


def test_inpo_model_dtype_casts_input_only(gen):
    model = RecordingModel()
    inv = fastinpo.inpo_invert(model, randn(2, 4, 6, 5, generator=gen), torch.tensor([250]), _cond(2, gen), SD,
                               model_dtype=torch.bfloat16)
    assert {c["dtype"] for c in model.calls} == {torch.bfloat16}
    assert inv.latents.dtype == torch.float32


def test_inpo_bad_inputs(gen):
    z0, cond = randn(4, 4, 6, 5, generator=gen), _cond(4, gen)
    with pytest.raises(ValueError, match=r"t must be an integer tensor of shape \(2,\)"):
        fastinpo.inpo_invert(RecordingModel(), z0, torch.tensor([1.0, 2.0]), cond, SD)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        fastinpo.inpo_invert(RecordingModel(), z0, torch.tensor([5, 1000]), cond, SD)
    with pytest.raises(ValueError, match="even"):
        fastinpo.inpo_invert(RecordingModel(), z0[:3], torch.tensor([5]), cond, SD)
    with pytest.raises(ValueError, match="eta"):
        fastinpo.inpo_invert(RecordingModel(), z0, torch.tensor([5, 6]), cond, SD, eta=-0.1)
    with pytest.raises(ValueError, match="one per sample"):
        fastinpo.inpo_invert(RecordingModel(), z0, torch.tensor([5, 6]), cond, SD, eta=0.1,
                             generator=[torch.Generator()])
    with pytest.raises(ValueError, match="eps shaped like"):
        fastinpo.inpo_invert(lambda x, t, c: x[:, :1], z0, torch.tensor([5, 6]), cond, SD)


# ---------------------------------------------------------------- Inversion-DPO trajectory
def test_trajectory_matches_manual_cfg_loop(gen):
    N, g = 10, 2.0
    z0 = randn(4, 4, 6, 5, generator=gen)
    cond = {"id": torch.arange(4), "emb": randn(4, generator=gen), "time_ids": randn(4, 6, generator=gen)}
    model = RecordingModel()
    traj = fastinpo.inversion_dpo_trajectory(model, z0, cond, SD, num_steps=N, guidance_scale=g)
    assert traj.latents.shape == traj.ref_eps.shape == (N, 4, 4, 6, 5)
    assert len(model.calls) == N  # one call per grid point on [uncond; cond]
    assert [c["t"][0] for c in model.calls] == list(range(0, 1000, 100))  # evaluated at the TARGET level t_i
    assert all(c["n"] == 8 for c in model.calls)

    # the first step is the identity (ᾱ_init = ᾱ_0 = ᾱ_{t_0}), so x^(1) = x^(0) = z0
    assert torch.equal(traj.latents[0], z0)
    assert_close_fp32(traj.latents[1], z0, what="x^(1)")

    sched = _inverse_scheduler(N, steps_offset=0)
    uncond = zero_uncond(cond)
    assert torch.equal(uncond["time_ids"], cond["time_ids"]) and not uncond["emb"].any()
    x = z0.clone()
    for i, t_i in enumerate(range(0, 1000, 100)):
        both = RecordingModel()(torch.cat([x, x]), torch.full((8,), t_i), concat_cond(uncond, cond))
        eps = reference.cfg_combine(*both.chunk(2), g)
        assert_close_fp32(traj.latents[i], x, what=f"x^({i})")
        assert_close_fp32(traj.ref_eps[i], eps, what=f"eps_{i}")
        x = sched.step(eps, t_i, x).prev_sample  # from t_i - T//N to t_i (diffusers labels by the target)
    w = traj.grid.weights
    assert_close_fp32(w, 1 / (2 * SD.alphas_cumprod[torch.arange(0, 1000, 100)].double()), what="weights")


def test_trajectory_guidance_one_is_a_single_conditional_call(gen):
    model = RecordingModel()
    cond = _cond(2, gen)
    traj = fastinpo.inversion_dpo_trajectory(model, randn(2, 4, 6, 5, generator=gen), cond, SD, num_steps=4,
                                             guidance_scale=1.0)
    assert [c["n"] for c in model.calls] == [2, 2, 2, 2]
    assert traj.ref_eps.shape == (4, 2, 4, 6, 5)


def test_cond_helpers_reject_mismatched_structures():
    with pytest.raises(TypeError, match="differ"):
        concat_cond({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(TypeError, match="cond must be"):
        select_cond("text", torch.tensor([0]))
