"""The models of a training run: the policy UNet (full or LoRA), the frozen reference (a copy, or the same UNet
with its adapters disabled), their ``(x, t, cond) -> eps`` callables, and the optimizer and LR schedule."""

from __future__ import annotations

import copy
import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fastinpo.config import Config, symmetry_breaking_problems
from fastinpo.methods.base import Models
from fastinpo.models.family import denoiser_forward, family_of_denoiser

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# the one denoiser forward of every family (UNet: ε; SD3 transformer: velocity), under the name the DeepSpeed
# engine imports
_unet_forward = denoiser_forward


@dataclass
class TrainingModels:
    """What the loop needs of the models."""

    unet: Any  # the policy UNet (with adapters in LoRA mode)
    reference_unet: Any | None  # None in LoRA mode (the reference is ``unet`` with adapters disabled)
    lora: bool
    callables: Models
    trainable: list[torch.nn.Parameter]
    trainable_names: list[str]
    inversion_unet: Any | None = None  # method.inversion_copy: a no-grad copy of the policy InPO inverts with

    def refresh_inversion_copy(self) -> None:
        """Copy the policy's trainable weights into the inversion copy (cast to its dtype). The weights change only
        at optimizer steps, so one refresh after each step keeps the copy exact for the next one — one cast per
        step instead of autocast re-casting every weight at each of the up to K inversion calls."""
        if self.inversion_unet is None:
            return
        target = dict(self.inversion_unet.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.trainable_names, self.trainable, strict=True):
                target[name].copy_(p)


def base_weight_dtype(config: Config, device: torch.device) -> torch.dtype:
    """The dtype of the policy's base weights (``model.base_dtype``): float32 for full fine-tuning (the base is
    trained; mixed precision is autocast); with LoRA the frozen base in ``model.base_dtype``, whose "auto" is
    ``train.mixed_precision``'s dtype on CUDA and float32 on a CPU."""
    if config.lora.rank == 0:
        return torch.float32
    name = config.model.base_dtype
    if name == "auto":
        amp = DTYPES[config.train.mixed_precision]
        return amp if (amp is not None and device.type == "cuda") else torch.float32
    return DTYPES[name]


def prepare_policy(config: Config, unet, device: torch.device, *, move: bool = True):
    """The policy UNet before any reference copy or distribution: ``model.unet_init``, the dtype check, the
    attention kernel, LoRA adapters (float32, on a frozen base in :func:`base_weight_dtype`) or full
    ``requires_grad``. Returns ``(unet, lora)``. ``move`` puts it on ``device`` (after the base is cast: the
    device never holds a float32 copy of a half-precision base); DeepSpeed leaves it on the CPU so that ZeRO-3
    moves and shards it one parameter at a time instead of materialising a full copy on every GPU first. The
    denoiser is a UNet or an SD3 transformer (its family gives the class ``model.unet_init`` loads and the LoRA
    targets)."""
    family = family_of_denoiser(unet)
    problems = symmetry_breaking_problems(config)  # train() checks it before anything loads; also here, at its use
    if problems:
        raise ValueError(problems[0])
    lora = config.lora.rank > 0
    base_dtype = base_weight_dtype(config, device)
    if config.model.unet_init:
        unet = family.denoiser_class().from_pretrained(config.model.unet_init, torch_dtype=base_dtype)
    loaded = next(unet.parameters()).dtype
    if loaded not in (torch.float32, base_dtype):
        raise ValueError(f"the policy denoiser must be loaded in float32 or the LoRA base dtype ({base_dtype}); got "
                         f"{loaded} (mixed precision is train.mixed_precision, a half-precision frozen LoRA base "
                         "model.base_dtype)")
    if lora:
        unet.requires_grad_(False)
        from peft import LoraConfig

        # peft draws lora_A from the global RNG: seed it from the run, so the init does not depend on what ran
        # before in the process, and every rank of a distributed run builds the same adapters (ZeRO-3 keeps
        # each rank's own slice of its local tensor, so different inits would be silently stitched together)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            unet.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha or config.lora.rank,
                                        init_lora_weights=True,
                                        target_modules=family.lora_targets(config.lora.target_modules, unet)))
        _cast_lora_base(unet, base_dtype)
        if config.lora.init == "gaussian":
            # peft's own "gaussian" init still zeroes B (a zero update); SPEC §4's symmetry breaking needs a
            # non-zero adapter product, so B gets small random values too, from the run's seed.
            g = torch.Generator().manual_seed(config.train.seed)
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if "lora_B" in name:
                        p.copy_(1e-3 * torch.randn(p.shape, generator=g))
    else:
        unet.requires_grad_(True)
    if move:
        unet = unet.to(device)
    if config.model.attention == "xformers":
        if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
            raise ValueError("model.attention = 'xformers' needs CUDA and the xformers package; use 'sdpa'")
        unet.enable_xformers_memory_efficient_attention()
    return unet, lora


