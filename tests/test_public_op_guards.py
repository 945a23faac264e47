"""The public ops refuse what they cannot compute, with a ValueError naming what was expected and what came —
and every backend refuses the same inputs (a bad schedule is refused where it is built, before any backend runs)."""

from __future__ import annotations

import math

import pytest
import torch

import fastinpo
from fastinpo import NoiseSchedule

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "set_alpha_to_one": False, "steps_offset": 1}


def _model(x, t, cond):
    return 0.1 * x


@pytest.mark.parametrize("change,match", [
    ({"num_train_timesteps": 0}, r"num_train_timesteps must be an integer >= 1, got 0"),
    ({"beta_schedule": "linear", "beta_start": 0.0, "beta_end": 0.0}, r"ᾱ_0 = 1\.0.*betas"),  # ᾱ = 1
    ({"beta_schedule": "linear", "beta_start": 0.5, "beta_end": 1.0}, r"ᾱ_\d+ = 0\.0.*betas"),  # ᾱ reaches 0
    ({"beta_schedule": "linear", "beta_start": -0.1, "beta_end": 0.01}, r"ᾱ_0 = 1\.1"),  # ᾱ > 1
    ({"trained_betas": [float("nan")] * 10, "num_train_timesteps": 10}, r"ᾱ_0 = nan"),
])
def test_bad_schedules_are_refused_where_they_are_built(change, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config({**SD_CONFIG, **change})


def test_a_valid_schedule_still_builds():
    s = NoiseSchedule.from_config(SD_CONFIG)
    assert s.num_train_timesteps == 1000 and 0 < float(s.alphas_cumprod.min()) < float(s.alphas_cumprod.max()) < 1


@pytest.mark.parametrize("rows", [2, 6])  # B and 2B + 2 rows, for 2B = 4
def test_inpo_invert_refuses_cond_of_the_wrong_size(rows):
    s = NoiseSchedule.from_config(SD_CONFIG)
    z0 = torch.randn(4, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(rows, 7, 16)}
    match = rf"cond\['encoder_hidden_states'\] must have 4 rows.*got shape \({rows}, 7, 16\)"
    with pytest.raises(ValueError, match=match):
        fastinpo.inpo_invert(_model, z0, torch.tensor([500, 900]), cond, s, num_levels=4)


@pytest.mark.parametrize("eta", [math.inf, math.nan, -0.1])
def test_inpo_invert_refuses_a_non_finite_or_negative_eta(eta):
    s = NoiseSchedule.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="eta must be a finite float >= 0"):
        fastinpo.inpo_invert(_model, torch.randn(2, 4, 8, 8), torch.tensor([500]), torch.randn(2, 7, 16), s, eta=eta)


def test_inversion_dpo_trajectory_refuses_mismatched_cond_uncond_and_guidance():
    s = NoiseSchedule.from_config(SD_CONFIG)
    z0 = torch.randn(4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"cond must have 4 rows.*got shape \(3, 7, 16\)"):
        fastinpo.inversion_dpo_trajectory(_model, z0, torch.randn(3, 7, 16), s, num_steps=4)
    with pytest.raises(ValueError, match=r"uncond must have 4 rows.*got shape \(1, 7, 16\)"):
        fastinpo.inversion_dpo_trajectory(_model, z0, torch.randn(4, 7, 16), s, num_steps=4,
                                          uncond=torch.zeros(1, 7, 16))
    for g in (math.inf, math.nan):
        with pytest.raises(ValueError, match="guidance_scale must be a finite float"):
            fastinpo.inversion_dpo_trajectory(_model, z0, torch.randn(4, 7, 16), s, num_steps=4, guidance_scale=g)
    out = fastinpo.inversion_dpo_trajectory(_model, z0, torch.randn(4, 7, 16), s, num_steps=4)
    assert torch.isfinite(out.latents).all()


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf])
def test_inversion_dpo_loss_refuses_weights_that_are_not_positive(bad):
    preds = torch.randn(3, 4, 4, 8, 8)
    w = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        fastinpo.inversion_dpo_loss(preds, preds + 0.1, w, 2000.0)


def test_inversion_dpo_loss_refuses_predictions_without_their_step_dimension():
    x = torch.randn(4, 4, 8, 8)  # (2B, C, H, W): no N
    with pytest.raises(ValueError, match=r"must be \(N, 2B, C, H, W\).*x\[None\]"):
        fastinpo.inversion_dpo_loss(x, x + 0.1, torch.ones(4), 2000.0)
    out = fastinpo.inversion_dpo_loss(x[None], x[None] + 0.1, torch.ones(1), 2000.0)
    assert out.logits.shape == (2,)
