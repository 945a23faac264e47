"""Training-step throughput: fastinpo against the public-script reference (issue 8), and each optimization on / off.

One *step* is what an optimizer step costs with one micro-batch of B pairs: the inputs (encoders, or the cache),
the method's loss, backward, gradient clipping, the optimizer. Every case of a group uses the same model (shared
weights), the same data and the same per-pair randomness (the k-th timed step of every case sees the same pairs,
the same t and noise), so the work is identical and only the implementation differs.

Cases of a group (method × full/LoRA):
  - ``reference``: benchmarks/reference/ — the public scripts' structure (encoders every step, eager unfused
    losses, InPO inversion over the whole batch at every grid step, Inversion-DPO with winners and losers inverted
    separately and all N policy evaluations in one graph), plain AdamW;
  - ``fastinpo``: the trainer's step (``make_step_inputs`` → method → backward → clip → optimizer) from cached
    latents / text embeddings, with its defaults;
  - one row per optimization turned off (the rest as in ``fastinpo``): ``encoders-in-step`` (no cache),
    ``split-calls`` (winners and losers — and CFG halves — in separate UNet calls), ``whole-batch-inversion``
    (InPO: every inversion call padded to all 2B samples: prefix batching off), ``all-in-graph`` (Inversion-DPO:
    memory-light two-pass gradient off), and ``eager-step`` (the eager DDIM step instead of the fused one the
    dispatcher picks: the extension on CPU where it is built, Triton on CUDA), ``nograd-steps-1`` (Inversion-DPO:
    one policy call per trajectory step in the no-grad pass); fused Triton losses run on CUDA only (a CPU row
    says so); optimizations of the issue that fastinpo lacks get a ``not-implemented`` row;
  - one row per option fastinpo has but does not use by default ("on"): ``bf16-inversion-copy`` (InPO,
    ``method.inversion_copy``), ``grad-steps-4`` (Inversion-DPO, ``method.grad_steps_per_call = 4``),
    ``trajectory-cache`` (Inversion-DPO, ``method.trajectory_cache_dir``, warm) and the cache with 4 grad steps
    per call;
  - with ``--compile``: ``reference+compile`` (the reference with its UNets under ``torch.compile``) and
    ``fastinpo+compile`` (``model.compile = true``), compiled untimed before the warm-up; every row then also
    has its ratio to ``reference+compile``.

On CPU the cases of a group run interleaved (each repeat runs every case once, in rotating order) so that a burst of
load on this shared machine hits all of them alike; the speedup is reported both as the ratio of median step
times and as the median (and IQR) of the per-repeat ratios of the same work. On CUDA the cases run one after the
other (SDXL-size models cannot be held several times), timed with CUDA events, with MFU: FLOPs from
``torch.utils.flop_counter`` over the measured time, against a bf16 matmul rate measured in the same run.
Peak memory: CUDA ``max_memory_allocated`` above the resident models; CPU peak RSS above the resident set, read from
/proc (VmHWM after ``clear_refs``, freed heap trimmed first) — both over one step after the timed ones.

Outputs (``--out``, default benchmarks/results/): ``train-step-<device>-<date>[-smoke].csv`` (one row per case,
with command, device, versions, commit), the same name ``.md`` (summary, targets) and ``.png`` (chart).
``--readme-table`` prints the README performance table rendered from the newest results files;
``--update-readme`` writes it into README.md (tests/test_readme.py checks the two agree).

Usage::

    python benchmarks/bench_train_step.py --smoke        # CI: tiny SDXL-shaped pipeline, fastinpo vs reference
    python benchmarks/bench_train_step.py                # full CPU rows (tiny pipeline, every optimization)
    python benchmarks/bench_train_step.py --model sdxl   # on a GPU: SDXL-size UNet, random weights
    python benchmarks/bench_train_step.py --readme-table
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import ctypes
import datetime as _dt
import gc
import glob
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script: `benchmarks.*` resolves from the repository root
    sys.path.insert(0, REPO)

from benchmarks.common import Timer, device_slug, loadavg, quantile, run_metadata  # noqa: E402

COLUMNS = [
    "timestamp", "device", "torch", "diffusers", "commit", "command", "model", "method", "mode", "pairs", "steps_N",
    "case", "optimization", "optimization_state", "status", "median_step_s", "iqr_step_s", "pairs_per_s",
    "pairs_per_s_iqr", "speedup_vs_reference", "paired_speedup_median", "paired_speedup_iqr",
    "gain_of_optimization", "speedup_vs_compile", "peak_mem_mb", "mem_kind", "unet_calls", "unet_samples",
    "tflop_per_step", "achieved_tflops", "matmul_tflops", "mfu", "repeats", "warmup", "threads", "loadavg_1m",
    "note", "times_s",
]

OFFICIAL_BETA = {"diffusion-dpo": 5000.0, "inpo": 5000.0, "inversion-dpo": 2000.0}  # SDXL values (SPEC §2–4)
OFFICIAL_DROPOUT = {"diffusion-dpo": 0.2, "inpo": 0.2, "inversion-dpo": 0.0}

WORDS = ("a red fox in the snow", "two castles at dusk", "portrait of an old sailor", "a bowl of ramen",
         "city skyline in the rain", "a cat wearing a tiny hat", "watercolor mountains", "a robot reading a book")


# ----------------------------------------------------------------------------------------------- environment
def synchronized_timer() -> float:
    """``perf_counter`` after the GPU has finished its queued work: the pytest-benchmark timer of this suite
    (a plain host timer would stop while CUDA kernels are still running)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def quantiles(values: list[float]) -> tuple[float, float]:
    """(median, IQR)."""
    return quantile(values, 0.5), quantile(values, 0.75) - quantile(values, 0.25)


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of one call above what was resident before it (MB).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the process's peak RSS (VmHWM, reset by
    writing 5 to /proc/self/clear_refs) minus its RSS before the call, with glibc's freed heap handed back first
    (``malloc_trim``) so that memory freed by earlier steps does not hide this step's peak.
    """

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.kind = "cuda max_memory_allocated" if dev.type == "cuda" else "cpu peak RSS delta"
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        raise KeyError(key)

    def __call__(self, fn) -> float | None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        try:
            gc.collect()
            if self._libc is not None:
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = self._status("VmRSS")
            fn()
            return self._status("VmHWM") - base
        except (OSError, KeyError):
            return None


class CallCounter:
    """UNet calls and samples per step (forward pre-hooks on the UNets)."""

    def __init__(self, modules):
        self.calls = self.samples = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        self.calls += 1
        x = args[0] if args else kwargs["sample"]
        self.samples += int(x.shape[0])

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- models
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32)


def real_size_pipeline(arch: str, out_dir: str, resolution: int) -> str:
    """An SD1.5- or SDXL-size pipeline folder with the real configs and random weights (nothing downloaded)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastinpo.models.sd import write_clip_tokenizer
    from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG

    torch.manual_seed(0)
    base = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, hidden_act="quick_gelu")
    os.makedirs(out_dir, exist_ok=True)
    unet = UNet2DConditionModel(**(SDXL_UNET if arch == "sdxl" else SD15_UNET))
    unet.save_pretrained(os.path.join(out_dir, "unet"))
    del unet
    AutoencoderKL(**VAE, sample_size=resolution,
                  scaling_factor=0.13025 if arch == "sdxl" else 0.18215).save_pretrained(os.path.join(out_dir, "vae"))
    CLIPTextModel(CLIPTextConfig(**{**base, **CLIP_L})).save_pretrained(os.path.join(out_dir, "text_encoder"))
    write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    if arch == "sdxl":
        CLIPTextModelWithProjection(CLIPTextConfig(**{**base, **CLIP_BIGG})).save_pretrained(
            os.path.join(out_dir, "text_encoder_2"))
        write_clip_tokenizer(os.path.join(out_dir, "tokenizer_2"))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", **SD_SCHEDULER_CONFIG}, f)
    return out_dir


