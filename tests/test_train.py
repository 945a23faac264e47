"""The trainer end to end on tiny SD1.5 / SDXL pipelines (CPU): every method, full and LoRA; exact resume;
export into stock diffusers; the memory-light Inversion-DPO gradient; NaN handling; bad data and configs; the
cache; a SIGKILL in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastinpo.config import load_config
from fastinpo.train import checkpoint as ckpt
from fastinpo.train import train
from tests.tolerances import assert_close_model_grad


def _config(pipeline, data, out, method="diffusion-dpo", *extra):
    over = [f"model.path={pipeline}", f"data.path={data}", "data.resolution=32", f"method.name={method}",
            "train.max_steps=2", "train.pairs_per_batch=2", f"train.output_dir={out}", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-4", "optim.scale_lr=false", "method.num_steps=3",
            "method.inversion_levels=4", "data.caption_dropout=0.5"]
    if method == "inversion-dpo":
        over += ["data.caption_dropout=0.0"]
        if not any(e.startswith("lora.rank") for e in extra):
            over += ["method.symmetry_breaking=reference-dtype", "model.reference_dtype=bfloat16"]
    return load_config(None, over + list(extra))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(ckpt.list_checkpoints(out)[-1][1] / ckpt.WEIGHTS)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["sft", "diffusion-dpo", "inpo", "inversion-dpo"])
@pytest.mark.parametrize("lora", [False, True])
def test_every_method_trains(arch, method, lora, tiny_pipelines, pickapic_dir, tmp_path):
    extra = ["lora.rank=4"] if lora else []
    if method == "inversion-dpo" and lora:
        extra += ["lora.init=gaussian", "method.symmetry_breaking=lora-init"]
    summary = train(_config(tiny_pipelines[arch], pickapic_dir, tmp_path, method, *extra))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "grad_norm", "lr"))
    assert rows[0]["grad_norm"] > 0  # the gradient norm is logged from the first step and is not zero
    if method in ("diffusion-dpo", "inpo") and not lora:
        # policy == reference at step 1, so loss = log 2 up to float32 rounding: with grad enabled the policy's
        # attention may run another CPU kernel than the reference's, and β = 5000 turns an MSE difference of
        # ~1e-7 into a logit of ~1e-3 — hence 1e-3, not exact equality
        assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-3)
    assert summary["skipped_rows"].get("tie", 0) >= 1  # the synthetic data has ties; dropped by default
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "export" / ("lora" if lora else "unet")).is_dir()


def test_inversion_dpo_without_symmetry_breaking_is_refused(tiny_pipelines, pickapic_dir, tmp_path):
    config = _config(tiny_pipelines["sd15"], pickapic_dir, tmp_path, "inversion-dpo",
                     "method.symmetry_breaking=none", "model.reference_dtype=float32")
    with pytest.raises(ValueError, match="would train nothing"):
        train(config)
    with pytest.raises(ValueError, match="lora-init"):
        train(_config(tiny_pipelines["sd15"], pickapic_dir, tmp_path, "inversion-dpo",
                      "method.symmetry_breaking=lora-init", "lora.rank=4", "lora.init=zero"))


@pytest.mark.parametrize("method", ["diffusion-dpo", "inpo"])
def test_resume_is_exact(method, tiny_pipelines, pickapic_dir, tmp_path):
    extra = ("train.max_steps=4", "train.grad_accum=2", "method.eta=0.1", "train.checkpoint_every=0")
    straight = tmp_path / "straight"
    train(_config(tiny_pipelines["sdxl"], pickapic_dir, straight, method, *extra))
    resumed = tmp_path / "resumed"
    first = train(_config(tiny_pipelines["sdxl"], pickapic_dir, resumed, method, *extra), stop_after=2)
    assert first["step"] == 2 and "export" not in first
    second = train(_config(tiny_pipelines["sdxl"], pickapic_dir, resumed, method, *extra), resume="latest")
    assert second["step"] == 4
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(resumed)]


def test_micro_batching_does_not_change_the_training(tiny_pipelines, pickapic_dir, tmp_path):
    """Randomness is per pair (seeded by its stream position): 4 pairs x 1 micro-batch and 2 pairs x 2 micro-batches
    are the same training, up to float32 summation order (different UNet batch sizes)."""
    runs = {}
    for name, batch, accum in (("one", 4, 1), ("two", 2, 2)):
        out = tmp_path / name
        train(_config(tiny_pipelines["sdxl"], pickapic_dir, out, "inpo", "train.max_steps=2", "method.eta=0.1",
                      f"train.pairs_per_batch={batch}", f"train.grad_accum={accum}", "method.beta=100"))
        runs[name] = (_metrics(out), _weights(out))
    (m1, w1), (m2, w2) = runs["one"], runs["two"]
    for a, b in zip(m1, m2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    # Adam divides by sqrt(v): for a weight whose gradient is near 0, float32 noise in the gradient (the UNet
    # runs on batches of 8 vs 4 samples) becomes an update difference of up to a fraction of lr (1e-4 here) —
    # so the weights are compared at 0.3 lr (seen: up to 0.12 lr)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=3e-5)


def test_validation_grids_are_written(tiny_pipelines, pickapic_dir, tmp_path):
    from PIL import Image

    train(_config(tiny_pipelines["sdxl"], pickapic_dir, tmp_path, "sft", "train.sample_every=2",
                  'train.sample_prompts=["a red fox", "a castle", "the sea"]'))
    grid = Image.open(tmp_path / "samples" / "step-00000002.png")
    assert grid.height >= 3 * 32 and grid.width >= 4 * 32  # rows: 3 prompts, columns: 4 seeds
    assert len(set(grid.convert("L").getdata())) > 10  # real images, not a blank sheet


def test_full_export_loads_into_stock_diffusers(tiny_pipelines, pickapic_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    train(_config(tiny_pipelines["sdxl"], pickapic_dir, tmp_path, "diffusion-dpo"))
    trained = _weights(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in trained.items())
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipelines["sdxl"], unet=unet)
    image = pipe("a red fox", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_lora_export_loads_into_stock_diffusers(tiny_pipelines, pickapic_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    train(_config(tiny_pipelines["sd15"], pickapic_dir, tmp_path, "diffusion-dpo", "lora.rank=4"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines["sd15"], safety_checker=None)
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    before = pipe.unet(x, t, encoder_hidden_states=h).sample
    pipe.load_lora_weights(tmp_path / "export" / "lora")
    after = pipe.unet(x, t, encoder_hidden_states=h).sample
    assert not torch.allclose(before, after)  # the trained (non-zero) adapters are applied
    lora_params = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
    assert lora_params and any(v.abs().max() > 0 for v in lora_params.values())


def test_memory_light_gradient_equals_all_in_graph(moved_sd15_models):
    """SPEC §4: the two-pass gradient equals the gradient of the whole graph (policy moved off the reference)."""
    from fastinpo.config import MethodConfig
    from fastinpo.methods import build_method
    from fastinpo.methods.base import PairRandomness, StepInputs

    policy_unet, models, schedule = moved_sd15_models
    g = torch.Generator().manual_seed(0)
    inputs = StepInputs(torch.randn(4, 4, 16, 16, generator=g), {"encoder_hidden_states": torch.randn(4, 77, 32,
                        generator=g)}, PairRandomness.for_positions(0, [0, 1], "cpu"))
    grads = {}
    for light in (True, False):
        policy_unet.zero_grad()
        method = build_method(MethodConfig(name="inversion-dpo", beta=50.0, num_steps=3, memory_light=light), schedule)
        out = method(inputs, models, loss_scale=0.5)
        if not out.backward_done:
            (out.loss * 0.5).backward()
        grads[light] = torch.cat([p.grad.flatten() for p in policy_unet.parameters()])
    assert grads[False].abs().max() > 1e-6
    assert_close_model_grad(grads[True], grads[False])


def test_nan_steps_are_skipped_and_repeated_nans_stop(tiny_pipelines, pickapic_dir, tmp_path, monkeypatch):
    import fastinpo.train.loop as loop

    real = loop.build_method

    def poisoned(config, schedule):
        method = real(config, schedule)
        calls = {"n": 0}

        def call(inputs, models, loss_scale=1.0):
            calls["n"] += 1
            out = method(inputs, models, loss_scale)
            if calls["n"] >= 2:  # from the second micro-batch on, the loss is NaN
                out.loss = out.loss * float("nan")
            return out

        return call

    monkeypatch.setattr(loop, "build_method", poisoned)
    config = _config(tiny_pipelines["sd15"], pickapic_dir, tmp_path, "diffusion-dpo", "train.max_steps=6",
                     "train.max_nan_steps=3")
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive"):
        train(config)
    rows = _metrics(tmp_path)
    assert rows[-1]["nan_steps"] == 3
    step1 = load_file(ckpt.list_checkpoints(tmp_path)[-1][1] / ckpt.WEIGHTS)
    # the NaN steps did not change the weights: the checkpoint at the stop equals the weights after step 1
    monkeypatch.setattr(loop, "build_method", real)
    ref_out = tmp_path / "one-step"
    train(_config(tiny_pipelines["sd15"], pickapic_dir, ref_out, "diffusion-dpo", "train.max_steps=1"))
    one = _weights(ref_out)
    assert all(torch.equal(step1[k], one[k]) for k in one)


def test_bad_configs_and_data_have_clear_messages(tiny_pipelines, pickapic_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'train.max_step'"):
        load_config(None, ["model.path=x", "data.path=y", "train.max_step=3"])
    with pytest.raises(ValueError, match="method.name must be one of"):
        load_config(None, ["model.path=x", "data.path=y", "method.name=dpo"])
    with pytest.raises(ValueError, match="model.path is required"):
        load_config(None, ["data.path=y"])
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npath = "x"\n[data]\npath = "y"\n[trian]\nmax_steps = 1\n')
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        load_config(cfg)
    with pytest.raises(FileNotFoundError, match="missing"):
        train(_config(tmp_path, pickapic_dir, tmp_path / "o"))
    from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

    bad = tmp_path / "ties-only"
    bad.mkdir()
    rows = synthetic_rows(3, 40, seed=1, tie_every=1)  # every row a tie: nothing usable by default
    write_pickapic_parquet(bad / "x.parquet", rows)
    with pytest.raises(ValueError, match="no usable preference pairs"):
        train(_config(tiny_pipelines["sd15"], bad, tmp_path / "o2"))


def test_config_files_and_saved_config_roundtrip(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('[model]\npath = "m"\n[data]\npath = "d"\n[method]\nname = "inpo"\nbeta = 2000\n'
                    '[optim]\nlr = 1e-8\n')
    yml = tmp_path / "a.yaml"
    yml.write_text("model: {path: m}\ndata: {path: d}\nmethod: {name: inpo, beta: 2000}\noptim: {lr: 1.0e-8}\n")
    a, b = load_config(toml), load_config(yml)
    assert a == b and a.method.beta == 2000.0 and a.optim.lr == 1e-8
    c = load_config(toml, ["method.eta=0", "train.sample_prompts=[\"a cat\"]"])
    assert c.method.eta == 0.0 and c.train.sample_prompts == ["a cat"]
    from fastinpo.config import save_config

    save_config(c, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == c


def test_cache_is_used_and_stale_cache_refused(tiny_pipelines, pickapic_dir, tmp_path):
    from fastinpo.cli import main
    from fastinpo.data.cache import StaleCacheError

    cache = tmp_path / "cache"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_pipelines['sdxl']}}}\n"
                   f"data: {{path: {pickapic_dir}, resolution: 32, cache_dir: {cache}}}\n"
                   f"method: {{name: inpo, inversion_levels: 4}}\n"
                   f"train: {{max_steps: 2, pairs_per_batch: 2, output_dir: {tmp_path / 'run'}, progress: false}}\n")
    assert main(["cache", str(cfg)]) == 0
    summary = train(load_config(cfg))
    assert summary["step"] == 2
    with pytest.raises(StaleCacheError, match="resolution"):
        train(load_config(cfg, ["data.resolution=16", f"train.output_dir={tmp_path / 'run2'}"]))


KILLER = textwrap.dedent("""
    import os, signal, sys
    import fastinpo.train.checkpoint as ckpt
    from fastinpo.config import load_config
    from fastinpo.train import train

    real_save = ckpt.torch.save
    state = {"calls": 0}

    def dying_save(obj, path, *a, **k):  # SIGKILL ourselves while writing the second checkpoint
        if str(path).endswith("lr_scheduler.pt"):
            state["calls"] += 1
            if state["calls"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)

    ckpt.torch.save = dying_save
    # the parent's thread count: it sets float summation order, and the parent finishes this run
    ckpt.torch.set_num_threads(int(os.environ["FASTINPO_TEST_THREADS"]))
    train(load_config(sys.argv[1], sys.argv[2:]))
