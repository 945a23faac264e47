"""The real-size random pipeline maker (fastinpo.models.full_size, ``fastinpo make-tiny-pipeline --size full``): the
real SD1.5 / SDXL architectures with random weights. SDXL at real size needs ~11 GiB, so it is built on the meta device
and its UNet parameter count checked (2.567 B, the public SDXL base UNet's); SD1.5 is written for real (bf16,
reduced resolution), loaded back the way training loads a model, and run."""

from __future__ import annotations

import json

import pytest
import torch

from fastinpo.cli import main as cli_main
from fastinpo.models import full_size


def test_sdxl_unet_has_the_real_parameter_count_on_meta():
    unet = full_size.build_unet("sdxl", device="meta")
    n = full_size.parameter_count(unet)
    assert n == full_size.SDXL_UNET_PARAMETERS == 2_567_463_684
    assert round(n / 1e9, 3) == 2.567
    assert unet.config.addition_embed_type == "text_time" and unet.config.cross_attention_dim == 2048


def test_sd15_unet_parameter_count_on_meta():
    assert full_size.parameter_count(full_size.build_unet("sd15", device="meta")) == 859_520_964


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        full_size.unet_config("sd3")
    with pytest.raises(ValueError, match="dtype"):
        full_size.make_full_pipeline(tmp_path / "x", "sd15", dtype=torch.int8)
    with pytest.raises(ValueError, match="meta"):
        full_size.make_full_pipeline(tmp_path / "x", "sd15", device="meta")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("a run's file")
    with pytest.raises(FileExistsError):
        full_size.make_full_pipeline(tmp_path / "busy", "sd15")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "a run's file"  # nothing lost


@pytest.mark.slow
def test_sd15_full_pipeline_written_loaded_and_run(tmp_path):
    """SD1.5 at real size in bf16 (1.9 GB), VAE config for 64 px: every part loads with fastinpo's loader and
    runs — text encoder 77 × 768, VAE 64 px → 8 × 8 latents, UNet ε of the latent's shape, finite."""
    from fastinpo.models.sd import Encoder, detect_arch, load_components

    out = tmp_path / "sd15"
    rc = cli_main(["make-tiny-pipeline", str(out), "--size", "full", "--arch", "sd15", "--dtype", "bfloat16",
                   "--resolution", "64"])
    assert rc == 0
    assert detect_arch(out) == "sd15"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    comps = load_components(out, dtype=torch.bfloat16, unet_dtype=torch.bfloat16)
    assert full_size.parameter_count(comps.unet) == full_size.SD15_UNET_PARAMETERS
    assert next(comps.unet.parameters()).dtype == torch.bfloat16
    assert comps.vae.config.sample_size == 64 and comps.vae.config.scaling_factor == 0.18215
    enc = Encoder(comps, "cpu")
    prompt, pooled = enc.encode_text(["a red fox in the snow"])
    assert prompt.shape == (1, 77, 768) and pooled is None
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    mean, _ = enc.encode_images(pixels)
    assert mean.shape == (1, 4, 8, 8)
    with torch.no_grad():
        eps = comps.unet(mean.to(torch.bfloat16), torch.tensor([500]),
                         encoder_hidden_states=prompt.to(torch.bfloat16)).sample
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all() and eps.float().std() > 0
