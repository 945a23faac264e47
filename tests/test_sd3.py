"""SD3 / SD3.5 flow models end to end on the tiny SD3 pipeline (CPU; SPEC §7, issue 19): the pipeline maker
(loadable by a stock ``StableDiffusion3Pipeline``), prompt encoding equal to ``encode_prompt``, Flow-DPO against a
direct float64 computation, every method x full/LoRA training, exact resume, export into a stock pipeline, the
refusal of Inversion-DPO, sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastinpo.config import MethodConfig, load_config
from fastinpo.train import checkpoint as ckpt
from fastinpo.train import train

PROMPTS = ["a red cube on a table", "", "an astronaut riding a horse, " * 12]  # the last one is truncated at 77


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    """The tiny SD3 pipeline, written by `fastinpo make-tiny-pipeline DIR --arch sd3`."""
    from fastinpo.cli import main

    out = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    assert main(["make-tiny-pipeline", str(out), "--arch", "sd3"]) == 0
    return out


def _stock(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


def test_tiny_sd3_pipeline_is_a_stock_pipeline(sd3_pipeline):
    from fastinpo.models.family import detect_arch, family_for_folder

    assert detect_arch(sd3_pipeline) == "sd3" and family_for_folder(sd3_pipeline).name == "sd3"
    pipe = _stock(sd3_pipeline)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0 and pipe.text_encoder_3 is None
    assert pipe.tokenizer.vocab_size == 49408  # the real CLIP vocabulary
    images = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_encode_text_equals_stock_encode_prompt(sd3_pipeline):
    from fastinpo.models.sd3 import SD3Encoder, load_components

    pipe = _stock(sd3_pipeline)
    prompt, _, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False)
    enc = SD3Encoder(load_components(sd3_pipeline, load_unet=False))
    mine, mine_pooled = enc.encode_text(PROMPTS)
    # (3, 77 CLIP + 256 T5 zeros, joint_attention_dim 64), pooled (3, 32 + 32)
    assert mine.shape == (3, 77 + 256, 64) and mine_pooled.shape == (3, 64)
    assert torch.equal(mine, prompt.float()) and torch.equal(mine_pooled, pooled.float())
    assert mine[:, 77:].abs().max() == 0 and mine[:, :77].abs().max() > 0.1


def _models(folder, perturb: float):
    import copy

    from fastinpo.methods.base import Models
    from fastinpo.models.family import denoiser_forward
    from fastinpo.models.sd3 import load_components

    comps = load_components(folder, load_vae=False, load_text=False)
    policy = comps.unet
    ref = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g))
    return policy, ref, Models(lambda x, t, c: denoiser_forward(policy, x, t, c, torch.float32),
                               lambda x, t, c: denoiser_forward(ref, x, t, c, torch.float32)), comps


def _inputs(B, seed=0):
    from fastinpo.methods.base import PairRandomness, StepInputs

    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2 * B, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(B, 333, 64, generator=g).repeat(2, 1, 1),
            "pooled_projections": torch.randn(B, 64, generator=g).repeat(2, 1)}
    return StepInputs(z0, cond, PairRandomness.for_positions(7, list(range(3, 3 + B)), "cpu"))


def test_flow_dpo_equals_a_direct_float64_computation(sd3_pipeline):
    """Flow-DPO (SPEC §7) against a float64 computation written from the formula: σ_i at i = floor(u T) with u from
    diffusers' compute_density_for_timestep_sampling on the pair's host stream, ε from its device stream,
    x = (1 - σ) z0 + σ ε, v = ε - z0, the Diffusion-DPO loss with β·0.5 on the velocities; and identical
    predictions give exactly ln 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from fastinpo.methods import build_method
    from fastinpo.methods.base import PairRandomness
    from fastinpo.ops.flow import FlowSchedule

    policy, ref, models, comps = _models(sd3_pipeline, 0.02)
    schedule = FlowSchedule.from_config(comps.scheduler_config)
    beta = 500.0
    method = build_method(MethodConfig(name="diffusion-dpo", beta=beta), schedule)
    B = 3
    inputs = _inputs(B)
    out = method(inputs, models)

    sched = FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)
    fresh = PairRandomness.for_positions(7, list(range(3, 3 + B)), "cpu")
    u = torch.cat([compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0,
                                                         generator=g) for g in fresh.host])
    idx = (u * 1000).long().clamp(0, 999)
    sigma, timestep = sched.sigmas[idx].double(), sched.timesteps[idx].float()
    eps = fresh.randn((4, 16, 16), "cpu").double()
    z0 = inputs.z0.double()
    s = sigma.repeat(2).view(-1, 1, 1, 1)
    x = (1 - s) * z0 + s * eps.repeat(2, 1, 1, 1)
    v = eps.repeat(2, 1, 1, 1) - z0
    with torch.no_grad():
        mp = models.policy(x.float(), timestep.repeat(2), inputs.cond).double()
        rp = models.reference(x.float(), timestep.repeat(2), inputs.cond).double()
    m = ((mp - v) ** 2).mean((1, 2, 3))
    r = ((rp - v) ** 2).mean((1, 2, 3))
    logits = -0.5 * beta * ((m[:B] - m[B:]) - (r[:B] - r[B:]))
    expected = -torch.nn.functional.logsigmoid(logits).mean()
    assert abs(float(out.loss) - float(expected)) < 1e-4 * max(1.0, float(expected)), (float(out.loss),
                                                                                     float(expected))
    assert abs(float(expected) - math.log(2)) > 1e-3  # the perturbed policy is not the reference

    from fastinpo.methods.base import Models

    same = method(_inputs(B), Models(models.reference, models.reference))
    assert float(same.loss) == pytest.approx(math.log(2), abs=1e-7)


