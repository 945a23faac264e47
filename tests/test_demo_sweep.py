"""`fastinpo demo --sweep` end to end on a tiny budget (CPU, ~2 min): every method over the same lr grid, each
selected by validation implicit accuracy only, and the report's numbers recompute from its own parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastinpo import demo

TINY = demo.DemoSettings(world_images=64, vae_steps=3, vae_batch=8, pretrain_steps=3, pretrain_batch=8,
                         pair_prompts=64, tie_margin=1e-6, pref_steps=4, pref_batch=4, checkpoints=2, eval_seeds=1,
                         sample_steps=2, grid_seeds=2)


@pytest.mark.slow
def test_sweep_selects_by_validation_only(tmp_path):
    lrs = (1e-5, 1e-4)
    report = demo.run_sweep(tmp_path, seeds=1, progress=False, threads=1, settings=TINY, lrs=lrs)
    assert (tmp_path / "sweep_reward_vs_step.png").is_file()
    assert json.loads((tmp_path / "sweep_report.json").read_text())["aggregate"] == report["aggregate"]
    (seed,) = report["seeds"]
    for m in demo.METHODS:
        runs = [r for r in seed["runs"].values() if r["method"] == m]
        assert sorted(r["lr"] for r in runs) == sorted(lrs)  # the same grid for every method
        chosen = seed["selected"][m]
        best = max(r["best_val_implicit_acc"] for r in runs)
        assert chosen["val_implicit_acc"] == best  # selected by validation accuracy, whatever the reward
        run = next(r for r in runs if r["lr"] == chosen["lr"])
        assert chosen["step"] == run["best_step"]
        assert run["val_pairs"] > 0 and all(0 <= v["val_implicit_acc"] <= 1 for v in run["validation"])
        # the reported reward is that checkpoint's samples' mean; curves have the base point and 2 checkpoints
        rewards = np.array(seed["per_sample_rewards"][f"{m}|{demo._lr_key(chosen['lr'])}@{chosen['step']}"])
        assert chosen["mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)  # saved rounded to 6 decimals
        assert [p[0] for p in seed["reward_vs_step"][m][demo._lr_key(chosen["lr"])]] == [0, 2, 4]
    assert "over 1 seed(s)" in demo.format_sweep_table(report)