""")


def test_sigkill_during_checkpoint_write_resumes_from_previous(tiny_pipelines, pickapic_dir, tmp_path):
    out = tmp_path / "run"
    over = [f"model.path={tiny_pipelines['sd15']}", f"data.path={pickapic_dir}", "data.resolution=32",
            "method.name=diffusion-dpo", "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=5",
            f"train.output_dir={out}", "train.progress=false", "optim.scale_lr=false"]
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg), *over], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd(),
                                            "FASTINPO_TEST_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]  # the half-written step 2 is not a checkpoint
    assert list((out / "checkpoints").glob(".tmp-*"))  # ... its leftovers are there
    summary = train(load_config(cfg, over), resume="latest")
    assert summary["step"] == 4 and summary["removed_partial_checkpoints"]
    straight = tmp_path / "straight"
    train(load_config(cfg, [o if not o.startswith("train.output_dir") else f"train.output_dir={straight}"
                            for o in over]))
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_inversion_copy_is_the_policy_refreshed_every_step(lora, tiny_pipelines, pickapic_dir, tmp_path):
    """method.inversion_copy: a float32 copy trains exactly like inverting with the policy itself (so the copy is
    refreshed after every step, adapters included); a bf16 copy trains, and holds the policy's current weights."""
    from fastinpo.models.sd import load_components
    from fastinpo.train.models import build_models

    extra = ["train.max_steps=3", "method.eta=0.1", "method.beta=100", *(["lora.rank=4"] if lora else [])]
    runs = {}
    for copy_dtype in ("none", "float32", "bfloat16"):
        out = tmp_path / copy_dtype
        train(_config(tiny_pipelines["sd15"], pickapic_dir, out, "inpo", *extra,
                      f"method.inversion_copy={copy_dtype}"))
        runs[copy_dtype] = (_metrics(out), _weights(out))
    (m0, w0), (m1, w1), (m2, w2) = runs["none"], runs["float32"], runs["bfloat16"]
    assert [r["loss"] for r in m0] == [r["loss"] for r in m1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m2)
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)  # the bf16 copy is what inverts: another training

    config = _config(tiny_pipelines["sd15"], pickapic_dir, tmp_path / "x", "inpo", *extra,
                     "method.inversion_copy=bfloat16")
    models = build_models(config, load_components(tiny_pipelines["sd15"], load_vae=False, load_text=False).unet,
                          torch.device("cpu"))
    copy_params = dict(models.inversion_unet.named_parameters())
    with torch.no_grad():
        for p in models.trainable:  # an optimizer step
            p.add_(torch.randn_like(p))
    name = models.trainable_names[0]
    assert not torch.equal(copy_params[name], models.trainable[0].to(torch.bfloat16))
    models.refresh_inversion_copy()
    for n, p in zip(models.trainable_names, models.trainable, strict=True):
        assert copy_params[n].dtype == torch.bfloat16 and torch.equal(copy_params[n], p.to(torch.bfloat16))
    with pytest.raises(ValueError, match="inversion_copy is for InPO"):
        _config(tiny_pipelines["sd15"], pickapic_dir, tmp_path, "diffusion-dpo",
                "method.inversion_copy=bfloat16").validate()


@pytest.mark.slow
def test_compiled_unets_train_like_eager_ones(tiny_pipelines, pickapic_dir, tmp_path):
    """model.compile: the same training through torch.compile'd UNet calls (inductor reorders float32 sums, hence a
    tolerance, not equality), and the saved weights are the plain module's (loadable without compile)."""
    extra = ["train.max_steps=2", "lora.rank=4", "method.beta=100"]
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        train(_config(tiny_pipelines["sd15"], pickapic_dir, out, "diffusion-dpo", *extra, f"model.compile={flag}"))
        runs[flag] = (_metrics(out), _weights(out))
    (m0, w0), (m1, w1) = runs["false"], runs["true"]
    for a, b in zip(m0, m1, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert w0.keys() == w1.keys() and not any("_orig_mod" in k for k in w1)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-6)
