"""`sample` and `eval` refuse what would make a comparison wrong or lose work: folders sampled with other settings,
models named after the wrong thing, scorer weights loaded before the folders are checked, a failed sample that
blocks its retry, a UNet or LoRA of another architecture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from fastinpo.eval import evaluate as ev
from fastinpo.eval import sampling
from fastinpo.eval.scorers import CallableScorer
from tests.test_evaluate import toy_reward

SETTINGS = {"steps": 30, "guidance_scale": 7.5, "height": 8, "width": 8, "scheduler": "ddim",
            "scheduler_class": "DDIMScheduler", "negative_prompt": None}


def _folder(path: Path, red: int, name: str | None = None, **changed) -> Path:
    path.mkdir(parents=True)
    with (path / "metadata.jsonl").open("w") as f:
        for i, (prompt, seed) in enumerate([("p1", 0), ("p2", 0)]):
            Image.new("RGB", (8, 8), (red, 0, 0)).save(path / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": prompt, "seed": seed}) + "\n")
    (path / "settings.json").write_text(json.dumps({**SETTINGS, "name": name, **changed}))
    return path


def _cli(module, argv):
    p = argparse.ArgumentParser()
    module.add_cli(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("changed,named", [({"steps": 50}, "steps: 30"), ({"guidance_scale": 5.0}, "guidance_scale"),
                                           ({"height": 16}, "height"), ({"scheduler": "euler"}, "scheduler")])
def test_eval_refuses_folders_sampled_with_other_settings(tmp_path, changed, named):
    a, b = _folder(tmp_path / "a", 200), _folder(tmp_path / "b", 100, **changed)
    scorers = {"red": CallableScorer(toy_reward)}
    with pytest.raises(ValueError, match=rf"different settings.*{named}.*--allow-different-settings"):
        ev.run_eval([a, b], scorers, tmp_path / "r", progress=False)
    with pytest.warns(UserWarning, match="DIFFERENT SETTINGS"):
        summary = ev.run_eval([a, b], scorers, tmp_path / "r", progress=False, allow_different_settings=True)
    assert summary["settings_differences"] and named.split(":")[0] in summary["settings_differences"][0]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "sampled with different settings" in report and "## Sampling settings" in report


def test_eval_names_models_by_sample_name_and_reads_a_wins(tmp_path):
    a = _folder(tmp_path / "run1", 200, name="inpo")
    b = _folder(tmp_path / "run2", 100, name="base")
    summary = ev.run_eval([a, b], {"red": CallableScorer(toy_reward)}, tmp_path / "r", progress=False)
    (w,) = summary["win_rates"]
    assert (w["a"], w["b"], w["win_rate"]) == ("inpo", "base", 1.0)  # A (first folder) wins every pair
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| A vs B (win rate of A: A wins) |" in report and "| inpo vs base | 100.0% [" in report
    assert [m["name"] for m in summary["models"]] == ["inpo", "base"]


def test_eval_checks_folders_before_loading_any_scorer(tmp_path, monkeypatch):
    a, b = _folder(tmp_path / "a", 200), _folder(tmp_path / "b", 100, steps=50)

    def no_loading(args):
        raise AssertionError("scorer weights were loaded before the folders were checked")

    monkeypatch.setattr(ev, "build_scorers", no_loading)
    with pytest.raises(ValueError, match="different settings"):
        _cli(ev, ["eval", str(a), str(b), "--out", str(tmp_path / "r"), "--no-progress"])


def test_a_failed_sample_leaves_no_finished_folder_and_the_retry_runs(tiny_pipelines, tmp_path, monkeypatch):
    out = tmp_path / "s"
    original = sampling.iter_generate

    def fails_after_one(*args, **kwargs):
        gen = original(*args, **kwargs)
        yield next(gen)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(sampling, "iter_generate", fails_after_one)
    with pytest.raises(RuntimeError, match="simulated"):
        sampling.run_sample(tiny_pipelines["sd15"], ["a cat", "a dog"], out, seeds=[0, 1], steps=1, progress=False)
    assert not (out / "metadata.jsonl").exists() and (out / "metadata.jsonl.partial").is_file()
    monkeypatch.setattr(sampling, "iter_generate", original)
    sampling.run_sample(tiny_pipelines["sd15"], ["a cat", "a dog"], out, seeds=[0, 1], steps=1, progress=False)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 4
    assert not (out / "metadata.jsonl.partial").exists()
    with pytest.raises(ValueError, match="--overwrite"):
        sampling.run_sample(tiny_pipelines["sd15"], ["a cat"], out, steps=1, progress=False)


def test_a_unet_of_another_architecture_is_named(tiny_pipelines):
    with pytest.raises(ValueError, match=r"another architecture.*cross_attention_dim"):
        sampling.build_pipeline(tiny_pipelines["sd15"], unet=tiny_pipelines["sdxl"])


def test_a_lora_of_another_architecture_is_named(tiny_pipelines, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_pipelines["sdxl"]) / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True)
    # fits its own architecture
    sampling.build_pipeline(tiny_pipelines["sdxl"], lora=tmp_path / "lora")
    with pytest.raises(ValueError, match=r"does not fit the UNet.*SD1.5 and SDXL LoRAs are not interchangeable"):
        sampling.build_pipeline(tiny_pipelines["sd15"], lora=tmp_path / "lora")