def _cast_lora_base(unet, base_dtype: torch.dtype) -> None:
    """The frozen base in ``base_dtype``, the trainable adapters in float32 (their gradients, optimizer state and
    GradScaler unscaling want float32). peft creates adapters in the dtype of the layer they wrap, so on a base
    loaded in half precision the initial lora_A values are the float32 init rounded to it: they are rounded on a
    float32-loaded base too, so that a seed gives the same adapters however the base was loaded."""
    with torch.no_grad():  # tensor by tensor (a module .to(dtype) makes diffusers warn about keep-in-fp32 modules)
        for p in unet.parameters():
            p.data = p.data.to(base_dtype).float() if p.requires_grad else p.data.to(base_dtype)
        for module in unet.modules():
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    setattr(module, name, b.to(base_dtype))


def make_reference_copy(unet, dtype: torch.dtype):
    """The frozen reference of full fine-tuning: a copy of the policy UNet in ``dtype``, in the policy's train mode,
    not eval(): on the CPU under fp16 autocast an eval-mode copy's activations reach
    down_blocks.1.resnets.0.conv_shortcut of the tiny SD1.5 channels-last where the policy's are contiguous, the fp16
    convolution rounds per layout (3.8e-6), and beta = 5000 turned that into a step-1 loss of 0.7059 instead of ln 2
    (tests/test_precision.py). The SD UNets have no batch norm and dropout 0, so the mode changes no value otherwise.
    Both engines (plain and DeepSpeed) make their reference here, so they evaluate it the same way."""
    return copy.deepcopy(unet).to(dtype).requires_grad_(False).train()


def make_inversion_copy(unet, dtype: torch.dtype):
    """A frozen copy of the policy UNet (adapters included) in ``dtype``, for InPO's inversion (eps in ``dtype``;
    InPO keeps its inversion state in float32). Refresh it from the policy with
    :meth:`TrainingModels.refresh_inversion_copy` after every optimizer step."""
    return copy.deepcopy(unet).to(dtype).requires_grad_(False).eval()


def unet_callables(config: Config, unet, reference_unet, inversion_unet, lora: bool, device: torch.device, *,
                   compile: bool = False) -> Models:
    """The ``(x, t, cond) -> eps`` callables of the run's UNets: the policy (under ``train.mixed_precision``
    autocast), the reference (its frozen copy in ``model.reference_dtype``, or with LoRA the policy with its
    adapters disabled; under the policy's autocast unless the copy is half precision) and the optional inversion
    copy (no grad). ``compile`` calls every UNet through ``torch.compile`` (the modules themselves, their weights
    and what is saved, are unchanged)."""
    amp_dtype = DTYPES[config.train.mixed_precision]
    ref_dtype = DTYPES[config.model.reference_dtype]
    if compile:
        # every graph of a run goes through the one UNet forward: policy with grad and without (InPO's
        # inversion), the reference (with LoRA: adapters disabled, another guard), InPO's prefix batch sizes (one
        # recompile as dynamic shapes), the validation sampler. Past dynamo's default limit of 8 graphs per
        # function it would silently fall back to eager.
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    run = torch.compile if compile else (lambda module: module)
    policy_unet = run(unet)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    def policy(x, t, cond):
        with autocast():
            return _unet_forward(policy_unet, x, t, cond, torch.float32)

    # Policy and reference are evaluated identically when their weights are equal: the LoRA reference (the
    # policy's own weights, adapters off) and a float32 reference copy run under the policy's autocast, so at
    # θ = θ_ref the DPO logits are 0 in every precision and the early loss, accuracy and margin measure
    # preference, not precision. A float16/bfloat16 reference copy (model.reference_dtype, the official InPO /
    # Inversion-DPO choice) is by design another evaluation: its weights and every op are in that dtype.
    if lora:
        def reference(x, t, cond):
            unet.disable_adapters()
            try:
                with autocast():
                    return _unet_forward(policy_unet, x, t, cond, torch.float32).float()
            finally:
                unet.enable_adapters()
    else:
        reference_run = run(reference_unet) if reference_unet is not None else None
        ref_autocast = autocast if ref_dtype == torch.float32 else nullcontext

        def reference(x, t, cond):
            if reference_run is None:
                raise RuntimeError("this method has no reference model")
            with ref_autocast():
                return _unet_forward(reference_run, x, t, cond, ref_dtype).float()

    inversion = None
    if inversion_unet is not None:
        copy_dtype = next(inversion_unet.parameters()).dtype
        inversion_run = run(inversion_unet)

        def inversion(x, t, cond):
            with torch.no_grad():
                return _unet_forward(inversion_run, x, t, cond, copy_dtype)

    return Models(policy, reference, inversion=inversion)


