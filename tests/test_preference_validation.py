"""Preference validation in the trainer (fastinpo/train/preference_validation.py): the held-out split, metrics
for every method, validation never changing training, keep-best, early stopping, export of a chosen checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastinpo.config import load_config
from fastinpo.data import validation_split
from fastinpo.train import checkpoint as ckpt
from fastinpo.train import train

VAL_KEYS = ("val_loss", "val_implicit_acc", "val_reward_margin", "val_model_ref_gap", "val_seconds")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """40 synthetic pairs (ties included): enough for a held-out split on both sides."""
    from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

    root = tmp_path_factory.mktemp("valpairs")
    write_pickapic_parquet(root / "train-00000.parquet", synthetic_rows(40, 40, seed=3))
    return root


def _config(pipeline, data, out, method="diffusion-dpo", *extra):
    over = [f"model.path={pipeline}", f"data.path={data}", "data.resolution=32", f"method.name={method}",
            "train.max_steps=4", "train.pairs_per_batch=2", f"train.output_dir={out}", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-3", "optim.scale_lr=false", "method.num_steps=3",
            "method.inversion_levels=4", "data.caption_dropout=0.5", "data.validation_fraction=0.25",
            "data.validation_max_pairs=5", "train.checkpoint_every=0"]
    if method == "inversion-dpo":
        over += ["data.caption_dropout=0.0", "method.symmetry_breaking=reference-dtype",
                 "model.reference_dtype=bfloat16"]
    return load_config(None, over + list(extra))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_split_is_a_fixed_partition_by_row_hash():
    rows = list(range(1000))
    train_idx, held = validation_split.split(rows, 0.1)
    assert not set(train_idx) & set(held) and len(train_idx) + len(held) == 1000
    assert 60 < len(held) < 140  # ~10%; a hash, so not exactly
    # the same rows whatever else is in the source, the first held out in hash order whatever the source's size
    _, held_small = validation_split.split(rows[:500], 0.1)
    assert {rows[i] for i in held_small} == {r for r in rows[:500] if validation_split.is_held_out(r, 0.1)}
    assert validation_split.split(rows, 0.0) == (rows, [])


def test_validation_never_changes_training(tiny_pipelines, pairs_dir, tmp_path):
    """Same run with and without validation every step: bit-identical training losses and weights; the
    validations of a run differ only by the weights (step-0 draws are fixed: two validations of the same weights
    agree exactly)."""
    off = train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path / "off", "inpo"))
    on = train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path / "on", "inpo", "train.validate_every=1"))
    train_rows = {name: [r for r in _rows(tmp_path / name) if "loss" in r] for name in ("off", "on")}
    assert [r["loss"] for r in train_rows["off"]] == [r["loss"] for r in train_rows["on"]]
    assert [r["grad_norm"] for r in train_rows["off"]] == [r["grad_norm"] for r in train_rows["on"]]
    w_off, w_on = load_file(off["checkpoint"] + "/" + ckpt.WEIGHTS), load_file(on["checkpoint"] + "/" + ckpt.WEIGHTS)
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off)
    val = [r for r in _rows(tmp_path / "on") if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2, 3, 4]
    assert all(r["val_pairs"] == 5 for r in val)
    assert len({r["val_loss"] for r in val}) == 4  # the weights move, so do the metrics
    assert "validation" in on and "validation" not in off


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "diffusion-dpo", "inpo", "inversion-dpo"])
def test_every_method_validates(method, tiny_pipelines, pairs_dir, tmp_path):
    train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path, method, "train.validate_every=2",
                  "train.max_steps=2"))
    val = [r for r in _rows(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in val] == [2]
    for k in VAL_KEYS:
        assert torch.isfinite(torch.tensor(val[0][k])), k
    assert 0 <= val[0]["val_implicit_acc"] <= 1
    assert val[0]["val_model_ref_gap"] > 0  # two steps at lr 1e-3 moved the policy off its reference
    if method == "sft":
        assert val[0]["val_dpo_loss"] > 0
    # TensorBoard has the validation scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "val_implicit_acc" in acc.Tags()["scalars"]


def test_validation_source_path(tiny_pipelines, pairs_dir, pickapic_dir, tmp_path):
    config = _config(tiny_pipelines["sd15"], pairs_dir, tmp_path, "diffusion-dpo", "data.validation_fraction=0",
                     f"data.validation_path={pickapic_dir}", "train.validate_every=2", "train.max_steps=2")
    summary = train(config)
    assert summary["pairs"] == 32  # all training pairs of pairs_dir (ties dropped): nothing held out
    val = [r for r in _rows(tmp_path) if "val_loss" in r]
    assert val[0]["val_pairs"] == 5


def test_bad_validation_settings_are_refused(tiny_pipelines, pairs_dir, tmp_path):
    with pytest.raises(ValueError, match="train.validate_every needs validation pairs"):
        _config(tiny_pipelines["sd15"], pairs_dir, tmp_path, "inpo", "data.validation_fraction=0",
                "train.validate_every=2")
    with pytest.raises(ValueError, match="set train.validate_every"):
        _config(tiny_pipelines["sd15"], pairs_dir, tmp_path, "inpo", "train.keep_best=val_loss")
    with pytest.raises(ValueError, match="keep_best"):
        _config(tiny_pipelines["sd15"], pairs_dir, tmp_path, "inpo", "train.keep_best=val_acc")


def test_keep_best_and_early_stopping(tiny_pipelines, pairs_dir, tmp_path, monkeypatch):
    """A run whose validation peaks at step 2: the real validation runs every step, its bookkeeping sees the
    accuracy sequence below (the tiny model's own accuracy is noise at this size); the best checkpoint survives
    train.keep_last = 1, the run stops after the patience with a checkpoint, and `fastinpo export --checkpoint
    best` writes the step-2 weights."""
    from fastinpo.cli import main
    from fastinpo.train.preference_validation import PreferenceValidator

    sequence = iter([0.5, 0.9, 0.6, 0.7, 0.8, 0.95, 0.99])
    real_update = PreferenceValidator._update
    monkeypatch.setattr(PreferenceValidator, "_update", lambda self, step, value: real_update(self, step,
                                                                                            next(sequence)))
    out = tmp_path / "run"
    summary = train(_config(tiny_pipelines["sd15"], pairs_dir, out, "diffusion-dpo", "train.max_steps=10",
                            "train.validate_every=1", "train.keep_best=val_implicit_acc",
                            "train.early_stopping_patience=3", "train.keep_last=1", "train.checkpoint_every=1"))
    assert summary["stopped_early"] == {"step": 5, "best_step": 2, "metric": "val_implicit_acc",
                                        "best_value": 0.9}
    assert summary["step"] == 5
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 5]  # keep_last = 1, plus the best
    assert ckpt.best_checkpoint(out)[0] == 2
    best = json.loads((out / "checkpoints" / ckpt.BEST).read_text())
    assert best["value"] == 0.9 and best["metric"] == "val_implicit_acc"
    assert (out / "export" / "unet").is_dir()  # an early-stopped run is finished: exported
    assert [r["step"] for r in _rows(out) if "val_loss" in r] == [1, 2, 3, 4, 5]

    assert main(["export", str(out), "--checkpoint", "best"]) == 0
    exported = load_file(out / "export-step-00000002" / "unet" / "diffusion_pytorch_model.safetensors")
    saved = load_file(out / "checkpoints" / "step-00000002" / ckpt.WEIGHTS)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    latest = load_file(out / "checkpoints" / "step-00000005" / ckpt.WEIGHTS)
    assert any(not torch.equal(latest[k], saved[k]) for k in saved)  # the best is not the last
    assert main(["export", str(out), "--checkpoint", "best"]) == 2  # never replaced without --overwrite
    assert main(["export", str(out), "--checkpoint", "step-3"]) == 2  # rotated away: a clear error
    assert main(["export", str(out), "--checkpoint", "step-5", "--out", str(tmp_path / "e5")]) == 0


def test_keep_best_val_loss_and_resume_continue_the_bookkeeping(tiny_pipelines, pairs_dir, tmp_path):
    """val_loss is minimised; an interrupted run resumes its best value and patience count exactly."""
    extra = ("train.validate_every=1", "train.keep_best=val_loss", "train.early_stopping_patience=50",
             "train.max_steps=4")
    full = train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path / "full", "diffusion-dpo", *extra))
    train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path / "cut", "diffusion-dpo", *extra), stop_after=2)
    resumed = train(_config(tiny_pipelines["sd15"], pairs_dir, tmp_path / "cut", "diffusion-dpo", *extra),
                    resume="latest")
    vals = [r["val_loss"] for r in _rows(tmp_path / "full") if "val_loss" in r]
    assert full["validation"]["best_value"] == min(vals)
    assert full["validation"]["best_step"] == 1 + vals.index(min(vals))
    for k in ("best_value", "best_step", "since_best"):
        assert resumed["validation"][k] == full["validation"][k]


@pytest.mark.distributed
def test_validation_on_two_ranks_equals_one_process(tiny_pipelines, pairs_dir, tmp_path):
    """ZeRO-3 on 2 ranks x 1 pair (InPO with LoRA: the inversion calls the sharded policy, ranks kept in lockstep,
    validation pairs included; an odd number of validation pairs, so one rank pads) == one process x 2 pairs:
    the same validation metrics (reduced over ranks) and keep-best decisions. Uses the distributed tier's worker
    (tests/test_distributed.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distributed import _free_port

    cfg = json.loads((Path(__file__).parents[1] / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every tiny parameter
    preset = tmp_path / "zero3_tiny.json"
    preset.write_text(json.dumps(cfg))
    common = [f"model.path={tiny_pipelines['sdxl']}", f"data.path={pairs_dir}", "data.resolution=32",
              "method.name=inpo", "method.beta=100", "method.eta=0.1", "method.inversion_levels=4",
              "lora.rank=4", "optim.lr=1e-3", "optim.scale_lr=false", "optim.max_grad_norm=0.1",
              "train.max_steps=3", "train.log_every=1", "train.progress=false", "train.device=cpu",
              "train.checkpoint_every=0", "data.validation_fraction=0.25", "data.validation_max_pairs=5",
              "train.validate_every=1", "train.keep_best=val_loss"]
    ds_out, one_out = tmp_path / "ds", tmp_path / "one"
    spec = tmp_path / "spec.json"
    results = tmp_path / "results.json"
    spec.write_text(json.dumps({"results": str(results), "cases": [{"name": "validate", "runs": [{}], "overrides": [
        *common, f"train.output_dir={ds_out}", "train.pairs_per_batch=1", "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={preset}"]}]}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "-m", "tests.test_distributed",
                           "--worker", str(spec)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-6000:]
    one = train(load_config(None, [*common, f"train.output_dir={one_out}", "train.pairs_per_batch=2"]))
    ds_val = [r for r in _rows(ds_out) if "val_loss" in r]
    one_val = [r for r in _rows(one_out) if "val_loss" in r]
    assert [r["step"] for r in ds_val] == [r["step"] for r in one_val] == [1, 2, 3]
    for a, b in zip(ds_val, one_val, strict=True):
        assert a["val_pairs"] == b["val_pairs"] == 5  # the padding pair of the odd count has weight 0
        for k in ("val_loss", "val_reward_margin", "val_model_ref_gap"):
            # float32: after an optimizer step the 2-rank and 1-process weights differ by ~1e-6 relative
            # (tests/test_distributed.py WEIGHT_TOL); a logit is 0.5·β·(a difference of differences of MSEs ~1),
            # so with β = 100 that is ~1e-5 absolute on the margin (seen: 1.5e-6), near-cancelling by nature
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a["step"])
        assert a["val_implicit_acc"] == b["val_implicit_acc"]
    ds_summary = json.loads(results.read_text())["validate"]["summary"]
    assert ds_summary["validation"]["best_step"] == one["validation"]["best_step"]


def test_export_of_latest_equals_the_runs_own_export_lora(tiny_pipelines, pairs_dir, tmp_path):
    """`fastinpo export RUN --checkpoint latest` of a LoRA run (alpha != rank: the scale is folded in) writes the
    same file as the run's own export of its final weights."""
    from fastinpo.cli import main

    out = tmp_path / "run"
    train(_config(tiny_pipelines["sdxl"], pairs_dir, out, "diffusion-dpo", "lora.rank=4", "lora.alpha=8",
                  "train.max_steps=2", "data.validation_fraction=0"))
    assert main(["export", str(out), "--checkpoint", "latest"]) == 0
    name = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(out / "export" / name), load_file(out / "export-step-00000002" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", str(out), "--checkpoint", "best"]) == 2  # no keep_best: a clear error, no export