def make_pipeline(model: str, work: str, resolution: int) -> str:
    from fastinpo.models.sd import make_tiny_pipeline

    folder = os.path.join(work, model)
    if model in ("tiny-sdxl", "tiny-sd15"):
        return str(make_tiny_pipeline(folder, model.split("-")[1], seed=0, sample_size=resolution))
    return real_size_pipeline(model, folder, resolution)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """R distinct raw batches (pixels, captions, time ids) and their encodings (what a cache would hold), and the
    stream positions of repeat r (which seed every per-pair random draw of both implementations)."""

    raw: list
    encoded: list
    pairs: int

    def positions(self, r: int) -> torch.Tensor:
        return torch.arange(r * self.pairs, (r + 1) * self.pairs, dtype=torch.int64)

    def raw_at(self, r: int):
        batch = self.raw[r % len(self.raw)]
        batch.positions = self.positions(r)
        return batch

    def encoded_at(self, r: int):
        e = self.encoded[r % len(self.encoded)]
        e.positions = self.positions(r)
        return e


def make_data(encoder, pairs: int, resolution: int, device: torch.device, n_batches: int = 4, seed: int = 0) -> Data:
    from fastinpo.data.batch import RawBatch

    g = torch.Generator().manual_seed(seed)
    raw, encoded = [], []
    for i in range(n_batches):
        pixels = torch.rand(2 * pairs, 3, resolution, resolution, generator=g) * 2 - 1  # random images, never 0
        captions = [WORDS[(i * pairs + j) % len(WORDS)] for j in range(pairs)]
        r = float(resolution)
        time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]]).repeat(2 * pairs, 1)
        rows = torch.arange(i * pairs, (i + 1) * pairs)  # distinct source rows: per-pair caches key on them
        rb = RawBatch(pixels.to(device), captions, time_ids.to(device), rows)
        raw.append(rb)
        e = encoder.encode_batch(rb, use_std=True)
        encoded.append(e.to(device))
    return Data(raw, encoded, pairs)


# ----------------------------------------------------------------------------------------------- cases
@contextlib.contextmanager
def ddim_step_backend(use_ext: bool | None):
    """``None``: the dispatcher's automatic choice, as the trainer runs (the extension's fused inversion step where
    it is built); ``False``: the extension kept out of the automatic choice (the eager step), restoring the
    registry afterwards."""
    from fastinpo.ops import dispatch

    if use_ext is None:
        yield
        return
    impls = dispatch.implementations("ddim_inversion_step")
    saved = impls.get("ext")
    if not use_ext and saved is not None:
        impls.pop("ext")
    try:
        yield
    finally:
        if saved is not None:
            impls["ext"] = saved


def split_calls(fn, chunk: int):
    """A model callable that runs its batch in chunks of ``chunk`` rows (one UNet call per chunk): winners and
    losers — and the two CFG halves — in separate calls, as if nothing batched them."""
    from fastinpo.ops.inversion import select_cond

    def call(x, t, cond):
        n = x.shape[0]
        if n <= chunk:
            return fn(x, t, cond)
        outs = []
        for s in range(0, n, chunk):
            idx = torch.arange(s, min(n, s + chunk), device=x.device)
            outs.append(fn(x[s:s + chunk], t[s:s + chunk], select_cond(cond, idx)))
        return torch.cat(outs, 0)

    return call


def padded_calls(fn, full: int):
    """A model callable that pads a no-grad call on fewer than ``full`` samples to ``full`` (repeating its first
    row) and drops the padding: every InPO inversion call then costs a whole-batch call — prefix batching off,
    same results."""
    from fastinpo.ops.inversion import select_cond

    def call(x, t, cond):
        n = x.shape[0]
        if n >= full or torch.is_grad_enabled():
            return fn(x, t, cond)
        idx = torch.cat([torch.arange(n, device=x.device), torch.zeros(full - n, dtype=torch.int64, device=x.device)])
        return fn(x.index_select(0, idx), t.index_select(0, idx), select_cond(cond, idx))[:n]

    return call


@dataclass
class Case:
    name: str
    impl: str  # "reference" or "fastinpo"
    optimization: str = ""
    state: str = ""
    step: Any = None  # step(r) -> None
    note: str = ""
    prepare: Any = None  # prepare() -> None, untimed, before the case's warm-up (e.g. fill a cache)
    status: str = "ok"
    times: list = field(default_factory=list)
    peak_mb: float | None = None
    calls: int | None = None
    samples: int | None = None
    flops: float | None = None