def test_inversion_dpo_is_refused_for_flow_models(sd3_pipeline, tmp_path):
    from fastinpo.config import check_before_loading
    from fastinpo.methods import build_method
    from fastinpo.ops.flow import FlowSchedule

    config = load_config(None, [f"model.path={sd3_pipeline}", "method.name=inversion-dpo",
                                "method.symmetry_breaking=reference-dtype", "model.reference_dtype=bfloat16",
                                f"data.path={tmp_path}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="inversion-dpo.* is not defined for flow-matching models"):
        check_before_loading(config)
    with pytest.raises(ValueError, match="not defined for flow-matching models"):
        build_method(MethodConfig(name="inversion-dpo"), FlowSchedule.sd3())


def _config(pipeline, data, out, method, *extra):
    over = [f"model.path={pipeline}", f"data.path={data}", "data.resolution=32", f"method.name={method}",
            "train.max_steps=2", "train.pairs_per_batch=2", f"train.output_dir={out}", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-4", "optim.scale_lr=false", "method.inversion_levels=4",
            "data.caption_dropout=0.5"]
    return load_config(None, over + list(extra))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "diffusion-dpo", "inpo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_flow_method_trains_and_exports(method, lora, sd3_pipeline, pickapic_dir, tmp_path):
    from fastinpo.eval.sampling import build_pipeline

    out = tmp_path / "run"
    extra = ["lora.rank=4"] if lora else []
    summary = train(_config(sd3_pipeline, pickapic_dir, out, method, *extra))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "lr")) and r["grad_norm"] > 0
    if method != "sft":  # policy == reference at step 1: the logits are 0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # one update moved the policy
    if method == "inpo":
        assert 1 <= rows[0]["inversion_steps"] <= 4
    weights = load_file(ckpt.list_checkpoints(out)[-1][1] / ckpt.WEIGHTS)
    if lora:
        assert any("add_q_proj" in k for k in weights) and all("lora" in k for k in weights)
    # the export drops into a stock StableDiffusion3Pipeline and reproduces the trained transformer
    export = out / "export"
    pipe = (build_pipeline(sd3_pipeline, lora=export / "lora") if lora
            else build_pipeline(sd3_pipeline, unet=export))
    if not lora:
        trained = pipe.transformer.state_dict()
        assert all(torch.equal(trained[k], v) for k, v in weights.items())
    else:
        from peft import LoraConfig

        from fastinpo.models.family import FAMILIES
        from fastinpo.models.sd3 import load_components

        base = load_components(sd3_pipeline, load_vae=False, load_text=False).unet
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g)
        cond = dict(encoder_hidden_states=torch.randn(1, 333, 64, generator=g),
                    pooled_projections=torch.randn(1, 64, generator=g))
        with torch.no_grad():
            stock = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), **cond).sample
            untrained = base(hidden_states=x, timestep=torch.tensor([500.0]), **cond).sample
            # the trained policy: the base with the checkpoint's adapters (every targeted projection)
            targets = FAMILIES["sd3"].lora_targets(["to_q", "to_k", "to_v", "to_out.0"], base)
            base.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
            missing = base.load_state_dict(weights, strict=False)
            assert not missing.unexpected_keys
            trained = base(hidden_states=x, timestep=torch.tensor([500.0]), **cond).sample
        assert (trained - untrained).abs().max() > 1e-6  # the adapters moved the prediction
        torch.testing.assert_close(stock, trained, rtol=1e-5, atol=1e-6)  # and the stock loader applies all
    images = pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert torch.isfinite(images).all()
    assert summary["export"] == str(export)


