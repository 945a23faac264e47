"""Nothing lost, nothing silently different: a folder holding a run is refused (or moved aside on request), a
resume may change only the run's length and cadence, a failed start leaves nothing behind, ``--resume latest``
without a checkpoint says so, skip counts are one accounting carried through resume, and the start says what
runs (device, precision, data, effective learning rate)."""

from __future__ import annotations

import json

import pytest

from fastinpo.cli import main
from fastinpo.config import load_config
from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet
from fastinpo.train import checkpoint as ckpt
from fastinpo.train import train


def _over(pipeline, data, out, *extra):
    return [f"model.path={pipeline}", f"data.path={data}", "data.resolution=32", "method.name=diffusion-dpo",
            "train.max_steps=2", "train.pairs_per_batch=2", f"train.output_dir={out}", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-4", "optim.scale_lr=false", *extra]


def test_a_folder_holding_a_run_is_refused_and_overwrite_moves_it_aside(tiny_pipelines, pickapic_dir, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out, "train.max_steps=3",
                                  "train.checkpoint_every=1", "train.keep_last=5")))
    old_steps = [s for s, _ in ckpt.list_checkpoints(out)]
    with pytest.raises(ValueError, match=r"already holds a run.*--resume latest.*train.output_dir.*--overwrite"):
        train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out)))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == old_steps  # untouched
    summary = train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out)), overwrite=True)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert [s for s, _ in ckpt.list_checkpoints(aside)] == old_steps  # the old run, whole, beside the new one
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and summary["checkpoint"].endswith("step-00000002")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_changed_training_keys_and_takes_cadence_keys(tiny_pipelines, pickapic_dir, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out)), stop_after=1)
    for key, value, saved in (("method.name", "inpo", "'diffusion-dpo'"), ("optim.lr", "0.001", "0.0001")):
        with pytest.raises(ValueError, match=rf"{key}: saved {saved}, now"):
            train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out, f"{key}={value}")),
                  resume="latest")
    summary = train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out, "train.max_steps=3",
                                            "train.log_every=2")), resume="latest")
    assert summary["step"] == 3
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == 3 and saved.method.name == "diffusion-dpo"  # config.yaml is what ran


def test_resume_latest_without_a_checkpoint_says_so(tiny_pipelines, pickapic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out)), resume="latest")
    printed = capsys.readouterr().out
    assert "--resume latest: no checkpoint in" in printed and "starting at step 0" in printed


def test_a_failed_start_leaves_no_folder(tiny_pipelines, pickapic_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="does not match"):  # a stale cache is found after the models load
        train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, out,
                                      f"data.cache_dir={tmp_path / 'no-cache'}")))
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_counts_are_one_accounting_through_resume(tiny_pipelines, tmp_path, workers):
    data = tmp_path / "data"
    write_pickapic_parquet(data / "part-0.parquet", synthetic_rows(8, 32, seed=4, tie_every=4, undecodable_row=1))
    extra = ["train.pairs_per_batch=1", "train.max_steps=6", f"data.num_workers={workers}"]
    straight = train(load_config(None, _over(tiny_pipelines["sd15"], data, tmp_path / "a", *extra)))
    out = tmp_path / "b"
    train(load_config(None, _over(tiny_pipelines["sd15"], data, out, *extra)), stop_after=4)
    resumed = train(load_config(None, _over(tiny_pipelines["sd15"], data, out, *extra)), resume="latest")
    assert straight["skipped_rows"] == {"tie": 2, "undecodable_image": 1}  # index time + reached late, once
    assert resumed["skipped_rows"] == straight["skipped_rows"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_rows"] == 3
    assert json.loads((out / "summary.json").read_text())["skipped_rows"] == straight["skipped_rows"]


def test_the_start_says_device_precision_data_and_learning_rate(tiny_pipelines, pickapic_dir, tmp_path, capsys):
    code = main(["train", *sum((["--set", o] for o in _over(tiny_pipelines["sd15"], pickapic_dir, tmp_path / "r",
                                                               "optim.scale_lr=true", "optim.lr=1e-8",
                                                               "train.max_steps=1")), [])])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fastinpo train: device cpu; policy float32" in printed
    assert "usable pairs from" in printed and "rows skipped:" in printed and "tie" in printed
    assert "learning rate 2e-08 (optim.lr 1e-08 x 2 pairs per step, optim.scale_lr)" in printed


def test_fp16_on_a_cpu_warns(tiny_pipelines, pickapic_dir, tmp_path):
    with pytest.warns(UserWarning, match="fp16' on a CPU runs"):
        train(load_config(None, _over(tiny_pipelines["sd15"], pickapic_dir, tmp_path / "r", "train.max_steps=1",
                                      "train.mixed_precision=fp16", "train.device=cpu")))
