"""The training-step benchmark's cases (issue 8): the models and data of a group, and every case's step.

A *group* is one (model, method, full/LoRA, N) comparison: shared weights, the same data and the same per-pair
randomness for every case, so that only the implementation differs. :class:`Group` builds fastinpo's step (the
trainer's ``make_step_inputs`` → method → backward → clip → optimizer), the public-structure reference step
(``benchmarks/reference/``) and one case per optimization turned off or option turned on. How the cases are timed
is :mod:`benchmarks.train_step_runner`; how rows are written, :mod:`benchmarks.train_step_report`.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

OFFICIAL_BETA = {"diffusion-dpo": 5000.0, "inpo": 5000.0, "inversion-dpo": 2000.0}  # SDXL values (SPEC §2–4)
OFFICIAL_DROPOUT = {"diffusion-dpo": 0.2, "inpo": 0.2, "inversion-dpo": 0.0}

WORDS = ("a red fox in the snow", "two castles at dusk", "portrait of an old sailor", "a bowl of ramen",
         "city skyline in the rain", "a cat wearing a tiny hat", "watercolor mountains", "a robot reading a book")


# ----------------------------------------------------------------------------------------------- models
def is_flow_model(model: str) -> bool:
    """``tiny-sd3`` / ``sd3``: an SD3 (MM-DiT, flow-matching) pipeline rather than a UNet one."""
    return model.endswith("sd3")


def make_pipeline(model: str, work: str, resolution: int) -> str:
    """The group's pipeline folder: tiny (``tiny-sdxl`` / ``tiny-sd15`` / ``tiny-sd3``) or real-size random
    (``sd15`` / ``sdxl`` / ``sd3`` = SD3.5-medium without T5, :mod:`fastinpo.models.full_size`; bf16 weights built on
    the GPU where there is one — the benchmark upcasts the denoiser)."""
    from fastinpo.models.full_size import make_full_pipeline, make_full_sd3_pipeline
    from fastinpo.models.sd import make_tiny_pipeline
    from fastinpo.models.sd3 import make_tiny_sd3_pipeline

    folder = os.path.join(work, model)
    if os.path.isfile(os.path.join(folder, "model_index.json")):  # made earlier (--pipeline-dir): reuse it
        return folder
    if model == "tiny-sd3":
        return str(make_tiny_sd3_pipeline(folder, seed=0, sample_size=resolution))
    if model in ("tiny-sdxl", "tiny-sd15"):
        return str(make_tiny_pipeline(folder, model.split("-")[1], seed=0, sample_size=resolution))
    cuda = torch.cuda.is_available()
    if model == "sd3":
        return str(make_full_sd3_pipeline(folder, dtype=torch.bfloat16 if cuda else torch.float32,
                                          resolution=resolution, device="cuda" if cuda else "cpu"))
    return str(make_full_pipeline(folder, model, dtype=torch.bfloat16 if cuda else torch.float32,
                                  resolution=resolution, device="cuda" if cuda else "cpu"))


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
def ddim_step_backend(use_ext: bool | None, op: str = "ddim_inversion_step"):
    """``None``: the dispatcher's automatic choice, as the trainer runs (the extension's fused inversion step where
    it is built); ``False``: the extension kept out of the automatic choice (the eager step), restoring the
    registry afterwards. ``op``: the step op (``flow_euler_step`` for InPO on flow models)."""
    from fastinpo.ops import dispatch

    if use_ext is None:
        yield
        return
    impls = dispatch.implementations(op)
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
        from fastinpo.models.family import family_for_folder
        from fastinpo.train.models import build_models

        self.args, self.dev, self.method, self.lora, self.num_steps = args, dev, method, lora, num_steps
        self.data = data
        self.B = data.pairs
        self.secondary = secondary
        self.family = family_for_folder(pipeline)
        self.flow = self.family.schedule_kind == "flow"  # SD3: Flow-DPO / InPO for flows (SPEC §7)
        if self.flow and method == "inversion-dpo":
            raise ValueError("inversion-dpo is not defined for flow models (SPEC §7): no SD3 group for it")
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
        self.schedule = self.family.build_schedule(components.scheduler_config)
        # a fresh float32 denoiser per group (LoRA adds adapters in place); on a GPU re-read from disk rather than
        # keep a second copy of a large model around
        if cuda:
            unet = self.family.denoiser_class().from_pretrained(pipeline, subfolder=self.family.denoiser_folder,
                                                                torch_dtype=torch.float32)
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
            with ddim_step_backend(ext, self.step_op):
                inputs = make_step_inputs(batch, self.empty, config, self.dev, self.family)
                out = method(inputs, callables, loss_scale=1.0)
                if not out.backward_done:
                    out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.models.trainable, max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            models.refresh_inversion_copy()

        return step

    @property
    def step_op(self) -> str:
        """The inversion's step op: the DDIM step, or the Euler step ``x + Δσ v`` of flow models."""
        return "flow_euler_step" if self.flow else "ddim_inversion_step"

    def reference_step(self):
        from fastinpo.methods.base import PairRandomness

        cfg = self.config.method
        latent_shape = tuple(self.data.encoded[0].latent_mean.shape[1:])

        def step(r: int):
            opt = self.optimizer("reference")
            self.ref_models.optimizer = opt
            raw = self.data.raw_at(r)
            # the same per-pair t (flow: σ), ε and inversion noise as fastinpo's step r (seeded by the pairs'
            # positions)
            rng = PairRandomness.for_positions(self.config.train.seed, raw.positions.tolist(), self.dev)
            t = (self.fast_method.sigmas_for(rng).sigmas if self.flow
                 else rng.timesteps(self.schedule.num_train_timesteps))
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

        reference = Case("reference", "reference", step=self.reference_step())
        if self.flow and self.method != "diffusion-dpo":  # InPO for flows: fastinpo's own extension
            reference.status, reference.step = "n/a", None
            reference.note = ("no public implementation to mirror: InPO for flows is fastinpo's own extension "
                              "(flow SFT is not a preference method)")
        cases = [reference, Case("fastinpo", "fastinpo", step=self.fastinpo_step())]
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

            chosen, _ = dispatch.resolve(self.step_op, self.config.method.loss_backend,
                                         (torch.empty(1, device=self.dev),))
            c = Case("eager-step", "fastinpo", "fused inversion step (extension)", "off",
                     self.fastinpo_step(ext=False),
                     f"the eager {'Euler' if self.flow else 'DDIM'} step in the inversion loops")
            if chosen != "ext":
                reason = extension.available_reason([torch.empty(1, device=self.dev)])
                c.status, c.step = "n/a", None
                c.note = f"the trainer's step already uses the {chosen!r} backend" + (f" ({reason})" if reason else "")
            cases.append(c)
        # optimizations of the issue that fastinpo does not implement yet: listed, so that none is silently missing
        missing = {"inpo": [("cuda-graphs", "CUDA graphs for the InPO inversion")]} if not self.flow else {}
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