@pytest.mark.parametrize("method,lora", [("inpo", True), ("diffusion-dpo", False)])
def test_flow_resume_is_exact(method, lora, sd3_pipeline, pickapic_dir, tmp_path):
    extra = ["train.max_steps=3", "train.checkpoint_every=1"] + (["lora.rank=4"] if lora else [])
    train(_config(sd3_pipeline, pickapic_dir, tmp_path / "a", method, *extra))
    train(_config(sd3_pipeline, pickapic_dir, tmp_path / "b", method, *extra), stop_after=1)
    train(_config(sd3_pipeline, pickapic_dir, tmp_path / "b", method, *extra), resume="latest")
    a = load_file(ckpt.list_checkpoints(tmp_path / "a")[-1][1] / ckpt.WEIGHTS)
    b = load_file(ckpt.list_checkpoints(tmp_path / "b")[-1][1] / ckpt.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(tmp_path / "b")]


def test_flow_training_from_a_cache(sd3_pipeline, pickapic_dir, tmp_path):
    """`fastinpo cache` on an SD3 folder stores the pooled and sequence embeds (no time ids); a run from it loses
    no pair and gives the same first loss as on-the-fly encoding."""
    from fastinpo.cli import main

    cache = tmp_path / "cache"
    common = ["--set", f"model.path={sd3_pipeline}", "--set", f"data.path={pickapic_dir}", "--set",
              "data.resolution=32", "--set", f"data.cache_dir={cache}"]
    assert main(["cache", *common]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["signature"]["arch"] == "sd3"
    from safetensors import safe_open

    # cache format 2: text embeddings once per distinct caption, in their own shards
    with safe_open(str(cache / manifest["files"]["text"][0]["file"]), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("prompt_embeds").get_shape()[1:] == [333, 64]
        assert f.get_slice("pooled_embeds").get_shape()[1:] == [64]
    assert "time_ids" not in keys
    a = train(_config(sd3_pipeline, pickapic_dir, tmp_path / "a", "diffusion-dpo", "data.caption_dropout=0",
                      "train.max_steps=1"))
    b = train(_config(sd3_pipeline, pickapic_dir, tmp_path / "b", "diffusion-dpo", "data.caption_dropout=0",
                      "train.max_steps=1", f"data.cache_dir={cache}"))
    assert a["pairs"] == b["pairs"] > 0
    la, lb = _metrics(tmp_path / "a")[0], _metrics(tmp_path / "b")[0]
    assert la["model_mse"] == pytest.approx(lb["model_mse"], rel=1e-3)  # embeds stored in float16 by default


def test_sd35_medium_config_counts_without_allocating():
    """The real-size maker's SD3.5-medium transformer, built on the meta device (no memory). The count pins this
    config (2.243 B; the public checkpoint was not available offline to compare: the fields are those of its
    transformer/config.json as written in fastinpo.models.full_size)."""
    from fastinpo.models import full_size

    t = full_size.build_sd3_transformer(device="meta")
    assert next(t.parameters()).is_meta
    assert full_size.parameter_count(t) == 2_243_171_520
    assert t.config.joint_attention_dim == 4096 and t.config.pooled_projection_dim == 2048
    with pytest.raises(ValueError, match="meta"):
        full_size.make_full_sd3_pipeline("/nonexistent/x", device="meta")


@pytest.mark.parametrize("method", ["sft", "diffusion-dpo", "inpo"])
def test_flow_methods_validate_on_held_out_pairs(method, sd3_pipeline, pickapic_dir, tmp_path):
    """Preference validation (issue 21) on a flow model: the metrics are finite, implicit accuracy is a fraction,
    and an untrained policy (step 0 of a LoRA run = the reference) would have a zero gap; after training it moved."""
    out = tmp_path / method
    train(_config(sd3_pipeline, pickapic_dir, out, method, "train.max_steps=2", "train.validate_every=1",
                  "data.validation_fraction=0.3", "lora.rank=4"))
    rows = [r for r in _metrics(out) if "val_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["val_loss"]) and 0.0 <= r["val_implicit_acc"] <= 1.0 and r["val_pairs"] > 0
        assert math.isfinite(r["val_model_ref_gap"]) and r["val_model_ref_gap"] > 0.0