def build_models(config: Config, unet, device: torch.device) -> TrainingModels:
    """Wrap a loaded UNet (float32) as policy + reference per the config; moves it to ``device``."""
    unet, lora = prepare_policy(config, unet, device)
    reference_unet = None
    # SFT trains without a reference; its preference validation (DPO metrics against it) needs one
    if not lora and (config.method.name != "sft" or config.train.validate_every > 0):
        reference_unet = make_reference_copy(unet, DTYPES[config.model.reference_dtype])
    inversion_unet = None
    if config.method.inversion_copy != "none":
        inversion_unet = make_inversion_copy(unet, DTYPES[config.method.inversion_copy])
    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    callables = unet_callables(config, unet, reference_unet, inversion_unet, lora, device,
                               compile=config.model.compile)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    return TrainingModels(unet, reference_unet, lora, callables, [p for _, p in named], [n for n, _ in named],
                          inversion_unet)


def build_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device,
                    pairs_per_step: int) -> torch.optim.Optimizer:
    o = config.optim
    lr = o.lr * pairs_per_step if o.scale_lr else o.lr
    if o.optimizer == "adamw":
        # fused AdamW skips a step on device when told of a non-finite gradient (optimizer.found_inf): the
        # loop needs no host sync to skip NaN steps
        return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))
    if o.optimizer == "adafactor":
        return conv_factored_adafactor(params, lr=lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optim.optimizer = 'adamw8bit' needs the bitsandbytes package (pip install bitsandbytes)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.optimizer!r}")


def conv_factored_adafactor(params, *, lr: float, weight_decay: float):
    """transformers' Adafactor (fixed lr, no parameter scaling: the official setting) with the second moment of
    convolution kernels factored over ``(out_channels, in_channels * kh * kw)``. transformers factors every tensor
    of 2+ dimensions over its last two, which for a ``(out, in, kh, kw)`` kernel keeps ``out * in * kh`` values
    per factor: 2/3 of an unfactored moment for a 3x3 kernel and twice one for a 1x1 kernel (SD1.5: 1.83 of its
    1.83 GB of state, SDXL: 0.96 of 0.98 GB). Viewed as the 2-D matrix a convolution multiplies by, the kernel's
    moment is 4 * (out + in * kh * kw) bytes (SD1.5: 6 MB in all; docs/MEMORY.md). 1-D and 2-D parameters are
    updated exactly as by transformers' Adafactor (tests/test_memory.py)."""
    from transformers.optimization import Adafactor

    class ConvFactoredAdafactor(Adafactor):
        @torch.no_grad()
        def step(self, closure=None):
            # each conv kernel (and its gradient) seen as (out, in * kh * kw) during transformers' step: its
            # state is created and kept in that shape; the parameter is the same storage, put back afterwards
            kernels = [p for group in self.param_groups for p in group["params"] if p.dim() > 2 and p.grad is not None]
            shapes = [p.shape for p in kernels]
            for p in kernels:
                p.data, p.grad = p.data.view(p.shape[0], -1), p.grad.view(p.shape[0], -1)
            try:
                return super().step(closure)
            finally:
                for p, shape in zip(kernels, shapes, strict=True):
                    p.data, p.grad = p.data.view(shape), p.grad.view(shape)

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            # a checkpoint of transformers' own factoring (fastinpo before conv factoring) holds conv moments of
            # (out, in, kh) x (out, in, kw): the step would fail later with a KeyError or a shape error. The two
            # factorings are different approximations, so there is no exact conversion: say so now
            for group in self.param_groups:
                for p in group["params"]:
                    row = self.state.get(p, {}).get("exp_avg_sq_row")
                    if p.dim() > 2 and row is not None and tuple(row.shape) != (p.shape[0],):
                        raise ValueError(
                            "this checkpoint's Adafactor state factors convolution kernels as transformers does "
                            f"(a second-moment row of shape {tuple(row.shape)} for a kernel of shape "
                            f"{tuple(p.shape)}); fastinpo now factors them as (out, in*kh*kw) (docs/MEMORY.md), "
                            "and the two cannot be converted exactly. Resume it with the fastinpo version that "
                            "wrote it, or start a new run from its exported weights (model.unet_init)")

    return ConvFactoredAdafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                                 weight_decay=weight_decay)


def build_lr_scheduler(config: Config, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.warmup_steps,
                         num_training_steps=config.train.max_steps)
