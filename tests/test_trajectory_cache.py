"""The Inversion-DPO reference-trajectory cache and the batched policy steps: a cached (replayed) trajectory is the
computed one bit for bit, the training with a cache is the training without one, a config whose pair inputs
change from epoch to epoch is refused, and a cache made for another setup is refused."""

from __future__ import annotations

import pytest
import torch

from fastinpo.config import MethodConfig, load_config
from fastinpo.data.trajectory_cache import StaleTrajectoryCacheError, TrajectoryCache
from fastinpo.methods import build_method
from fastinpo.methods.base import Models, PairRandomness, StepInputs
from fastinpo.ops.inversion import inversion_dpo_trajectory, replay_inversion_dpo_trajectory
from fastinpo.train import train
from tests.test_train import _config, _metrics, _weights
from tests.tolerances import assert_close_fp32, assert_close_model_grad


def _inputs(B: int, seed: int = 1) -> StepInputs:
    g = torch.Generator().manual_seed(seed)
    return StepInputs(torch.randn(2 * B, 4, 16, 16, generator=g),
                      {"encoder_hidden_states": torch.randn(2 * B, 77, 32, generator=g)},
                      PairRandomness.for_positions(0, list(range(B)), "cpu"), rows=torch.arange(10, 10 + B))


def _loss_and_grad(unet, models, method, inputs):
    unet.zero_grad()
    out = method(inputs, models, loss_scale=0.5)
    if not out.backward_done:
        (out.loss * 0.5).backward()
    return out.loss.detach(), torch.cat([p.grad.flatten() for p in unet.parameters()])


@pytest.mark.parametrize("B", [1, 2])
def test_replayed_trajectory_is_the_computed_one_bit_for_bit(moved_sd15_models, B):
    _, models, schedule = moved_sd15_models
    inputs = _inputs(B)
    traj = inversion_dpo_trajectory(models.reference, inputs.z0, inputs.cond, schedule, num_steps=5)
    replay = replay_inversion_dpo_trajectory(inputs.z0, traj.ref_eps, schedule, num_steps=5)
    assert torch.equal(replay.latents, traj.latents) and torch.equal(replay.ref_eps, traj.ref_eps)
    assert not torch.equal(traj.latents[2], traj.latents[1])  # the trajectory moves (a replay of nothing fails)
    with pytest.raises(ValueError, match="ref_eps must be"):
        replay_inversion_dpo_trajectory(inputs.z0, traj.ref_eps[:-1], schedule, num_steps=5)


@pytest.mark.parametrize(("grad_k", "nograd_k", "light"), [(2, 3, True), (5, 5, True), (2, 1, False), (3, 8, False)])
def test_batched_policy_steps_give_the_per_step_gradient(moved_sd15_models, grad_k, nograd_k, light):
    """Several trajectory steps in one UNet call (per-sample timesteps, ragged last chunk) = one call per step."""
    unet, models, schedule = moved_sd15_models
    inputs = _inputs(2)
    base = build_method(MethodConfig(name="inversion-dpo", beta=50.0, num_steps=5, memory_light=False,
                                     grad_steps_per_call=1), schedule)
    batched = build_method(MethodConfig(name="inversion-dpo", beta=50.0, num_steps=5, memory_light=light,
                                        grad_steps_per_call=grad_k, nograd_steps_per_call=nograd_k), schedule)
    loss0, grad0 = _loss_and_grad(unet, models, base, inputs)
    loss1, grad1 = _loss_and_grad(unet, models, batched, inputs)
    assert grad0.abs().max() > 1e-6
    assert_close_fp32(loss1, loss0)
    assert_close_model_grad(grad1, grad0)


