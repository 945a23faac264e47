"""Model folders a user gets wrong are named with what is wrong: a single-file checkpoint given as the model path,
a truncated weights file in unet/, vae/ or text_encoder/ — one message naming the file, before any weight loads."""

from __future__ import annotations

import shutil

import pytest

from fastinpo.models.sd import check_weight_files, detect_arch, load_components


def test_a_file_as_model_path_says_it_is_a_file(tmp_path):
    f = tmp_path / "sd_xl_base_1.0.safetensors"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"model path .*sd_xl_base_1\.0\.safetensors is a file.*from_single_file"):
        detect_arch(f)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
@pytest.mark.parametrize("keep", [0.5, 0.0001])  # cut in the data, and inside the header
def test_a_truncated_weights_file_is_named(tiny_pipelines, tmp_path, part, keep):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipelines["sd15"], folder)
    (weights,) = (folder / part).glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match=rf"weights file .*{part}/{weights.name} is (truncated|not a complete)"):
        load_components(folder)


def test_complete_files_pass(tiny_pipelines):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        check_weight_files(tiny_pipelines["sdxl"] / part)
