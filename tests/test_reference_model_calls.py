"""The benchmark's public-structure reference step makes the official scripts' model calls, no more (issue 13):
counted per ``t`` with stand-in UNets that count their calls and samples.

- DDIM-InPO: the official script inverts only through the levels below the pair's ``t`` (``timesteps < t``), then
  one policy and one reference call for the DPO loss. B = 1: ``#{k : source_level_k < t}`` inversion calls (6.38 on
  average over t, not K = 10); B > 1: up to the largest ``t`` of the batch, every call on all 2B samples.
- Diffusion-DPO: one policy and one reference call on ``[winners; losers]``.
- Inversion-DPO: per image group (winners, then losers) N reference calls along the trajectory and N policy calls
  at its points, each on ``[uncond; cond]`` (2 rows per image).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks.reference import train_step as ref
from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG, NoiseSchedule, inpo_grid


class CountingUNet(torch.nn.Module):
    """ε = w·x (one trainable scalar): enough for the step's arithmetic; counts calls and samples per call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.batches: list[int] = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        self.batches.append(int(x.shape[0]))
        return SimpleNamespace(sample=self.w.to(x.dtype) * x)


def _models():
    schedule = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    policy, frozen = CountingUNet(), CountingUNet()
    models = ref.build_reference_models(policy, schedule, ref_unet=frozen, ref_dtype=torch.float32, lr=None)
    return models, policy, models.ref_unet, schedule


def _cond(B: int):
    g = torch.Generator().manual_seed(B)
    z0 = torch.randn(2 * B, 4, 8, 8, generator=g)
    cond = ref.make_cond(torch.randn(B, 77, 16, generator=g), None, None)
    return z0, cond


def _official_inversion_calls(schedule, t: int, K: int = 10) -> int:
    """The official InPO loop: one call per grid level below t (written from the grid, independently)."""
    stride = schedule.num_train_timesteps // K
    return sum(1 for k in range(K) if k * stride + schedule.steps_offset - stride < t)


@pytest.mark.parametrize("t", [0, 1, 2, 101, 102, 450, 801, 802, 999])
def test_inpo_b1_inverts_only_below_its_t(t):
    models, policy, frozen, schedule = _models()
    z0, cond = _cond(1)
    ref.inpo_loss(models, z0, cond, torch.tensor([t]), 5000.0, num_levels=10)
    want = _official_inversion_calls(schedule, t)
    grid = inpo_grid(schedule, 10)
    assert want == int((grid.source_levels < t).sum())
    # inversion calls (no grad) + the DPO loss's policy call; the reference UNet: the DPO loss's one call
    assert len(policy.batches) == want + 1, (t, policy.batches)
    assert frozen.batches == [2]
    assert set(policy.batches) == {2}


def test_inpo_b1_average_calls_match_the_official_script():
    """Over t uniform in [0, 1000): 6.38 inversion calls per B = 1 step (8.38 UNet calls with the loss), not 10."""
    models, policy, _, schedule = _models()
    z0, cond = _cond(1)
    ts = list(range(0, 1000, 37))
    calls = []
    for t in ts:
        policy.batches.clear()
        ref.inpo_loss(models, z0, cond, torch.tensor([t]), 5000.0, num_levels=10)
        calls.append(len(policy.batches) - 1)
    assert calls == [_official_inversion_calls(schedule, t) for t in ts]
    exact = sum(_official_inversion_calls(schedule, t) for t in range(1000)) / 1000
    assert abs(exact - 6.38) < 0.01
    assert max(calls) == 10 and min(calls) == 1


@pytest.mark.parametrize("ts", [(150, 700), (950, 3, 420), (0, 0)])
def test_inpo_batch_runs_to_the_largest_t(ts):
    B = len(ts)
    models, policy, frozen, schedule = _models()
    z0, cond = _cond(B)
    ref.inpo_loss(models, z0, cond, torch.tensor(ts), 5000.0, num_levels=10)
    assert policy.batches == [2 * B] * (_official_inversion_calls(schedule, max(ts)) + 1)
    assert frozen.batches == [2 * B]


def test_inpo_batch_masks_pairs_past_their_t():
    """A pair of a batch ends where it would end alone (its own t), whatever the other pairs' t."""
    models, _, _, _ = _models()
    z0, cond = _cond(2)
    together = ref.inpo_invert_whole_batch(models, z0, torch.tensor([150, 700]), cond)
    z0_alone = torch.stack([z0[0], z0[2]])
    alone = ref.inpo_invert_whole_batch(models, z0_alone, torch.tensor([150]), ref.make_cond(
        cond["encoder_hidden_states"][:1], None, None))
    torch.testing.assert_close(torch.stack([together[0], together[2]]), alone, rtol=0, atol=0)


def test_diffusion_dpo_one_policy_and_one_reference_call():
    models, policy, frozen, schedule = _models()
    z0, cond = _cond(3)
    ref.diffusion_dpo_loss(models, z0, cond, torch.tensor([5, 500, 999]), torch.randn(3, 4, 8, 8), 5000.0)
    assert policy.batches == [6] and frozen.batches == [6]


@pytest.mark.parametrize("N", [4, 10])
def test_inversion_dpo_calls_per_image_group(N):
    models, policy, frozen, schedule = _models()
    z0, cond = _cond(1)
    cond["text_embeds"] = torch.zeros(2, 8)
    cond["time_ids"] = torch.zeros(2, 6)
    ref.inversion_dpo_loss(models, z0, cond, 2000.0, num_steps=N, guidance_scale=2.0)
    # winners then losers, each: N reference calls on [uncond; cond] (2 rows), then N policy calls likewise
    assert frozen.batches == [2] * (2 * N)
    assert policy.batches == [2] * (2 * N)
