"""`fastinpo demo --arch sd3` end to end at toy size (CPU): the flow generator (tiny MM-DiT) goes through every phase
— VAE, flow-SFT pretraining through the trainer, pairs from its own flow-Euler samples, flow SFT / Flow-DPO /
InPO-for-flows runs, evaluation — and every reported reward recomputes from the saved samples. (Toy budget: the
numbers are not a result; `fastinpo demo --arch sd3` with the normal budget is.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinpo import demo

TOY = dict(world_images=64, vae_steps=5, vae_batch=4, pretrain_steps=4, pretrain_batch=4, pair_prompts=16,
           pref_steps=2, pref_batch=4, eval_seeds=1, sample_steps=2, checkpoints=1, grid_seeds=2,
           tie_margin=0.0)  # an untrained generator's pairs are near-ties: keep them all


def test_sd3_demo_runs_every_phase(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "settings_for", lambda quick: demo.DemoSettings(**TOY))
    report = demo.run_demo(tmp_path, quick=True, seeds=1, progress=False, threads=1, arch="sd3")
    assert report["arch"].startswith("sd3")
    assert (tmp_path / "base" / "transformer" / "config.json").is_file() and not (tmp_path / "base" / "unet").exists()
    seed = report["seeds"][0]
    assert seed["pairs"]["pairs"] == 16
    data = np.load(tmp_path / "seed-0" / "samples.npz")
    captions = [str(c) for c in data["captions"]]
    for m in demo.METHODS:
        assert seed["final"][m]["step"] == 2
        assert np.isfinite(seed["train_metrics_last"][m]["loss"])
        r = demo.reward(torch.from_numpy(data[f"{m}@2"]), captions).numpy()
        assert r.mean() == pytest.approx(seed["reward_vs_step"][m][-1][1], abs=1e-6)
    assert seed["train_metrics_last"]["inpo"]["inversion_steps"] >= 1
    assert (tmp_path / "report.json").is_file() and (tmp_path / "samples.png").is_file()
    # a flow model's rows are named for what they are; the UNet demo keeps its names
    assert report["labels"] == demo.FLOW_LABELS
    table = demo.format_table(report)
    for name in ("flow SFT", "Flow-DPO", "InPO-flow (fastinpo's extension)"):
        assert name in table
    assert "Diffusion-DPO" not in table and "DDIM-InPO" not in table
    unet_table = demo.format_table({k: v for k, v in report.items() if k != "labels"})
    assert "Diffusion-DPO" in unet_table and "DDIM-InPO" in unet_table and "Flow-DPO" not in unet_table
