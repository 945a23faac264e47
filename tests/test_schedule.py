"""ᾱ table, grids, gathers and σ against SPEC §3–4 and diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from fastinpo.ops.schedule import (
    SD_SCHEDULER_CONFIG,
    NoiseSchedule,
    gather_alphas,
    inpo_grid,
    inpo_noise_sigma,
    inversion_dpo_grid,
)


@pytest.fixture(scope="module")
def sd() -> NoiseSchedule:
    return NoiseSchedule.stable_diffusion()


def test_table_is_diffusers_table(sd):
    expected = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).alphas_cumprod
    assert sd.alphas_cumprod.dtype == torch.float32
    assert torch.equal(sd.alphas_cumprod, expected)
    # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, ᾱ = cumprod(1 - betas); the float32
    # table diffusers builds agrees with a float64 computation to float32 rounding accumulated over 1000 products.
    betas64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    table64 = torch.cumprod(1 - betas64, 0)
    torch.testing.assert_close(sd.alphas_cumprod.double(), table64, rtol=1e-5, atol=0)
    assert sd.alpha_init == sd.alphas_cumprod[0].item()  # set_alpha_to_one = false
    assert sd.steps_offset == 1 and sd.num_train_timesteps == 1000 and sd.prediction_type == "epsilon"


def test_set_alpha_to_one_changes_alpha_init():
    s = NoiseSchedule.from_config({**SD_SCHEDULER_CONFIG, "set_alpha_to_one": True})
    assert s.alpha_init == 1.0


def test_config_from_json_file_folder_and_scheduler(tmp_path, sd):
    folder = tmp_path / "model" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", **SD_SCHEDULER_CONFIG, "interpolation_type": "linear"})
    )
    for source in (folder / "scheduler_config.json", folder, tmp_path / "model",
                   DDIMInverseScheduler.from_config(SD_SCHEDULER_CONFIG)):
        s = NoiseSchedule.from_config(source)
        assert torch.equal(s.alphas_cumprod, sd.alphas_cumprod) and s.alpha_init == sd.alpha_init
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        NoiseSchedule.from_config(tmp_path)
    with pytest.raises(TypeError, match="config must be"):
        NoiseSchedule.from_config(42)


def test_inpo_grid_matches_spec_example(sd):
    g = inpo_grid(sd, 10)
    assert g.stride == 100
    assert g.source_levels.tolist() == [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801]
    assert g.levels.tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    t = torch.tensor([450, 0, 1, 2, 999, 101, 102])
    assert g.num_steps(t).tolist() == [6, 1, 1, 2, 10, 2, 3]
    assert g.end_level(t).tolist() == [501, 1, 1, 101, 901, 101, 201]
    # "Between 1 and K policy evaluations per pair, 6.4 on average" (exactly 6382 / 1000 for K = 10)
    counts = g.num_steps(torch.arange(1000))
    assert counts.min() == 1 and counts.max() == 10 and counts.sum().item() == 6382


def test_inpo_grid_other_k(sd):
    g = inpo_grid(sd, 4)
    assert g.stride == 250
    assert g.source_levels.tolist() == [-249, 1, 251, 501] and g.levels.tolist() == [1, 251, 501, 751]
    with pytest.raises(ValueError, match="num_levels"):
        inpo_grid(sd, 0)


def test_inversion_dpo_grid(sd):
    g = inversion_dpo_grid(sd, 40)
    assert g.stride == 25 and g.timesteps.tolist() == list(range(0, 1000, 25))
    assert g.source_levels[0].item() == -25
    assert torch.equal(g.weights, 1.0 / (2.0 * sd.alphas_cumprod[g.timesteps]))
    g80 = inversion_dpo_grid(sd, 80)
    assert g80.timesteps[-1].item() == 79 * 12


def test_gather_alphas_negative_levels(sd):
    levels = torch.tensor([[-99, 0], [1, 999]])
    out = gather_alphas(sd.alphas_cumprod, levels, 0.5)
    table = sd.alphas_cumprod
    assert out.tolist() == [[0.5, table[0].item()], [table[1].item(), table[999].item()]]
    assert torch.equal(sd.alphas_at(torch.tensor([-1, 5])), torch.stack([sd.alphas_cumprod[0], sd.alphas_cumprod[5]]))
    with pytest.raises(ValueError, match="< T"):
        gather_alphas(sd.alphas_cumprod, torch.tensor([1000]), 0.5)
    with pytest.raises(TypeError, match="integer"):
        gather_alphas(sd.alphas_cumprod, torch.tensor([1.0]), 0.5)


def test_inpo_noise_sigma(sd):
    a_from = sd.alphas_cumprod[torch.tensor([1, 101])].double()
    a_to = sd.alphas_cumprod[torch.tensor([101, 201])].double()
    expected = (((1 - a_from) / (1 - a_to)) * (1 - a_to / a_from)).sqrt()
    got = inpo_noise_sigma(a_from.float(), a_to.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert inpo_noise_sigma(torch.tensor([1.0]), torch.tensor([0.5])).item() == 0.0  # set_alpha_to_one: no noise