class Group:
    """One (method, mode, N) comparison: the shared models, the data, and every case's step."""

    def __init__(self, args, dev, pipeline: str, components, encoder, data: Data, method: str, lora: bool,
                 num_steps: int, secondary: bool = False):
        from benchmarks.reference import train_step as ref
        from fastinpo.config import load_config
        from fastinpo.methods import build_method
        from fastinpo.ops.schedule import NoiseSchedule
        from fastinpo.train.models import build_models

        self.args, self.dev, self.method, self.lora, self.num_steps = args, dev, method, lora, num_steps
        self.data = data
        self.B = data.pairs
        self.secondary = secondary
        cuda = dev.type == "cuda"
        ref_dtype = args.ref_dtype or ("float16" if cuda else "float32")
        precision = "bf16" if cuda else '"no"'  # JSON-quoted: YAML would read a bare no as False
        over = [f"model.path={pipeline}", "data.path=unused", f"method.name={method}",
                f"method.beta={OFFICIAL_BETA[method]}", "method.eta=0.1", "method.inversion_levels=10",
                f"method.num_steps={num_steps}", "method.guidance_scale=2.0",
                f"data.caption_dropout={OFFICIAL_DROPOUT[method]}", f"data.resolution={args.resolution}",
                f"train.mixed_precision={precision}", f"train.pairs_per_batch={self.B}",
                f"train.seed={args.seed}", "optim.lr=1e-6", "optim.scale_lr=false",
                f"model.gradient_checkpointing={str(bool(args.gradient_checkpointing)).lower()}"]
        if lora:
            over += [f"lora.rank={args.lora_rank}"]
            if method == "inversion-dpo":  # SPEC §4: a zero-initialised LoRA never leaves θ = θ_ref
                over += ["lora.init=gaussian", "method.symmetry_breaking=lora-init"]
        elif method == "inversion-dpo":
            # the released code's symmetry breaking: a bf16 reference (both implementations use it)
            ref_dtype = args.ref_dtype or "bfloat16"
            over += ["method.symmetry_breaking=reference-dtype"]
        over += [f"model.reference_dtype={ref_dtype}"]
        self.ref_dtype = ref_dtype
        self.config = load_config(None, over)
        self.schedule = NoiseSchedule.from_config(components.scheduler_config)
        # a fresh float32 UNet per group (LoRA adds adapters in place); on a GPU re-read from disk rather than
        # keep a second copy of a large UNet around
        if cuda:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", torch_dtype=torch.float32)
        else:
            unet = copy.deepcopy(components.unet)
        self.models = build_models(self.config, unet, dev)
        self.fast_method = build_method(self.config.method, self.schedule)
        self.light_off = build_method(
            load_config(None, over + ["method.memory_light=false"]).method, self.schedule)
        self.encoder = encoder
        self.empty = self._empty()
        amp = torch.bfloat16 if cuda else None
        self.ref_models = ref.build_reference_models(
            self.models.unet, self.schedule, lora=lora,
            ref_unet=None if lora else self.models.reference_unet, ref_dtype=getattr(torch, ref_dtype),
            amp_dtype=amp, vae=encoder.vae, text_encoders=encoder.text_encoders, tokenizers=encoder.tokenizers,
            arch=components.arch, lr=None)
        self.ref = ref
        self._opt = {}
        self.unets = [m for m in (self.models.unet, self.models.reference_unet) if m is not None]

    def _empty(self):
        from fastinpo.train.data_source import EmptyCaption

        prompt, pooled = self.encoder.encode_text([""])
        return EmptyCaption(prompt[0].to(self.dev), None if pooled is None else pooled[0].to(self.dev))

    # optimizers are per implementation (fused AdamW as the trainer builds it; plain AdamW for the reference) and
    # built lazily, so that on a GPU only the running case's optimizer state is resident
    def optimizer(self, impl: str):
        if impl not in self._opt:
            from fastinpo.train.models import build_optimizer

            if impl == "fastinpo":
                self._opt[impl] = build_optimizer(self.config, self.models.trainable, self.dev, self.B)
            else:
                self._opt[impl] = torch.optim.AdamW(self.models.trainable, lr=1e-6, weight_decay=0.0)
        return self._opt[impl]

    def drop_optimizer(self, impl: str):
        self._opt.pop(impl, None)
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------- steps
    def fastinpo_step(self, *, encoders: bool = False, method=None, wrap=None, ext: bool | None = None,
                      models=None, config=None):
        from fastinpo.methods.base import Models
        from fastinpo.train.loop import make_step_inputs

        method = method or self.fast_method
        models = models or self.models
        config = config or self.config
        callables = models.callables
        if wrap is not None:
            callables = Models(wrap(callables.policy), wrap(callables.reference))
        max_norm = self.config.optim.max_grad_norm

        def step(r: int):
            opt = self.optimizer("fastinpo")
            if encoders:
                raw = self.data.raw_at(r)
                batch = self.encoder.encode_batch(raw, use_std=self.config.data.latent_sample)
                batch.positions = raw.positions
                batch = batch.to(self.dev)
            else:
                batch = self.data.encoded_at(r)
            with ddim_step_backend(ext):
                inputs = make_step_inputs(batch, self.empty, config, self.dev)
                out = method(inputs, callables, loss_scale=1.0)
                if not out.backward_done:
                    out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.models.trainable, max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            models.refresh_inversion_copy()

        return step

    def reference_step(self):
        from fastinpo.methods.base import PairRandomness

        cfg = self.config.method
        latent_shape = tuple(self.data.encoded[0].latent_mean.shape[1:])

        def step(r: int):
            opt = self.optimizer("reference")
            self.ref_models.optimizer = opt
            raw = self.data.raw_at(r)
            # the same per-pair t, ε and inversion noise as fastinpo's step r (seeded by the pairs' positions)
            rng = PairRandomness.for_positions(self.config.train.seed, raw.positions.tolist(), self.dev)
            t = rng.timesteps(self.schedule.num_train_timesteps)
            noise = rng.randn(latent_shape, self.dev)
            gen = torch.Generator(self.dev).manual_seed(self.config.train.seed * 1000 + r)
            self.ref.reference_train_step(
                self.ref_models, self.method, raw.pixels, raw.captions,
                raw.time_ids if self.ref_models.arch == "sdxl" else None, t=t, noise=noise,
                inversion_generators=rng.samples, generator=gen, caption_dropout=self.config.data.caption_dropout,
                beta=cfg.beta, num_levels=cfg.inversion_levels, eta=cfg.eta, num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale, flip_sign=cfg.flip_sign,
                max_grad_norm=self.config.optim.max_grad_norm)

        return step

    def cases(self) -> list[Case]:
        from fastinpo.ops import extension

        cases = [Case("reference", "reference", step=self.reference_step()),
                 Case("fastinpo", "fastinpo", step=self.fastinpo_step())]
        if self.args.compile:
            cases += [self._compiled_reference(), self._compiled_fastinpo()]
        if self.args.no_variants:
            return cases
        if self.secondary:  # another N of Inversion-DPO: only what shows memory (flat in N or not) and speed
            return cases + [Case("all-in-graph", "fastinpo", "Inversion-DPO memory-light two-pass gradient", "off",
                                 self.fastinpo_step(method=self.light_off), "all N policy evaluations in one graph")]
        B = self.B
        cases.append(Case("encoders-in-step", "fastinpo", "cached latents/text embeddings", "off",
                          self.fastinpo_step(encoders=True), "VAE + text encoders run in the step (no cache)"))
        split_note = ("winners and losers in separate UNet calls" +
                      (", and the two CFG halves too" if self.method == "inversion-dpo" else ""))
        cases.append(Case("split-calls", "fastinpo", "one UNet call for [winners; losers]", "off",
                          self.fastinpo_step(wrap=lambda fn: split_calls(fn, B)), split_note))
        if self.method == "inpo":
            c = Case("whole-batch-inversion", "fastinpo", "InPO prefix batching", "off",
                     self.fastinpo_step(wrap=lambda fn: padded_calls(fn, 2 * B)),
                     "every inversion call padded to all 2B samples (same result; fastinpo still stops after "
                     "the longest pair, the reference runs all K steps)")
            if B == 1:  # one pair is always the whole batch: the two would run the same code
                c.status, c.step, c.note = "n/a", None, "B = 1: one pair is always the whole batch"
            cases.append(c)
        if self.method == "inpo":
            cases.append(self._inversion_copy_case())
        if self.method == "inversion-dpo":
            cases.append(Case("all-in-graph", "fastinpo", "Inversion-DPO memory-light two-pass gradient", "off",
                              self.fastinpo_step(method=self.light_off), "all N policy evaluations in one graph"))
            cases.append(Case("nograd-steps-1", "fastinpo", "several trajectory steps per no-grad policy call", "off",
                              self.fastinpo_step(method=self._method_with(nograd_steps_per_call=1)),
                              "one policy call per trajectory step in the no-grad pass (default "
                              f"{self.config.method.nograd_steps_per_call} per call)"))
            cases.append(Case("grad-steps-4", "fastinpo", "4 trajectory steps per policy call with grad", "on",
                              self.fastinpo_step(method=self._method_with(grad_steps_per_call=4)),
                              "activation memory of 4 steps instead of 1 (still flat in N)"))
            cases.append(self._trajectory_cache_case())
            cases.append(self._trajectory_cache_case(grad_steps_per_call=4))
        if self.method in ("inpo", "inversion-dpo"):
            from fastinpo.ops import dispatch

            chosen, _ = dispatch.resolve("ddim_inversion_step", self.config.method.loss_backend,
                                         (torch.empty(1, device=self.dev),))
            c = Case("eager-step", "fastinpo", "fused inversion step (extension)", "off",
                     self.fastinpo_step(ext=False), "the eager DDIM step in the inversion loops")
            if chosen != "ext":
                reason = extension.available_reason([torch.empty(1, device=self.dev)])
                c.status, c.step = "n/a", None
                c.note = f"the trainer's step already uses the {chosen!r} backend" + (f" ({reason})" if reason else "")
            cases.append(c)
        # optimizations of the issue that fastinpo does not implement yet: listed, so that none is silently missing
        missing = {"inpo": [("cuda-graphs", "CUDA graphs for the InPO inversion")]}
        for name, what in missing.get(self.method, []):
            cases.append(Case(name, "fastinpo", what, "n/a", None, "not implemented in fastinpo yet",
                              status="not-implemented"))
        if self.dev.type == "cuda":
            cases.append(Case("fused-loss-off", "fastinpo", "fused Triton loss and inversion step", "off",
                              self._reference_backend_step(), "method.loss_backend=reference"))
        else:
            cases.append(Case("fused-loss", "fastinpo", "fused Triton loss", "n/a", None,
                              "not applicable on CPU: the Triton kernels run on CUDA (CPU only through the "
                              "interpreter, for tests)", status="n/a"))
        return cases

    def _method_with(self, **changes):
        import dataclasses

        from fastinpo.methods import build_method

        return build_method(dataclasses.replace(self.config.method, **changes), self.schedule)

    def _variant_models(self, *, inversion_copy: torch.dtype | None = None, compile: bool = False):
        """The group's models with other call options, built the way the trainer builds them (shared weights)."""
        import dataclasses

        from fastinpo.train.models import make_inversion_copy, unet_callables

        m = self.models
        inversion_unet = make_inversion_copy(m.unet, inversion_copy) if inversion_copy is not None else None
        if inversion_unet is not None:
            self.unets.append(inversion_unet)  # its calls are counted too
        callables = unet_callables(self.config, m.unet, m.reference_unet, inversion_unet, m.lora, self.dev,
                                   compile=compile)
        return dataclasses.replace(m, inversion_unet=inversion_unet, callables=callables)

    def _inversion_copy_case(self) -> Case:
        """InPO inverting with a bf16 copy of the policy, refreshed after every optimizer step (as the trainer
        does with method.inversion_copy = "bfloat16")."""
        case = Case("bf16-inversion-copy", "fastinpo", "InPO inversion in bf16 from a bf16 weight copy made once "
                    "per optimizer step", "on", note="method.inversion_copy = bfloat16 (inversion state float32)")

        def prepare():  # the copy is made only if the case runs
            case.step = self.fastinpo_step(models=self._variant_models(inversion_copy=torch.bfloat16))

        case.prepare, case.step = prepare, lambda r: None
        return case

    def _compiled_fastinpo(self) -> Case:
        """fastinpo with model.compile = true: its UNet calls through torch.compile (compiled in the warm-up)."""
        case = Case("fastinpo+compile", "fastinpo", "torch.compile of fastinpo's UNet calls", "on",
                    note="model.compile = true (torch.compile of the policy and reference UNets)")

        def prepare():
            case.step = self.fastinpo_step(models=self._variant_models(compile=True))
            compile_untimed(case.step)

        case.prepare, case.step = prepare, lambda r: None
        return case

    def _trajectory_cache_case(self, grad_steps_per_call: int | None = None) -> Case:
        """Inversion-DPO reading each pair's reference trajectory ε from an on-disk cache (filled untimed first:
        the steady state of every epoch after the first). The cache needs the posterior mean as z0 (the other
        cases draw a posterior sample: the same work, other values)."""
        from fastinpo.data.trajectory_cache import TrajectoryCache

        config = copy.deepcopy(self.config)
        config.data.latent_sample = False
        k = grad_steps_per_call or self.config.method.grad_steps_per_call
        method = self._method_with(grad_steps_per_call=k)
        folder = tempfile.mkdtemp(prefix="fastinpo-bench-traj-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        method.trajectory_cache = TrajectoryCache(folder, {"bench": True})
        name, what = "trajectory-cache", "Inversion-DPO reference trajectory and ε cached on disk"
        if grad_steps_per_call:
            name, what = f"{name}+grad-steps-{k}", f"{what}, and {k} trajectory steps per policy call with grad"
        case = Case(name, "fastinpo", what, "on", self.fastinpo_step(method=method, config=config),
                    "warm cache (every epoch after the first; the first pays one trajectory and a write per pair); "
                    "z0 = posterior mean, as the cache requires")

        def prepare():
            from fastinpo.train.loop import make_step_inputs

            for r in range(len(self.data.encoded)):
                inputs = make_step_inputs(self.data.encoded_at(r), self.empty, config, self.dev)
                method._trajectory(inputs, self.models.callables)

        case.prepare = prepare
        return case

    def _reference_backend_step(self):
        from fastinpo.methods import build_method

        cfg = copy.deepcopy(self.config.method)
        cfg.loss_backend = "reference"
        return self.fastinpo_step(method=build_method(cfg, self.schedule))

    def _compiled_reference(self) -> Case:
        case = Case("reference+compile", "reference", "torch.compile of the reference's UNets", "on",
                    note="torch.compile(unet) for the policy and the reference copy")
        try:
            models = copy.copy(self.ref_models)
            models.unet = torch.compile(self.ref_models.unet)
            if self.ref_models.ref_unet is not None:
                models.ref_unet = torch.compile(self.ref_models.ref_unet)
            saved = self.ref_models

            def step(r: int, models=models):
                self.ref_models = models
                try:
                    self.reference_step()(r)
                finally:
                    self.ref_models = saved

            case.step = step
            case.prepare = lambda: compile_untimed(step)
        except Exception as err:  # noqa: BLE001 - no compile provider here
            case.status, case.note, case.step = "skipped", f"{type(err).__name__}: {err}", None
        return case


def compile_untimed(step, steps: int = 4) -> None:
    """Run a compiled case's first steps before anything is timed: torch.compile compiles at the first call of each
    new graph (grad / no-grad, reference, and InPO's prefix batch sizes, which recompile once as dynamic shapes),
    which would otherwise land in the timed steps. Steps far past the timed ones: other pairs, other t."""
    for r in range(10_000, 10_000 + steps):
        step(r)


# ----------------------------------------------------------------------------------------------- measuring
def measure_group(group: Group, args, timer: Timer, memory: PeakMemory, flops_on: bool) -> list[Case]:
    cases = group.cases()
    if group.secondary:
        args = copy.copy(args)
        args.repeats = max(3, args.repeats // 3)
    runnable = [c for c in cases if c.step is not None and c.status == "ok"]
    interleave = group.dev.type != "cuda"
    for c in runnable:
        if c.prepare is not None:
            try:
                c.prepare()
            except Exception as err:  # noqa: BLE001 - reported like a failing step
                c.status, c.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

    counter = CallCounter(group.unets)  # UNet calls / samples of every timed step, attributed to its case

    def guarded(c: Case, r: int) -> float | None:
        try:
            return timer(lambda: c.step(r))
        except Exception as err:  # noqa: BLE001 - a failing case is reported, the rest still measured
            c.status, c.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return None

    def timed(c: Case, r: int):
        calls, samples = counter.calls, counter.samples
        t = guarded(c, r)
        if t is not None:
            c.times.append((r, t))
            c.calls = (c.calls or 0) + counter.calls - calls
            c.samples = (c.samples or 0) + counter.samples - samples

    def finish(c: Case):
        if c.status != "ok":
            return
        if c.times:  # mean per timed step (InPO's work depends on each step's t)
            c.calls, c.samples = c.calls / len(c.times), c.samples / len(c.times)
        c.peak_mb = memory(lambda: c.step(args.warmup + args.repeats))
        if flops_on:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                c.step(args.warmup + args.repeats + 1)
            c.flops = float(fc.get_total_flops())

    if interleave:
        for r in range(args.warmup):
            for c in runnable:
                if c.status == "ok":
                    guarded(c, r)
        for i in range(args.repeats):
            r = args.warmup + i
            order = runnable[i % len(runnable):] + runnable[:i % len(runnable)]  # rotate: no case always first
            for c in order:
                if c.status == "ok":
                    timed(c, r)
        for c in runnable:
            finish(c)
    else:  # one case at a time: a GPU holds one optimizer state of a large UNet
        for c in runnable:
            for r in range(args.warmup):
                guarded(c, r)
            for i in range(args.repeats):
                if c.status == "ok":
                    timed(c, args.warmup + i)
            finish(c)
            group.drop_optimizer(c.impl)
        group.drop_optimizer("fastinpo")
    counter.remove()
    return cases


def matmul_tflops(dev: torch.device, timer: Timer) -> float | None:
    """The bf16 matmul rate this GPU reaches in this run (8192³ GEMMs): the denominator of MFU."""
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timer(lambda: a @ b) for _ in range(20)]
    return 2 * n**3 / quantiles(times)[0] / 1e12


def rows_for(group: Group, cases: list[Case], base: dict, model: str, peak_tflops: float | None) -> list[dict]:
    by = {c.name: c for c in cases}
    ref_case, fast_case = by.get("reference"), by.get("fastinpo")
    comp = by.get("reference+compile")

    def med(c):
        return quantiles([t for _, t in c.times])[0] if c is not None and c.times else None

    ref_med, comp_med = med(ref_case), med(comp)
    ref_by_r = {r: t for r, t in ref_case.times} if ref_case and ref_case.times else {}
    rows = []
    for c in cases:
        row = dict(base, loadavg_1m=loadavg(), model=model, method=group.method,
                   mode="lora" if group.lora else "full", pairs=group.B,
                   steps_N=group.num_steps if group.method == "inversion-dpo" else
                   (f"K={group.config.method.inversion_levels}" if group.method == "inpo" else ""),
                   case=c.name, optimization=c.optimization, optimization_state=c.state, status=c.status,
                   note="; ".join(x for x in (c.note, f"reference UNet {group.ref_dtype}"
                                               if c.name in ("reference", "fastinpo") else "") if x),
                   repeats=len(c.times), warmup=group.args.warmup)
        if c.times:
            ts = [t for _, t in c.times]
            m, iqr = quantiles(ts)
            pps = [group.B / t for t in ts]
            pm, piqr = quantiles(pps)
            row.update(median_step_s=m, iqr_step_s=iqr, pairs_per_s=group.B / m, pairs_per_s_iqr=piqr)
            if ref_med:
                row["speedup_vs_reference"] = ref_med / m
                paired = [ref_by_r[r] / t for r, t in c.times if r in ref_by_r]
                if paired:
                    row["paired_speedup_median"], row["paired_speedup_iqr"] = quantiles(paired)
            if comp_med:
                row["speedup_vs_compile"] = comp_med / m
            fast_by_r = {r: t for r, t in fast_case.times} if fast_case and fast_case.times else {}
            if c.impl == "fastinpo" and c.name != "fastinpo" and fast_by_r:
                # > 1: the optimization makes fastinpo faster — per repeat, against fastinpo's time for the same
                # work ("off" rows: case / fastinpo; "on" rows, a fast path fastinpo does not use by default: the
                # inverse), median over repeats: robust to the machine's load changing during the group
                per = [t / fast_by_r[r] if c.state == "off" else fast_by_r[r] / t for r, t in c.times if r in fast_by_r]
                row["gain_of_optimization"] = quantiles(per)[0]
            row["times_s"] = ";".join(f"{t:.4f}" for _, t in c.times)
        if c.peak_mb is not None:
            row.update(peak_mem_mb=c.peak_mb, mem_kind=group.args._mem_kind)
        if c.calls is not None:
            row.update(unet_calls=c.calls, unet_samples=c.samples)  # means per timed step
        if c.flops is not None and c.times:
            m = quantiles([t for _, t in c.times])[0]
            row.update(tflop_per_step=c.flops / 1e12, achieved_tflops=c.flops / m / 1e12, matmul_tflops=peak_tflops,
                       mfu=(c.flops / m / 1e12 / peak_tflops) if peak_tflops else "")
        rows.append(row)
    return rows


def policy_mfu_row(group: Group, base: dict, model: str, timer: Timer, peak_tflops: float, repeats: int) -> dict:
    """GPU: MFU of the policy forward + backward alone on [winners; losers] (bf16 autocast), the issue's 40% target."""
    from torch.utils.flop_counter import FlopCounterMode

    e = group.data.encoded_at(0)
    n = e.latent_mean.shape[0]
    x = e.latent_mean
    t = torch.randint(0, 1000, (n,), device=group.dev)
    cond = {"encoder_hidden_states": e.prompt_embeds.repeat(2, 1, 1)}
    if e.pooled_embeds is not None:
        cond.update(text_embeds=e.pooled_embeds.repeat(2, 1), time_ids=e.time_ids)
    policy = group.models.callables.policy

    def fwd_bwd():
        policy(x, t, cond).float().square().mean().backward()

    for _ in range(3):
        fwd_bwd()
    with FlopCounterMode(display=False) as fc:
        fwd_bwd()
    times = [timer(fwd_bwd) for _ in range(repeats)]
    m, iqr = quantiles(times)
    flops = float(fc.get_total_flops())
    for p in group.models.trainable:
        p.grad = None
    return dict(base, loadavg_1m=loadavg(), model=model, method="policy-fwd-bwd",
                mode="lora" if group.lora else "full", pairs=group.B, case="fastinpo", status="ok",
                median_step_s=m, iqr_step_s=iqr, pairs_per_s=group.B / m, tflop_per_step=flops / 1e12,
                achieved_tflops=flops / m / 1e12, matmul_tflops=peak_tflops, mfu=flops / m / 1e12 / peak_tflops,
                repeats=repeats, note="policy forward+backward on [winners; losers], bf16 autocast")


def unit_cost_rows(group: Group, base: dict, model: str, timer: Timer, repeats: int = 9) -> list[dict]:
    """What one UNet call costs at the batch sizes the steps use (policy float32 no-grad / with backward, the
    reference in its dtype): the unit costs that explain the step ratios on this device."""
    e = group.data.encoded_at(0)
    rows = []
    for n in (group.B, 2 * group.B, 4 * group.B):
        reps = (n + 2 * group.B - 1) // (2 * group.B)
        x = e.latent_mean.repeat(reps, 1, 1, 1)[:n]
        t = torch.full((n,), 500, dtype=torch.int64, device=group.dev)
        cond = {"encoder_hidden_states": e.prompt_embeds.repeat(2 * reps, 1, 1)[:n]}
        if e.pooled_embeds is not None:
            cond.update(text_embeds=e.pooled_embeds.repeat(2 * reps, 1)[:n], time_ids=e.time_ids.repeat(reps, 1)[:n])
        policy, reference = group.models.callables.policy, group.models.callables.reference

        def fwd_nograd(policy=policy, x=x, t=t, cond=cond):
            with torch.no_grad():
                policy(x, t, cond)

        def fwd_bwd(policy=policy, x=x, t=t, cond=cond):
            policy(x, t, cond).float().square().mean().backward()

        def ref_fwd(reference=reference, x=x, t=t, cond=cond):
            with torch.no_grad():
                reference(x, t, cond)

        for name, fn in ((f"policy fwd no-grad n={n}", fwd_nograd), (f"policy fwd+bwd n={n}", fwd_bwd),
                         (f"reference fwd ({group.ref_dtype}) n={n}", ref_fwd)):
            fn()
            times = []
            for _ in range(repeats):
                times.append(timer(fn))
            m, iqr = quantiles(times)
            rows.append(dict(base, loadavg_1m=loadavg(), model=model, method="unit-cost", mode="full",
                             pairs=group.B, case=name, status="ok", median_step_s=m, iqr_step_s=iqr,
                             repeats=repeats, note="one UNet call (per-call cost behind the step ratios)"))
    for p in group.models.trainable:
        p.grad = None
    return rows


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------- reports
def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


TARGETS = {  # (device kind, method, N) -> minimum speedup over the reference (issue 8)
    ("cpu", "inpo", ""): 1.5,
    ("cpu", "inversion-dpo", "20"): 2.0,
    ("gpu", "inpo", ""): 3.0,
    ("gpu", "inversion-dpo", ""): 10.0,
    ("gpu", "diffusion-dpo", ""): 1.5,
}

# the cases judged against the targets: the trainer's defaults, and the recipe with the trajectory cache (an
# option, valid only with fixed pair inputs)
TARGET_CASES = {"fastinpo": "", "trajectory-cache": "with the reference-trajectory cache",
                "trajectory-cache+grad-steps-4": "with the reference-trajectory cache and 4 steps per grad call",
                "fastinpo+compile": "with model.compile"}


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["case"] not in TARGET_CASES or r["status"] != "ok":
            continue
        kind = "cpu" if r["device"].startswith("cpu") else "gpu"
        want = TARGETS.get((kind, r["method"], r["steps_N"] if r["method"] == "inversion-dpo" and kind == "cpu"
                            else ""))
        got = _num(r["paired_speedup_median"]) or _num(r["speedup_vs_reference"])
        if want is None or got is None:
            continue
        verdict = "met" if got >= want else f"NOT met (short by {100 * (1 - got / want):.0f}%)"
        n = f", N={r['steps_N']}" if r["method"] == "inversion-dpo" else ""
        case = f" ({TARGET_CASES[r['case']]})" if TARGET_CASES[r["case"]] else ""
        vs_compile = _num(r["speedup_vs_compile"])
        also = f"; {vs_compile:.2f}x the reference under torch.compile" if vs_compile is not None else ""
        out.append(f"- {r['model']} {r['method']} {r['mode']} B={r['pairs']}{n}{case}: {got:.2f}x (paired median) "
                   f"vs target {want:.1f}x — {verdict}{also}")
    return out


def write_markdown(path: str, rows: list[dict], base: dict, extra: list[str]) -> None:
    lines = [f"# Training-step throughput — {base['device']}", "",
             f"- command: `{base['command']}`", f"- torch {base['torch']}, diffusers {base['diffusers']}, "
             f"commit {base['commit']}, {base['threads']} thread(s), date {base['timestamp']}",
             "- speedup = reference step time / case step time (same model, data, per-pair randomness); "
             "'paired' = median [IQR] of per-repeat ratios of the same work (interleaved runs).",
             "- gain = how much faster fastinpo is with the optimization than without it (< 1: it costs here).",
             ""]
    lines += extra
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["mode"], r["steps_N"], r["pairs"]), []).append(r)
    for (model, method, mode, n, pairs), rs in groups.items():
        lines += ["", f"## {model} · {method} · {mode} · B={pairs}" + (f" · {n}" if n else ""), "",
                  "| case | optimization | pairs/s | IQR | speedup vs ref | paired [IQR] | vs ref+compile | gain | "
                  "peak MB | UNet calls / samples | MFU | status / note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            opt = f"{r['optimization']} ({r['optimization_state']})" if r["optimization"] else ""
            paired = (f"{float(r['paired_speedup_median']):.2f} [{float(r['paired_speedup_iqr']):.2f}]"
                      if _num(r["paired_speedup_median"]) is not None else "")
            calls = f"{r['unet_calls']} / {r['unet_samples']}" if r["unet_calls"] else ""
            pps = fmt(_num(r["pairs_per_s"]))
            if not pps and _num(r["median_step_s"]) is not None:  # unit-cost rows: a time per call, not pairs/s
                pps = f"{1000 * _num(r['median_step_s']):.3g} ms/call"
            lines.append("| " + " | ".join([
                r["case"], opt, pps, fmt(_num(r["pairs_per_s_iqr"])),
                fmt(_num(r["speedup_vs_reference"])), paired, fmt(_num(r["speedup_vs_compile"])),
                fmt(_num(r["gain_of_optimization"])),
                fmt(_num(r["peak_mem_mb"])), calls, fmt(_num(r["mfu"])),
                (r["status"] + (": " + r["note"] if r["note"] else "")).replace("|", "/")]) + " |")
    targets = target_lines(rows)
    if targets:
        lines += ["", "## Targets (issue 8)", "", *targets]
    gains: dict[str, list[str]] = {}
    for r in rows:
        g = _num(r["gain_of_optimization"])
        if r["optimization"] and g is not None:
            n = f" N={r['steps_N']}" if r["method"] == "inversion-dpo" else ""
            gains.setdefault(r["optimization"], []).append(f"{r['method']} {r['mode']} B={r['pairs']}{n}: {g:.2f}x")
        elif r["optimization"] and r["status"] in ("n/a", "not-implemented"):
            gains.setdefault(r["optimization"], []).append(f"{r['method']}: {r['status']}")
    if gains:
        lines += ["", "## What each optimization gives (fastinpo with it / without it; < 1: it costs here)", ""]
        lines += [f"- {opt}: " + "; ".join(dict.fromkeys(v)) for opt, v in gains.items()]
    mem = [r for r in rows if r["method"] == "inversion-dpo" and _num(r["peak_mem_mb"]) is not None
           and r["case"] in ("reference", "fastinpo", "all-in-graph")]
    if mem:
        ns = sorted({r["steps_N"] for r in mem}, key=int)
        lines += ["", "## Inversion-DPO peak memory by N (MB; the two-pass gradient should stay flat)", "",
                  "| mode | case | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
        for mode in dict.fromkeys(r["mode"] for r in mem):
            for case in ("reference", "fastinpo", "all-in-graph"):
                by_n = {r["steps_N"]: r["peak_mem_mb"] for r in mem if r["mode"] == mode and r["case"] == case}
                if by_n:
                    lines.append(f"| {mode} | {case} | " + " | ".join(
                        fmt(_num(by_n.get(n))) for n in ns) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and _num(r["speedup_vs_reference"]) is not None]
    if not ok:
        return
    labels = [f"{r['method']} {r['mode']} B={r['pairs']}" + (f" N={r['steps_N']}" if r["method"] == "inversion-dpo"
                                                              else "") + f" · {r['case']}" for r in ok]
    vals = [_num(r["paired_speedup_median"]) or _num(r["speedup_vs_reference"]) for r in ok]
    palette = {"reference": "#999999", "reference+compile": "#cccccc", "fastinpo": "#1f77b4"}
    colors = [palette.get(r["case"], "#ff7f0e") for r in ok]  # grey: the baselines; blue: defaults; orange: on/off
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(ok) + 1.2))
    ax.barh(range(len(ok)), vals, color=colors)
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over the reference step (paired median; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(csv_path: str, extra: list[str] | None = None) -> None:
    """The .md summary and .png chart of a results CSV, from its rows alone."""
    rows = read_rows(csv_path)
    first = rows[0]
    base = {k: first.get(k, "") for k in ("device", "torch", "diffusers", "commit", "command", "threads", "timestamp")}
    stem = csv_path[:-len(".csv")]
    write_markdown(stem + ".md", rows, base, extra or [f"- peak memory: {first.get('mem_kind') or 'n/a'}"])
    write_chart(stem + ".png", rows, f"fastinpo vs reference training step — {base['device']}, commit "
                                     f"{base['commit']}")


def newest_results(results_dir: str) -> list[str]:
    """The newest full (non-smoke) train-step CSV per device slug, falling back to a smoke file."""
    files = sorted(glob.glob(os.path.join(results_dir, "train-step-*.csv")))
    best: dict[str, str] = {}
    for f in files:
        m = re.match(r"train-step-(.+)-(\d{4}-\d{2}-\d{2})(-smoke)?\.csv$", os.path.basename(f))
        if not m:
            continue
        slug, date, smoke = m.group(1), m.group(2), bool(m.group(3))
        key = (not smoke, date)
        if slug not in best or key >= best[slug][0]:
            best[slug] = (key, f)
    return [f for _, f in best.values()]


def readme_table(results_dir: str = os.path.join(HERE, "results")) -> str:
    """The README performance table, rendered from the results files (never typed by hand)."""
    lines = ["| device | model | method | mode | B | fastinpo pairs/s | reference pairs/s | speedup (paired "
             "median [IQR]) | vs reference under torch.compile | peak MB fastinpo / reference | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in newest_results(results_dir):
        rows = read_rows(path)
        groups: dict[tuple, dict] = {}
        for r in rows:
            key = (r["model"], r["method"], r["mode"], r["steps_N"], r["pairs"])
            groups.setdefault(key, {})[r["case"]] = r
        for (model, method, mode, n, pairs), cases in groups.items():
            for case, label in TARGET_CASES.items():
                lines += _readme_line(path, model, method, mode, n, pairs, cases.get(case), cases.get("reference"),
                                      label)
    return "\n".join(lines)


def update_readme(table: str, readme: str = os.path.join(REPO, "README.md")) -> None:
    """Replace the table between README.md's ``<!-- perf-table:start ...-->`` and ``<!-- perf-table:end -->``."""
    with open(readme) as f:
        text = f.read()
    start = text.index("\n", text.index("<!-- perf-table:start")) + 1
    end = text.index("<!-- perf-table:end -->")
    with open(readme, "w") as f:
        f.write(text[:start] + table.strip() + "\n" + text[end:])


def _readme_line(path, model, method, mode, n, pairs, fast, ref, label) -> list[str]:
    """One README table line: a fastinpo case against the reference of its group (none if either is missing)."""
    if not fast or not ref or fast["status"] != "ok":
        return []
    dev = fast["device"].split(" (")[0]
    name = method + (f" (N={n})" if method == "inversion-dpo" else "") + (f", {label}" if label else "")
    paired = (f"{float(fast['paired_speedup_median']):.2f}x [{float(fast['paired_speedup_iqr']):.2f}]"
              if _num(fast["paired_speedup_median"]) is not None
              else f"{float(fast['speedup_vs_reference']):.2f}x")
    mem = f"{fmt(_num(fast['peak_mem_mb']))} / {fmt(_num(ref['peak_mem_mb']))}"
    vs_compile = _num(fast["speedup_vs_compile"])
    vs_compile = f"{vs_compile:.2f}x" if vs_compile is not None else "not measured"
    return [f"| {dev} | {model} | {name} | {mode} | {pairs} | {fmt(_num(fast['pairs_per_s']))} | "
            f"{fmt(_num(ref['pairs_per_s']))} | {paired} | {vs_compile} | {mem} | "
            f"`{os.path.relpath(path, REPO)}` @ {fast['commit']} |"]


# ----------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--smoke", action="store_true", help="CI: tiny pipeline, fastinpo vs reference only, < 90 s")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", nargs="+", default=None,
                   choices=["tiny-sdxl", "tiny-sd15", "sd15", "sdxl"],
                   help="tiny-sdxl (CPU default) / sd15 / sdxl: real UNet configs, random weights (GPU default)")
    p.add_argument("--methods", nargs="+", default=["diffusion-dpo", "inpo", "inversion-dpo"],
                   choices=["diffusion-dpo", "inpo", "inversion-dpo"])
    p.add_argument("--modes", nargs="+", default=None, choices=["full", "lora"], help="default: full lora")
    p.add_argument("--pairs", type=int, nargs="+", default=None,
                   help="pairs per micro-batch B (default: 1 2 tiny, 1 GPU; 1 pair per GPU is what the official "
                        "scripts train with). Inversion-DPO runs at the first B only: its released code supports "
                        "one pair")
    p.add_argument("--num-steps", type=int, nargs="+", default=None,
                   help="Inversion-DPO N (default 20 10 on CPU; 20 40 80 on GPU)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default 32 tiny, 512/1024)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per case (default 10, a third for a second N; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: this machine's 2 cores are shared; 2 threads oversubscribe them)")
    p.add_argument("--ref-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the frozen reference UNet for both implementations (default: float16 on CUDA as "
                        "the scripts; float32 on CPU, where fp16 convolutions are slower than fp32; Inversion-DPO "
                        "full: bfloat16, the released code's symmetry breaking)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-variants", action="store_true", help="fastinpo vs reference only (no on/off rows)")
    p.add_argument("--compile", action="store_true", help="add the reference under torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the output names (tagged files never feed the README table)")
    p.add_argument("--readme-table", action="store_true", help="print the README table from the results and exit")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite README.md's table (between its perf-table markers) from the results and exit")
    p.add_argument("--report", metavar="CSV", default=None,
                   help="re-render the .md summary and .png chart of a results CSV (from its rows) and exit")
    return p


def run(args) -> int:
    if args.update_readme:
        update_readme(readme_table(args.out))
        print(f"README.md performance table rewritten from {args.out}")
        return 0
    if args.readme_table:
        print(readme_table(args.out))
        return 0
    if args.report:
        render_report(args.report)
        return 0
    import diffusers

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.smoke:
        args.model = args.model or ["tiny-sdxl"]
        args.modes = args.modes or ["full"]
        args.repeats = args.repeats or 3
        args.warmup = args.warmup if args.warmup is not None else 1
        args.num_steps = args.num_steps or [10]
        args.no_variants = True
    args.model = args.model or (["sd15", "sdxl"] if cuda else ["tiny-sdxl"])
    args.modes = args.modes or ["full", "lora"]
    args.repeats = args.repeats or 10
    args.warmup = args.warmup if args.warmup is not None else 2
    args.num_steps = args.num_steps or ([20, 40, 80] if cuda else [20, 10])
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    timer, memory = Timer(dev), PeakMemory(dev)
    args._mem_kind = memory.kind
    today = _dt.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-step-{device_slug(dev)}-{today}{'-smoke' if args.smoke else ''}"
                                  f"{'-' + args.tag if args.tag else ''}")
    base = {**run_metadata(dev), "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads() if not cuda else ""}
    print(f"{base['device']}  torch {base['torch']}  diffusers {base['diffusers']}  commit {base['commit']}  "
          f"threads {base['threads']}  load {loadavg()}", flush=True)
    peak = matmul_tflops(dev, timer)
    if peak:
        print(f"bf16 matmul rate (8192^3): {peak:.1f} TFLOP/s")
    from fastinpo.models.sd import Encoder, load_components

    all_rows: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastinpo-bench-") as work:
        for model in args.model:
            tiny = model.startswith("tiny")
            resolution = args.resolution or (32 if tiny else 1024 if model == "sdxl" else 512)
            args.resolution = resolution
            pairs_list = args.pairs or ([1, 2] if tiny and not args.smoke else [1])
            pipeline = make_pipeline(model, work, resolution)
            comps = load_components(pipeline, dtype=torch.float16 if cuda else torch.float32)
            encoder = Encoder(comps, dev)
            datas = {b: make_data(encoder, b, resolution, dev, seed=args.seed) for b in pairs_list}
            plan = [(m, mode == "lora", n, b) for m in args.methods for b in pairs_list for mode in args.modes
                    for n in (args.num_steps if m == "inversion-dpo" else [0])
                    if m != "inversion-dpo" or b == pairs_list[0]]
            units_done = False
            for method, lora, n, b in plan:
                data = datas[b]
                label = f"{model} {method} {'lora' if lora else 'full'} B={b}" + (f" N={n}" if n else "")
                print(f"-- {label}", flush=True)
                if args.compile:  # a fresh compile cache per group: the groups' many graphs of the one UNet forward
                    torch._dynamo.reset()  # would otherwise exhaust the recompile limit and fall back to eager
                group = Group(args, dev, pipeline, comps, encoder, data, method, lora, n or 20,
                              secondary=bool(n) and n != args.num_steps[0])
                cases = measure_group(group, args, timer, memory, flops_on=cuda)
                rows = rows_for(group, cases, base, model, peak)
                if not units_done and not cuda and not args.smoke and method == "inversion-dpo" and not lora:
                    rows += unit_cost_rows(group, base, model, timer)
                    units_done = True
                if cuda and group.method == "diffusion-dpo" and peak:
                    rows.append(policy_mfu_row(group, base, model, timer, peak, args.repeats))
                for r in rows:
                    sp = _num(r.get("paired_speedup_median")) or _num(r.get("speedup_vs_reference"))
                    print(f"   {r['case']:<22} {r['status']:<8} step s {fmt(_num(r.get('median_step_s'))):>7}  "
                          f"pairs/s {fmt(_num(r.get('pairs_per_s'))):>8}  "
                          f"speedup {fmt(sp):>6}  gain {fmt(_num(r.get('gain_of_optimization'))):>6}  "
                          f"peak MB {fmt(_num(r.get('peak_mem_mb'))):>7}  calls "
                          f"{r.get('unet_calls', '')}/{r.get('unet_samples', '')}  {r.get('note', '')[:70]}",
                          flush=True)
                all_rows += rows
                del group, cases
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for r in all_rows:
            writer.writerow({k: fmt(r.get(k)) for k in COLUMNS})
    rows = read_rows(stem + ".csv")
    extra = [f"- wall time {time.perf_counter() - t_start:.0f} s; peak memory: {memory.kind}"]
    if peak:
        extra.append(f"- bf16 matmul rate measured in this run: {peak:.1f} TFLOP/s (MFU denominator)")
    render_report(stem + ".csv", extra)
    for line in target_lines(rows):
        print(line)
    print(f"rows written to {os.path.relpath(stem + '.csv', REPO)} (+ .md, .png) in "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


def build_group(method: str, work_dir: str, *, lora: bool = False, pairs: int = 1, num_steps: int = 4,
                model: str = "tiny-sdxl", device: str | None = None, resolution: int | None = None,
                seed: int = 0) -> Group:
    """One group's models, data and step functions outside :func:`run` (the pytest-benchmark suite uses it):
    ``group.fastinpo_step()`` and ``group.reference_step()`` return ``step(r)`` callables."""
    from fastinpo.models.sd import Encoder, load_components

    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    dev = torch.device(device or args.device)
    args.resolution = resolution or (32 if model.startswith("tiny") else 1024 if model == "sdxl" else 512)
    args.seed = seed
    pipeline = os.path.join(work_dir, model)
    if not os.path.isdir(pipeline):
        make_pipeline(model, work_dir, args.resolution)
    comps = load_components(pipeline, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    encoder = Encoder(comps, dev)
    data = make_data(encoder, pairs, args.resolution, dev, seed=seed)
    return Group(args, dev, pipeline, comps, encoder, data, method, lora, num_steps)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``fastinpo`` argparse subparsers object."""
    p = subparsers.add_parser("bench", help="training-step throughput: fastinpo vs the public-script reference")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
