"""What the config alone can reveal is reported, all at once, before any weight loads: missing or wrong local paths
(never treated as hub ids) and Inversion-DPO's symmetry-breaking choice."""

from __future__ import annotations

import pytest

from fastinpo.cli import main
from fastinpo.config import check_before_loading, load_config


def _weights_never_load(monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the config's problems were reported")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", refuse)


def test_every_path_problem_at_once(tiny_pipelines, pickapic_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    config = load_config(None, [f"model.path={weights}", "model.unet_init=runs/sft/export/unet",
                                f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(ValueError) as info:
        check_before_loading(config)
    msg = str(info.value)
    assert "model.path" in msg and "is a file" in msg
    assert "model.unet_init = 'runs/sft/export/unet' does not exist" in msg and "nothing is downloaded" in msg
    assert "data.path" in msg and "does not exist" in msg
    check_before_loading(load_config(None, [f"model.path={tiny_pipelines['sd15']}", f"data.path={pickapic_dir}",
                                            f"model.unet_init={tiny_pipelines['sd15'] / 'unet'}"]))


def test_train_reports_a_missing_unet_init_before_loading_anything(tiny_pipelines, pickapic_dir, tmp_path,
                                                                   monkeypatch, capsys):
    _weights_never_load(monkeypatch)
    code = main(["train", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={pickapic_dir}",
                 "--set", "model.unet_init=/no/such/unet", "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "model.unet_init = '/no/such/unet' does not exist" in capsys.readouterr().err


def test_inversion_dpo_without_symmetry_breaking_is_refused_before_loading(tiny_pipelines, pickapic_dir, tmp_path,
                                                                          monkeypatch, capsys):
    _weights_never_load(monkeypatch)
    code = main(["train", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={pickapic_dir}",
                 "--set", "method.name=inversion-dpo", "--set", "method.symmetry_breaking=none",
                 "--set", "data.caption_dropout=0", "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "would train nothing" in capsys.readouterr().err


def test_cache_reports_a_missing_model_folder_before_loading(pickapic_dir, tmp_path, monkeypatch, capsys):
    _weights_never_load(monkeypatch)
    code = main(["cache", "--set", f"model.path={tmp_path / 'no-model'}", "--set", f"data.path={pickapic_dir}",
                 "--set", f"data.cache_dir={tmp_path / 'c'}"])
    assert code == 2 and "model.path" in capsys.readouterr().err and not (tmp_path / "c").exists()
