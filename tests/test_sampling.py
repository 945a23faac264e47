"""Sampling on the tiny pipelines: fixed noise per (prompt, seed), batch-size independence, the model's own
scheduler config, UNet / LoRA applied, the contact sheet, and `fastinpo sample`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastinpo.eval import sampling

STEPS = 2


@pytest.fixture(scope="module")
def sd15_other(tmp_path_factory):
    """A second tiny SD1.5 pipeline with other weights (seed 1): "another model"."""
    from fastinpo.models.sd import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("sd15_other") / "sd15_b", "sd15", seed=1)


@pytest.fixture(scope="module")
def sd15_pipe(tiny_pipelines):
    return sampling.build_pipeline(tiny_pipelines["sd15"], scheduler="ddim")


def _capture_latents(pipe):
    """Record the initial latents each pipeline call starts from (prepare_latents' return value)."""
    seen = []
    original = pipe.prepare_latents

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    pipe.prepare_latents = wrapped
    return seen


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_same_seed_same_image_and_batch_size_independence(sd15_pipe):
    prompts, seeds = ["a red cat", "a blue dog", "a red cat"], [0, 1, 0]
    batched = sampling.generate(sd15_pipe, prompts, seeds, steps=STEPS, batch_size=3, progress=False)
    assert all(im.size == (32, 32) for im in batched)
    assert np.array_equal(_arr(batched[0]), _arr(batched[2])), "same prompt and seed must give the same image"
    assert not np.array_equal(_arr(batched[0]), _arr(batched[1]))
    single = sampling.generate(sd15_pipe, prompts, seeds, steps=STEPS, batch_size=1, progress=False)
    for a, b in zip(batched, single, strict=True):
        # batched and single convolutions differ in float rounding only; after quantisation to uint8 a value
        # sitting on a rounding boundary may move by one level, never more
        assert np.abs(_arr(a) - _arr(b)).max() <= 1


def test_two_models_same_seeds_see_the_same_noise(tiny_pipelines, sd15_other, sd15_pipe):
    other = sampling.build_pipeline(sd15_other, scheduler="ddim")
    seen_a, seen_b = _capture_latents(sd15_pipe), _capture_latents(other)
    try:
        ims_a = sampling.generate(sd15_pipe, ["a cat", "a dog"], [3, 4], steps=STEPS, batch_size=2, progress=False)
        ims_b = sampling.generate(other, ["a cat", "a dog"], [3, 4], steps=STEPS, batch_size=1, progress=False)
    finally:
        del sd15_pipe.prepare_latents  # back to the class method
    assert torch.equal(seen_a[0], torch.cat(seen_b)), "the same (prompt, seed) must start from the same noise"
    expected = sampling.initial_latents(sd15_pipe, [3, 4], 32, 32) * sd15_pipe.scheduler.init_noise_sigma
    assert torch.equal(seen_a[0], expected)
    assert torch.equal(expected[0], torch.randn(1, 4, 16, 16, generator=torch.Generator("cpu").manual_seed(3))[0])
    assert not np.array_equal(_arr(ims_a[0]), _arr(ims_b[0])), "different models must give different images"


def test_sdxl_pipeline_and_scheduler_from_model_config(tiny_pipelines):
    pipe = sampling.build_pipeline(tiny_pipelines["sdxl"], scheduler="dpm")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # the model's betas (scaled_linear, 0.00085..0.012), not the class defaults (linear, 0.0001..0.02)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    seen = _capture_latents(pipe)
    images = sampling.generate(pipe, ["a castle"], [5], steps=STEPS, progress=False)
    assert images[0].size == (32, 32)
    assert torch.equal(seen[0], sampling.initial_latents(pipe, [5], 32, 32) * pipe.scheduler.init_noise_sigma)
    ddim = sampling.build_pipeline(tiny_pipelines["sdxl"], scheduler="ddim")
    assert type(ddim.scheduler).__name__ == "DDIMScheduler" and ddim.scheduler.config.beta_end == 0.012


def test_unet_folder_and_lora_are_applied(tiny_pipelines, sd15_other, tmp_path, sd15_pipe):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # a full UNet (fastinpo's export/unet/ is a diffusers UNet folder; an export folder holding unet/ works too)
    with_unet = sampling.build_pipeline(tiny_pipelines["sd15"], unet=sd15_other)
    other_unet = sampling.build_pipeline(sd15_other).unet
    for (k, a), b in zip(with_unet.unet.state_dict().items(), other_unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    # a LoRA in the diffusers format pipe.load_lora_weights reads
    base = sampling.build_pipeline(tiny_pipelines["sd15"]).unet
    base.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(base)))
    with_lora = sampling.build_pipeline(tiny_pipelines["sd15"], lora=tmp_path / "lora")
    kw = dict(steps=STEPS, progress=False)
    a = sampling.generate(sd15_pipe, ["a cat"], [0], **kw)[0]
    b = sampling.generate(with_lora, ["a cat"], [0], **kw)[0]
    assert not np.array_equal(_arr(a), _arr(b)), "the LoRA must change the image"
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        sampling.build_pipeline(tiny_pipelines["sd15"], lora=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a diffusers UNet folder"):
        sampling.build_pipeline(tiny_pipelines["sd15"], unet=tmp_path)


def test_build_errors(tmp_path, tiny_pipelines):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sampling.build_pipeline(tmp_path / "nope")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        sampling.build_pipeline(tiny_pipelines["sd15"], scheduler="lms")


def test_contact_sheet():
    cells = [Image.new("RGB", (32, 32), (200, 0, 0)) for _ in range(5)]
    sheet = sampling.contact_sheet(cells, 2, 3, labels=["first prompt", "second"], pad=2)
    label_w = sheet.width - (3 * 34 + 2)
    assert label_w > 20 and sheet.height == 2 * 34 + 2
    arr = np.asarray(sheet)
    assert (arr[:, :label_w] < 128).any(), "row labels are drawn"
    assert tuple(arr[2 + 34 + 5, label_w + 2 + 2 * 34 + 5]) == (255, 255, 255), "the missing 6th cell stays blank"
    assert tuple(arr[5, label_w + 5]) == (200, 0, 0)
    assert sampling.contact_sheet(cells[:2], 1, 2).size == (2 * 34 + 2, 34 + 2)
    with pytest.raises(ValueError, match="do not fit"):
        sampling.contact_sheet(cells, 2, 2)


def _parse(argv):
    p = argparse.ArgumentParser()
    sampling.add_cli(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


def test_sample_cli_writes_the_folder(tiny_pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n# skipped\na blue dog\n")
    out = tmp_path / "samples"
    args = _parse(["sample", str(tiny_pipelines["sd15"]), "--prompts", str(prompts), "--out", str(out),
                   "--seeds", "7", "8", "--steps", str(STEPS), "--batch-size", "3", "--guidance-scale", "5",
                   "--no-progress"])
    assert args.func(args) == 0
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(m["prompt"], m["seed"], m["file"]) for m in meta] == [
        ("a red cat", 7, "00000.png"), ("a red cat", 8, "00001.png"), ("a blue dog", 7, "00002.png"),
        ("a blue dog", 8, "00003.png")]
    assert all(m["model"] == "sd15" and m["steps"] == STEPS and m["guidance_scale"] == 5.0 and m["lora"] is None
               for m in meta)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["scheduler_class"] == "DDIMScheduler" and settings["seeds"] == [7, 8]
    assert settings["n_images"] == 4 and settings["height"] == 32
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height == 2 * 34 + 2
    assert all((out / m["file"]).is_file() for m in meta)
    with pytest.raises(ValueError, match="already holds samples"):
        args.func(args)
    with pytest.raises(ValueError, match="either --seeds or --num-seeds"):
        a2 = _parse(["sample", str(tiny_pipelines["sd15"]), "--prompts", str(prompts), "--out", str(out),
                     "--seeds", "1", "--num-seeds", "2"])
        a2.func(a2)