def test_cached_step_equals_computed_step(moved_sd15_models, tmp_path):
    unet, models, schedule = moved_sd15_models
    inputs = _inputs(2)
    method = build_method(MethodConfig(name="inversion-dpo", beta=50.0, num_steps=4), schedule)
    loss0, grad0 = _loss_and_grad(unet, models, method, inputs)
    method.trajectory_cache = TrajectoryCache(tmp_path / "traj", {"setup": 1})
    calls = {"n": 0}

    def counting_reference(x, t, cond):
        calls["n"] += 1
        return models.reference(x, t, cond)

    counted = Models(models.policy, counting_reference)
    loss1, grad1 = _loss_and_grad(unet, counted, method, inputs)  # computes and stores
    assert calls["n"] == 4 and method.trajectory_cache.stats()["misses"] == 1
    assert len(list((tmp_path / "traj").rglob("*.safetensors"))) == 2
    loss2, grad2 = _loss_and_grad(unet, counted, method, inputs)  # reads back, no reference call
    assert calls["n"] == 4 and method.trajectory_cache.stats()["hits"] == 1
    assert torch.equal(loss1, loss0) and torch.equal(grad1, grad0)
    assert torch.equal(loss2, loss0) and torch.equal(grad2, grad0)
    # pairs in another micro-batch layout read the same entries (keyed by source row, winners first)
    swapped = StepInputs(torch.cat([inputs.z0[[1, 0]], inputs.z0[[3, 2]]]),
                         {"encoder_hidden_states": inputs.cond["encoder_hidden_states"][[1, 0, 3, 2]]},
                         inputs.rng, rows=torch.tensor([11, 10]))
    traj = method._trajectory(swapped, counted)
    assert calls["n"] == 4
    direct = inversion_dpo_trajectory(models.reference, swapped.z0, swapped.cond, schedule, num_steps=4)
    assert torch.equal(traj.ref_eps, direct.ref_eps)


def test_a_cache_for_another_setup_is_refused(tmp_path):
    TrajectoryCache(tmp_path, {"num_steps": 4, "reference_weights": "a"})
    TrajectoryCache(tmp_path, {"num_steps": 4, "reference_weights": "a"})  # the same setup reopens
    with pytest.raises(StaleTrajectoryCacheError, match="num_steps"):
        TrajectoryCache(tmp_path, {"num_steps": 8, "reference_weights": "a"})


def test_configs_whose_pair_inputs_change_are_refused():
    base = ["model.path=m", "data.path=d", "method.name=inversion-dpo", "method.trajectory_cache_dir=t",
            "data.caption_dropout=0", "data.latent_sample=false"]
    load_config(None, base).validate()
    for bad, message in (("data.caption_dropout=0.2", "caption_dropout = 0"),
                         ("data.latent_sample=true", "latent_sample = false"),
                         ("data.random_flip=true", "random_flip = false"),
                         ("data.center_crop=false", "center_crop = true"),
                         ("method.name=inpo", "is for Inversion-DPO")):
        with pytest.raises(ValueError, match=message):
            load_config(None, [*base, bad]).validate()


@pytest.mark.slow
def test_training_with_the_cache_is_the_training_without_it(tiny_pipelines, pickapic_dir, tmp_path):
    """Two epochs over a few pairs: the cached run reads its trajectories back in epoch 2, resumes from a
    checkpoint, and ends with the weights and losses of a run that computes every trajectory."""
    extra = ["data.max_rows=4", "train.max_steps=6", "train.pairs_per_batch=1", "data.latent_sample=false",
             "train.checkpoint_every=0"]
    plain = tmp_path / "plain"
    train(_config(tiny_pipelines["sdxl"], pickapic_dir, plain, "inversion-dpo", *extra))
    cached = tmp_path / "cached"
    cache = f"method.trajectory_cache_dir={tmp_path / 'traj'}"
    first = train(_config(tiny_pipelines["sdxl"], pickapic_dir, cached, "inversion-dpo", *extra, cache),
                  stop_after=2)
    assert first["trajectory_cache"]["misses"] == 2
    second = train(_config(tiny_pipelines["sdxl"], pickapic_dir, cached, "inversion-dpo", *extra, cache),
                   resume="latest")
    pairs = second["pairs"]
    assert 2 < pairs <= 4  # (ties dropped) so steps 3..6 miss until the epoch ends, then hit
    assert second["trajectory_cache"] == {**second["trajectory_cache"], "misses": pairs - 2, "hits": 6 - pairs}
    a, b = _weights(plain), _weights(cached)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(plain)] == [r["loss"] for r in _metrics(cached)]
    with pytest.raises(StaleTrajectoryCacheError, match="num_steps"):
        train(_config(tiny_pipelines["sdxl"], pickapic_dir, tmp_path / "other", "inversion-dpo", *extra, cache,
                      "method.num_steps=4"))
