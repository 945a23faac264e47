"""The benchmark's reference training step (benchmarks/reference/) computes what fastinpo computes: for the same z0,
t, noise and conditioning, the loss and the gradient of one step agree within the float32 tolerance of
tests/tolerances.py — Diffusion-DPO, DDIM-InPO (η = 0 and η > 0 with the same per-sample noise) and Inversion-DPO
(policy moved off the reference first: at θ = θ_ref its gradient is exactly 0), full and LoRA; and Flow-DPO on the
tiny SD3 pipeline (the same σ and ε per pair), full and LoRA, with its every-step SD3 prompt encoding. A faster wrong
answer would not count, so the benchmark's ratios rest on this test."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.reference import train_step as ref
from fastinpo.config import load_config
from fastinpo.methods import build_method
from fastinpo.methods.base import PairRandomness, StepInputs
from fastinpo.models.sd import Encoder, load_components
from fastinpo.ops.schedule import NoiseSchedule, inpo_grid
from fastinpo.train.models import build_models
from tests.tolerances import FLOAT32_RTOL, assert_close_fp32

SEED = 7


def _setup(pipeline, *, lora: bool, gen: torch.Generator, method_over=()):
    """fastinpo's models as the trainer builds them (float32 reference for this check), the policy moved off the
    reference, and the reference implementation's models holding bit-identical copies of both.

    fastinpo's ops run on their eager ``reference`` backend here: this test checks that the benchmark's baseline
    computes fastinpo's *method* (structure, conventions, gradient); the fused inversion step the dispatcher picks
    where the extension is built rounds differently, and tests/test_extension.py checks it against the eager op.
    """
    over = [f"model.path={pipeline}", "data.path=unused", "method.name=diffusion-dpo", "model.reference_dtype=float32",
            f"train.seed={SEED}", "method.loss_backend=reference", *method_over]
    if lora:
        over += ["lora.rank=4"]
    config = load_config(None, over)
    comps = load_components(pipeline, load_vae=False, load_text=False)
    models = build_models(config, comps.unet, torch.device("cpu"))
    with torch.no_grad():  # off the reference: Inversion-DPO's gradient is 0 at θ = θ_ref, LoRA's B starts at 0
        for p in models.trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    schedule = NoiseSchedule.from_config(comps.scheduler_config)
    reference = ref.build_reference_models(
        copy.deepcopy(models.unet), schedule, lora=lora,
        ref_unet=None if lora else copy.deepcopy(models.reference_unet), ref_dtype=torch.float32, lr=None)
    return config, models, reference, schedule


def _inputs(B: int, gen: torch.Generator):
    """Random z0 and SDXL-shaped conditioning of the tiny pipeline (text 77 x 64, pooled 32, time ids R = 32)."""
    z0 = torch.randn(2 * B, 4, 16, 16, generator=gen)
    prompt = torch.randn(B, 77, 64, generator=gen)
    pooled = torch.randn(B, 32, generator=gen)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(2 * B, 1)
    return z0, ref.make_cond(prompt, pooled, time_ids)


def _grads(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def _assert_same(fast_loss, fast_grad, ref_loss, ref_grad, what):
    assert_close_fp32(fast_loss, ref_loss, what=f"{what} loss")
    assert ref_grad.abs().max() > 1e-6, f"{what}: the gradient is trivially 0"
    # Elementwise relative error is meaningless for gradient entries that are themselves ~0 (their float32 noise
    # comes from the large entries' sums); the absolute floor is FLOAT32_RTOL of the gradient's scale instead.
    assert_close_fp32(fast_grad, ref_grad, atol=FLOAT32_RTOL * float(ref_grad.abs().max()), what=f"{what} grad")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_diffusion_dpo_matches(tiny_pipelines, lora):
    gen = torch.Generator().manual_seed(11)
    config, models, reference, schedule = _setup(tiny_pipelines["sdxl"], lora=lora, gen=gen,
                                                 method_over=["method.beta=200"])
    B = 2
    z0, cond = _inputs(B, gen)
    positions = [3, 4]
    fast = build_method(config.method, schedule)(StepInputs(z0, cond, PairRandomness.for_positions(SEED, positions,
                                                                                                  "cpu")),
                                                 models.callables)
    fast.loss.backward()
    rng = PairRandomness.for_positions(SEED, positions, "cpu")  # the same per-pair draws, fed to the reference
    t = rng.timesteps(schedule.num_train_timesteps)
    noise = rng.randn(z0.shape[1:], "cpu")
    out = ref.diffusion_dpo_loss(reference, z0, cond, t, noise, beta=200.0)
    out.loss.backward()
    _assert_same(fast.loss, _grads(models.trainable), out.loss, _grads(reference.trainable), "diffusion-dpo")


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_inpo_matches(tiny_pipelines, eta):
    gen = torch.Generator().manual_seed(12)
    config, models, reference, schedule = _setup(
        tiny_pipelines["sdxl"], lora=False, gen=gen,
        method_over=["method.name=inpo", "method.beta=200", f"method.eta={eta}", "method.inversion_levels=10"])
    B = 3
    z0, cond = _inputs(B, gen)
    positions = [0, 1, 2]
    rng = PairRandomness.for_positions(SEED, positions, "cpu")
    t = rng.timesteps(schedule.num_train_timesteps)
    counts = inpo_grid(schedule, 10).num_steps(t)
    assert len(set(counts.tolist())) > 1, "pairs with different inversion lengths exercise the masking / prefix"
    fast = build_method(config.method, schedule)(StepInputs(z0, cond, PairRandomness.for_positions(SEED, positions,
                                                                                                  "cpu")),
                                                 models.callables)
    fast.loss.backward()
    out = ref.inpo_loss(reference, z0, cond, t, beta=200.0, num_levels=10, eta=eta, generators=rng.samples)
    out.loss.backward()
    _assert_same(fast.loss, _grads(models.trainable), out.loss, _grads(reference.trainable), f"inpo eta={eta}")


@pytest.mark.parametrize(("lora", "memory_light"), [(False, True), (True, True), (False, False)],
                         ids=["full-two-pass", "lora-two-pass", "full-all-in-graph"])
def test_inversion_dpo_matches(tiny_pipelines, lora, memory_light):
    gen = torch.Generator().manual_seed(13)
    config, models, reference, schedule = _setup(tiny_pipelines["sdxl"], lora=lora, gen=gen)
    config = load_config(None, [f"model.path={tiny_pipelines['sdxl']}", "data.path=unused",
                                "method.name=inversion-dpo", "method.beta=500", "method.num_steps=3",
                                f"method.memory_light={str(memory_light).lower()}", "method.loss_backend=reference"])
    B = 2
    z0, cond = _inputs(B, gen)
    fast = build_method(config.method, schedule)(StepInputs(z0, cond, PairRandomness.for_positions(SEED, [0, 1],
                                                                                                  "cpu")),
                                                 models.callables)
    if not fast.backward_done:
        fast.loss.backward()
    out = ref.inversion_dpo_loss(reference, z0, cond, beta=500.0, num_steps=3, guidance_scale=2.0)
    out.loss.backward()
    _assert_same(fast.loss, _grads(models.trainable), out.loss, _grads(reference.trainable), "inversion-dpo")


def test_encoders_match(tiny_pipelines):
    """The reference's every-step encoders give the conditioning fastinpo's Encoder (and cache) gives."""
    comps = load_components(tiny_pipelines["sdxl"], load_unet=False)
    encoder = Encoder(comps)
    reference = ref.ReferenceModels(None, None, NoiseSchedule.stable_diffusion(), vae=comps.vae,
                                    text_encoders=comps.text_encoders, tokenizers=comps.tokenizers, arch="sdxl")
    captions = ["a red fox in the snow", "", "two castles at dusk"]
    prompt, pooled = ref.encode_prompt(reference, captions)
    want_prompt, want_pooled = encoder.encode_text(captions)
    assert_close_fp32(prompt, want_prompt, what="prompt embeds")
    assert_close_fp32(pooled, want_pooled, what="pooled")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, std = encoder.encode_images(pixels)
    z = ref.encode_vae(reference, pixels, torch.Generator().manual_seed(4))
    # a posterior sample: within a few std of the mean, and not the mean itself
    assert ((z - mean).abs() <= 6 * std + 1e-6).all() and not torch.allclose(z, mean)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from fastinpo.models.sd3 import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_flow_dpo_matches(tiny_sd3, lora):
    """Flow-DPO (SPEC §7): fastinpo's method and the reference's public structure (separate policy and reference
    calls, noising and target written out) give the same loss and gradient for the same per-pair σ and ε."""
    from fastinpo.models.family import family_for_folder

    gen = torch.Generator().manual_seed(14)
    over = [f"model.path={tiny_sd3}", "data.path=unused", "method.name=diffusion-dpo", "method.beta=200",
            "model.reference_dtype=float32", f"train.seed={SEED}", "method.loss_backend=reference"]
    config = load_config(None, over + (["lora.rank=4"] if lora else []))
    family = family_for_folder(tiny_sd3)
    comps = family.load_components(tiny_sd3, load_vae=False, load_text=False)
    models = build_models(config, comps.unet, torch.device("cpu"))
    with torch.no_grad():  # off the reference (LoRA's B starts at 0: the gradient would be trivially 0)
        for p in models.trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    schedule = family.build_schedule(comps.scheduler_config)
    reference = ref.build_reference_models(
        copy.deepcopy(models.unet), schedule, lora=lora,
        ref_unet=None if lora else copy.deepcopy(models.reference_unet), ref_dtype=torch.float32, arch="sd3",
        lr=None)
    B, positions = 3, [5, 6, 7]
    z0 = torch.randn(2 * B, 4, 16, 16, generator=gen)
    cond = ref.make_cond(torch.randn(B, 20, 64, generator=gen), torch.randn(B, 64, generator=gen), None, "sd3")
    method = build_method(config.method, schedule)
    fast = method(StepInputs(z0, cond, PairRandomness.for_positions(SEED, positions, "cpu")), models.callables)
    fast.loss.backward()
    rng = PairRandomness.for_positions(SEED, positions, "cpu")  # the same per-pair draws, fed to the reference
    sigma = method.sigmas_for(rng).sigmas
    assert len(set(sigma.tolist())) == B  # one σ per pair, shared by its two images
    noise = rng.randn(z0.shape[1:], "cpu")
    out = ref.flow_dpo_loss(reference, z0, cond, sigma, noise, beta=200.0)
    out.loss.backward()
    _assert_same(fast.loss, _grads(models.trainable), out.loss, _grads(reference.trainable), "flow-dpo")


def test_sd3_encoders_match(tiny_sd3):
    """The reference's every-step SD3 ``encode_prompt`` and VAE latents give what fastinpo's SD3 encoder (and cache)
    gives: CLIP-L + CLIP-G, the T5 part zeros, the VAE shift applied."""
    from fastinpo.models.family import family_for_folder

    family = family_for_folder(tiny_sd3)
    comps = family.load_components(tiny_sd3)
    encoder = family.make_encoder(comps, "cpu")
    reference = ref.ReferenceModels(comps.unet, None, family.build_schedule(comps.scheduler_config), vae=comps.vae,
                                    text_encoders=comps.text_encoders, tokenizers=comps.tokenizers, arch="sd3")
    captions = ["a red fox in the snow", "", "two castles at dusk"]
    prompt, pooled = ref.encode_prompt(reference, captions)
    want_prompt, want_pooled = encoder.encode_text(captions)
    assert prompt.shape == want_prompt.shape == (3, 77 + 256, 64)
    assert_close_fp32(prompt, want_prompt, what="prompt embeds")
    assert_close_fp32(pooled, want_pooled, what="pooled")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, std = encoder.encode_images(pixels)
    z = ref.encode_vae(reference, pixels, torch.Generator().manual_seed(4))
    # the posterior sample mean + std * n (diffusers draws n from the generator), shifted and scaled: exactly the
    # cache's (mean, std) with the same n — an unshifted sample would be 0.0609 * 1.5305 = 0.093 off everywhere
    n = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    assert_close_fp32(z, mean + std * n, what="shifted, scaled posterior sample")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "model"), [("inpo", "tiny-sdxl"), ("inversion-dpo", "tiny-sdxl"),
                                             ("diffusion-dpo", "tiny-sd3"), ("inpo", "tiny-sd3")])
def test_every_benchmark_case_runs(method, model, tmp_path):
    """Every on/off case of the training-step benchmark runs a step (CI's benchmark smoke runs only fastinpo and
    the reference): a case that broke would otherwise only show up as a 'failed' row in the next full run. SD3:
    Flow-DPO with its reference, InPO for flows without one (fastinpo's extension: the reference row is n/a)."""
    from benchmarks import bench_train_step as bts

    group = bts.build_group(method, str(tmp_path), pairs=2 if method == "inpo" else 1, num_steps=3, model=model)
    cases = group.cases()
    ran = []
    for case in cases:
        if case.status != "ok" or case.step is None:
            continue
        if case.prepare is not None:
            case.prepare()
        case.step(0)
        case.step(1)
        ran.append(case.name)
    expected = {("inpo", "tiny-sdxl"): {"bf16-inversion-copy", "whole-batch-inversion", "split-calls",
                                        "encoders-in-step"},
                ("inversion-dpo", "tiny-sdxl"): {"trajectory-cache", "trajectory-cache+grad-steps-4", "grad-steps-4",
                                                 "nograd-steps-1", "all-in-graph", "split-calls"},
                ("diffusion-dpo", "tiny-sd3"): {"reference", "fastinpo", "encoders-in-step", "split-calls"},
                ("inpo", "tiny-sd3"): {"fastinpo", "bf16-inversion-copy", "whole-batch-inversion", "split-calls",
                                       "encoders-in-step"}}[(method, model)]
    assert expected <= set(ran), sorted(set(expected) - set(ran))
    if model == "tiny-sd3" and method == "inpo":
        assert next(c for c in cases if c.name == "reference").status == "n/a"
