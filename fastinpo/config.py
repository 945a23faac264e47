"""Typed training configs: dataclasses with one-line field docs, loaded from TOML or YAML, overridable from the
command line (``--set section.key=value``), unknown keys refused, the resolved config saved with every run.

Field docs live in ``field(metadata={"help": ...})`` so ``fastinpo train --help-config`` can print them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dacite
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _f(default, help: str, **kw):
    """A dataclass field with a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


Method = Literal["sft", "diffusion-dpo", "inpo", "inversion-dpo"]
Precision = Literal["no", "fp16", "bf16"]


@dataclass
class ModelConfig:
    path: str = _f("", "local diffusers pipeline folder (SD1.5, SDXL or SD3/SD3.5; the family is detected)")
    unet_init: str | None = _f(None, "diffusers unet/ folder both policy and reference start from (InPO SD1.5: SFT UNet)")
    reference_dtype: Literal["float32", "float16", "bfloat16"] = _f(
        "float32", "dtype of the frozen reference UNet (official: fp16 for InPO, bf16 for Inversion-DPO)")
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "LoRA: dtype of the frozen base denoiser weights (adapters stay float32; auto: train.mixed_precision's dtype on CUDA, float32 on a CPU, whose half-precision kernels are slow and where tests stay exact)")
    encoder_dtype: Literal["float32", "float16", "bfloat16"] = _f("float32", "dtype of the VAE and text encoders")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward (less memory, ~30% slower)")
    attention: Literal["sdpa", "xformers"] = _f("sdpa", "attention kernel (xformers only with CUDA and installed)")
    compile: bool = _f(False, "call the UNets through torch.compile (one process): a slower start (compiling), faster steps")


@dataclass
class DataConfig:
    path: str = _f("", "preference pairs: Pick-a-Pic parquet folder/file, datasets save_to_disk folder, pair manifest (.jsonl/.csv/.parquet) or w/ + l/ folder (docs/DATA.md)")
    resolution: int = _f(1024, "training resolution R (SD1.5: 512, SDXL: 1024)")
    center_crop: bool = _f(True, "center crop after resizing the shorter side to R (else a seeded random crop)")
    random_flip: bool = _f(False, "flip both images of a pair together with probability 0.5")
    keep_ties: bool = _f(False, "keep label 0.5 ties with image 0 as the winner (official codes drop them)")
    keep_empty_captions: bool = _f(True, "keep rows with an empty/null caption, trained with the caption \"\" (false: skip them as empty_caption)")
    per_sample_time_ids: bool = _f(False, "SDXL time_ids from each image's original size and crop (default: (R,R,0,0,R,R))")
    caption_dropout: float = _f(0.2, "probability of replacing a pair's caption by \"\" (official: 0.2 DPO/InPO, 0 Inversion-DPO)")
    max_rows: int | None = _f(None, "use only the first N rows of the data")
    cache_dir: str | None = _f(None, "latent/text cache made by `fastinpo cache` (used when it matches, refused when stale)")
    cache_embed_dtype: Literal["float16", "bfloat16", "float32"] = _f(
        "float16", "dtype the cache stores text embeddings in (latents: data.cache_dtype)")
    cache_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "dtype the cache stores VAE latents (posterior mean and std) in: float32 exact, bfloat16/float16 half the bytes (errors in docs/DATA.md)")
    latent_sample: bool = _f(True, "draw a fresh VAE posterior sample each step (official) instead of the mean (false: the cache stores no std)")
    cache_batch_pairs: int = _f(2, "pairs per VAE call in `fastinpo cache` (2 pairs = 4 images)")
    cache_shard_size: int = _f(256, "`fastinpo cache` shard: pairs per plan file, images per latents file, captions per text file (the unit split across ranks and resumed)")
    vae_slicing: bool = _f(False, "VAE encodes one image at a time inside a call (diffusers enable_slicing: the memory of one image; latents differ in the last bits from batched calls)")
    vae_tiling: bool = _f(False, "VAE encodes large images in overlapping tiles (diffusers enable_tiling: less memory; latents differ slightly)")
    num_workers: int = _f(0, "DataLoader worker processes")
    validation_fraction: float = _f(0.0, "hold out this fraction of the source rows as preference-validation pairs (chosen by a hash of the source row, never trained on; 0: none)")
    validation_path: str | None = _f(None, "a separate Pick-a-Pic-format source of preference-validation pairs (instead of data.validation_fraction)")
    validation_max_pairs: int = _f(256, "use at most this many validation pairs (the first by row hash)")


@dataclass
class MethodConfig:
    name: Method = _f("inpo", "objective: sft, diffusion-dpo (Flow-DPO on SD3), inpo (DDIM-InPO; on SD3 the Euler-inversion InPO-for-flows, fastinpo's own extension) or inversion-dpo (UNet models only)")
    beta: float = _f(5000.0, "DPO temperature (SPEC: with the factor 0.5; DPO 5000, InPO 2000 SD1.5 / 5000 SDXL)")
    inversion_levels: int = _f(10, "InPO: K, levels of the DDIM inversion grid")
    eta: float = _f(0.1, "InPO: noise scale of the inversion (0 = deterministic)")
    inversion_copy: Literal["none", "bfloat16", "float16", "float32"] = _f(
        "none", "InPO, one process: invert with a no-grad copy of the policy in this dtype, refreshed after each optimizer step (state stays float32)")
    num_steps: int = _f(40, "Inversion-DPO: N grid steps (official SDXL 80)")
    guidance_scale: float = _f(2.0, "Inversion-DPO: classifier-free guidance of both models")
    flip_sign: bool = _f(False, "Inversion-DPO: the released code's sign of the logits instead of the paper's")
    memory_light: bool = _f(True, "Inversion-DPO: exact two-pass gradient with activation memory independent of N")
    grad_steps_per_call: int = _f(1, "Inversion-DPO: trajectory steps per policy UNet call with grad (memory grows with it, not with N)")
    nograd_steps_per_call: int = _f(8, "Inversion-DPO: trajectory steps per policy UNet call in the no-grad pass of the two-pass gradient")
    trajectory_cache_dir: str | None = _f(None, "Inversion-DPO: folder caching each pair's reference trajectory ε (needs fixed inputs: no caption dropout, posterior mean, no random crop/flip)")
    symmetry_breaking: Literal["none", "lora-init", "reference-dtype"] = _f(
        "none", "Inversion-DPO: how the policy leaves θ = θ_ref (SPEC §4); 'none' refuses a run that cannot move")
    loss_backend: str | None = _f(None, "backend of the loss and inversion ops (default: the dispatcher's choice)")
    timestep_density: Literal["logit_normal", "uniform", "mode"] = _f(
        "logit_normal", "flow models (SD3): density of the training σ (diffusers' compute_density_for_timestep_sampling)")
    logit_mean: float = _f(0.0, "flow models, logit_normal density: mean")
    logit_std: float = _f(1.0, "flow models, logit_normal density: std")
    mode_scale: float = _f(1.29, "flow models, mode density: mode_scale")


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA rank; 0 trains the full UNet against a frozen reference copy")
    alpha: float | None = _f(None, "LoRA alpha (default: the rank)")
    init: Literal["zero", "gaussian"] = _f("zero", "LoRA B init: 'zero' (standard) or 'gaussian' (breaks θ = θ_ref)")
    target_modules: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet (or SD3 transformer: also its add_q/k/v_proj) modules that get adapters")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = _f("adamw", "AdamW, Adafactor (SDXL official; conv kernels factored as 2-D: docs/MEMORY.md) or 8-bit AdamW")
    lr: float = _f(1e-8, "learning rate (before scale_lr)")
    scale_lr: bool = _f(True, "multiply lr by pairs per optimizer step (official InPO / Diffusion-DPO)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "constant_with_warmup", "learning-rate schedule")
    warmup_steps: int = _f(0, "warm-up optimizer steps")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 disables)")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/fastinpo", "run directory: config, metrics, checkpoints, samples, export")
    max_steps: int = _f(400, "optimizer steps")
    pairs_per_batch: int = _f(1, "pairs per forward pass (per process)")
    grad_accum: int = _f(1, "forward passes per optimizer step")
    mixed_precision: Precision = _f("no", "autocast dtype of the policy forward (weights stay float32)")
    seed: int = _f(0, "seed of data order, noise, timesteps and dropout")
    device: str = _f("auto", "cuda, cpu, or auto")
    log_every: int = _f(10, "optimizer steps between metric logs (the only host syncs of the loop)")
    checkpoint_every: int = _f(100, "optimizer steps between checkpoints (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    sample_every: int = _f(0, "optimizer steps between validation sample grids (0: none)")
    sample_prompts: list[str] = _f([], "prompts of the validation grid")
    max_nan_steps: int = _f(3, "consecutive non-finite losses before the run stops (with a checkpoint)")
    validate_every: int = _f(0, "optimizer steps between preference validations on the validation pairs, and the last step (0: none; needs data.validation_fraction or data.validation_path)")
    keep_best: Literal["none", "val_implicit_acc", "val_loss"] = _f(
        "none", "also keep the checkpoint with the best validation metric (never removed by train.keep_last)")
    early_stopping_patience: int = _f(0, "stop after this many validations without improvement of train.keep_best's metric (val_implicit_acc if none; 0: never)")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class DistributedConfig:
    backend: Literal["none", "deepspeed"] = _f(
        "none", "'none': one process; 'deepspeed': DeepSpeed ZeRO across the processes of a torchrun/deepspeed launch")
    deepspeed_config: str = _f(
        "zero3", "DeepSpeed preset: zero2, zero3, zero3_offload (configs/deepspeed/) or a JSON path; batch sizes, "
        "clipping, optimizer and precision are filled in from this config")
    reference: Literal["replicated", "sharded"] = _f(
        "replicated", "full fine-tuning: frozen reference as a copy on every GPU in model.reference_dtype, or "
        "sharded by ZeRO-3 for inference (LoRA has no reference copy)")
    inversion_copy: Literal["none", "bfloat16", "float32"] = _f(
        "none", "InPO: invert with a replicated copy of the policy, refreshed after each optimizer step, instead "
        "of all-gathering the ZeRO-3 policy at every inversion call")
    socket_ifname: str | None = _f(
        None, "network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, e.g. 'eth0'); "
        "default: the one the hostname resolves to (loopback on some clusters: the other node then never connects)")
    timeout_s: float = _f(
        300.0, "seconds a rank waits for its peers (process-group start-up and every collective) before failing "
        "with a message naming the rank and what it waited on")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> Config:
        """Cross-field checks that types cannot express; raises ValueError naming the key."""
        problems = []
        if not self.model.path:
            problems.append("model.path is required (a local diffusers pipeline folder)")
        if not self.data.path and not self.data.cache_dir:
            problems.append("data.path (or data.cache_dir) is required")
        if self.method.beta <= 0:
            problems.append(f"method.beta must be > 0, got {self.method.beta}")
        if not 0 <= self.data.caption_dropout < 1:
            problems.append(f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}")
        for key in ("train.max_steps", "train.pairs_per_batch", "train.grad_accum", "data.resolution",
                    "data.cache_batch_pairs", "data.cache_shard_size",
                    "method.inversion_levels", "method.num_steps", "method.grad_steps_per_call",
                    "method.nograd_steps_per_call"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                problems.append(f"{key} must be >= 1")
        if self.method.eta < 0:
            problems.append(f"method.eta must be >= 0, got {self.method.eta}")
        if self.lora.rank < 0:
            problems.append(f"lora.rank must be >= 0, got {self.lora.rank}")
        if self.method.symmetry_breaking == "lora-init" and (self.lora.rank == 0 or self.lora.init != "gaussian"):
            problems.append("method.symmetry_breaking = 'lora-init' needs lora.rank > 0 and lora.init = 'gaussian'")
        dist = self.distributed
        if dist.backend == "none" and (dist.reference != "replicated" or dist.inversion_copy != "none"):
            problems.append("distributed.reference and distributed.inversion_copy apply only with "
                            "distributed.backend = 'deepspeed'")
        if dist.timeout_s <= 0:
            problems.append(f"distributed.timeout_s must be > 0, got {dist.timeout_s}")
        if dist.reference == "sharded" and self.lora.rank > 0:
            problems.append("distributed.reference = 'sharded' with LoRA: LoRA has no reference copy (the reference "
                            "is the policy with its adapters disabled); leave it 'replicated'")
        if self.model.compile and dist.backend != "none":
            problems.append("model.compile is for one process (not supported with distributed.backend = "
                            "'deepspeed' yet)")
        if self.method.inversion_copy != "none" and (self.method.name != "inpo" or dist.backend != "none"):
            problems.append("method.inversion_copy is for InPO in one process (it inverts with the policy); under "
                            "DeepSpeed use distributed.inversion_copy")
        if dist.inversion_copy != "none" and self.method.name != "inpo":
            problems.append(f"distributed.inversion_copy is for InPO (it inverts with the policy); method.name = "
                            f"{self.method.name!r}")
        problems += base_dtype_problems(self)
        if self.method.trajectory_cache_dir:
            problems += trajectory_cache_problems(self)
        problems += validation_problems(self)
        if problems:
            raise ValueError("invalid config:\n  " + "\n  ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def base_dtype_problems(config: Config) -> list[str]:
    """Why ``model.base_dtype`` cannot apply to this config (empty: it can). A half-precision base is a frozen
    LoRA base evaluated under the autocast of the same dtype: full fine-tuning trains the base (its weights stay
    float32, mixed precision is autocast), and without autocast (or under the other half dtype) float32
    activations would meet half-precision weights."""
    base, amp = config.model.base_dtype, config.train.mixed_precision
    if base == "auto":
        return []
    if config.distributed.backend != "none":
        return ["model.base_dtype with distributed.backend = 'deepspeed': DeepSpeed holds the whole module in "
                "train.mixed_precision's dtype itself (float32 master weights of the trainable ones); leave "
                "model.base_dtype = 'auto'"]
    if base == "float32":
        return []
    if config.lora.rank == 0:
        return [f"model.base_dtype = {base!r} is for LoRA (the frozen base); full fine-tuning trains the base, "
                "whose weights stay float32 (mixed precision is train.mixed_precision's autocast): leave it 'auto'"]
    wanted = {"bfloat16": "bf16", "float16": "fp16"}[base]
    problems = []
    if amp != wanted:
        problems.append(f"model.base_dtype = {base!r} needs train.mixed_precision = {wanted!r} (the base is "
                        f"evaluated under that autocast); it is {amp!r}")
    return problems


def validation_problems(config: Config) -> list[str]:
    """Why the preference-validation settings (``data.validation_fraction``, ``data.validation_path``,
    ``data.validation_max_pairs``, ``train.validate_every``,
    ``train.keep_best``, ``train.early_stopping_patience``) cannot work together (empty: they can)."""
    d, t = config.data, config.train
    problems = []
    if not 0 <= d.validation_fraction < 1:
        problems.append(f"data.validation_fraction must be in [0, 1), got {d.validation_fraction}")
    if d.validation_fraction > 0 and d.validation_path:
        problems.append("give data.validation_fraction (a held-out split) or data.validation_path (a separate "
                        "source), not both")
    if d.validation_max_pairs < 1:
        problems.append(f"data.validation_max_pairs must be >= 1, got {d.validation_max_pairs}")
    for key in ("validate_every", "early_stopping_patience"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key} must be >= 0, got {getattr(t, key)}")
    has_pairs = d.validation_fraction > 0 or bool(d.validation_path)
    if t.validate_every and not has_pairs:
        problems.append("train.validate_every needs validation pairs: set data.validation_fraction (e.g. 0.05) or "
                        "data.validation_path")
    if (t.keep_best != "none" or t.early_stopping_patience) and not t.validate_every:
        problems.append("train.keep_best and train.early_stopping_patience act on validations: set "
                        "train.validate_every (and data.validation_fraction or data.validation_path)")
    return problems


def trajectory_cache_problems(config: Config) -> list[str]:
    """Why a reference-trajectory cache (``method.trajectory_cache_dir``, :mod:`fastinpo.data.trajectory_cache`)
    would be wrong for this config (empty: it is valid). Part of :meth:`Config.validate`; here, not beside the
    cache, because the config is the bottom layer and imports nothing of fastinpo."""
    d, m = config.data, config.method
    problems = []
    if m.name != "inversion-dpo":
        problems.append(f"method.trajectory_cache_dir is for Inversion-DPO; method.name = {m.name!r}")
    if d.caption_dropout != 0:
        problems.append(f"method.trajectory_cache_dir needs data.caption_dropout = 0 (a dropped caption changes the "
                        f"reference trajectory); it is {d.caption_dropout}")
    if d.latent_sample:
        problems.append("method.trajectory_cache_dir needs data.latent_sample = false (the trajectory starts at the "
                        "posterior mean; a fresh posterior sample each step would make every cached entry wrong)")
    if not d.center_crop or d.random_flip:
        problems.append("method.trajectory_cache_dir needs data.center_crop = true and data.random_flip = false "
                        "(a random crop or flip changes the pair's latents from epoch to epoch)")
    if config.distributed.backend != "none":
        problems.append("method.trajectory_cache_dir is not supported with distributed.backend = 'deepspeed' yet "
                        "(the reference weights' fingerprint would need a gather of the sharded reference)")
    return problems


# ----------------------------------------------------------------------------------------------- before loading
def symmetry_breaking_problems(config: Config) -> list[str]:
    """Inversion-DPO has an exactly zero gradient while the policy equals the reference (SPEC §4): a run that
    would train nothing is refused unless an explicit, valid symmetry-breaking choice is configured."""
    if config.method.name != "inversion-dpo":
        return []
    choice = config.method.symmetry_breaking
    lora = config.lora.rank > 0
    if choice == "none":
        return [
            "Inversion-DPO would train nothing: at the start the policy equals the reference, and both the loss "
            "and its gradient are exactly 0 there (SPEC §4). Choose how to leave that point: "
            "method.symmetry_breaking = 'lora-init' (LoRA with lora.init = 'gaussian': non-zero adapters) or "
            "'reference-dtype' (full fine-tuning with model.reference_dtype = 'bfloat16' or 'float16', as the "
            "released code's bf16 reference does)."]
    if choice == "lora-init" and not (lora and config.lora.init == "gaussian"):
        return ["method.symmetry_breaking = 'lora-init' needs lora.rank > 0 and lora.init = 'gaussian'"]
    if choice == "reference-dtype" and (lora or config.model.reference_dtype == "float32"):
        return ["method.symmetry_breaking = 'reference-dtype' needs full fine-tuning (lora.rank = 0) and "
                "model.reference_dtype = 'bfloat16' or 'float16'"]
    return []


def local_path_problems(config: Config) -> list[str]:
    """The config's input paths checked as local paths (nothing is ever fetched from a hub: a missing folder is
    an error here, not a hub id for diffusers to try), all at once."""
    problems = []

    def folder(key: str, value: str | None, must_hold: tuple[str, ...], what: str) -> None:
        if not value:
            return
        path = Path(value).expanduser()
        if path.is_file():
            problems.append(f"{key} = {value!r} is a file; it must be {what}")
        elif not path.is_dir():
            problems.append(f"{key} = {value!r} does not exist (a local folder: {what}; nothing is downloaded)")
        elif must_hold and not any((path / m).exists() for m in must_hold):
            problems.append(f"{key} = {value!r} is not {what} (it holds none of {', '.join(must_hold)})")

    # (what a pipeline folder must hold is listed, part by part, by the model loader's own check)
    folder("model.path", config.model.path, (), "a diffusers pipeline folder (unet/, vae/, text_encoder/, "
           "tokenizer/, scheduler/)")
    folder("model.unet_init", config.model.unet_init, ("config.json",),
           "a diffusers UNet folder (config.json + weights), e.g. a fastinpo export/unet/")
    if config.data.path and not Path(config.data.path).expanduser().exists():
        problems.append(f"data.path = {config.data.path!r} does not exist (a folder of Pick-a-Pic parquet files, "
                        "one .parquet file, a datasets save_to_disk folder, a pair manifest (.jsonl, .csv, "
                        ".parquet) or a folder of w/ and l/ images; docs/DATA.md)")
    return problems


def is_flow_model_folder(path: str | Path) -> bool:
    """A local SD3/SD3.5 (rectified-flow) pipeline folder: ``model_index.json`` names a ``StableDiffusion3*``
    pipeline, or there is ``transformer/`` and no ``unet/`` (read from the folder, no weights)."""
    folder = Path(path)
    index = folder / "model_index.json"
    if index.is_file():
        try:
            name = str(json.loads(index.read_text()).get("_class_name", ""))
        except ValueError:
            name = ""
        if name:
            return name.startswith("StableDiffusion3")
    return (folder / "transformer").is_dir() and not (folder / "unet").is_dir()


def flow_model_problems(config: Config) -> list[str]:
    """What a flow model (SD3) cannot run: Inversion-DPO (its per-step weights come from the DDPM ELBO; SPEC §7
    defines no flow version), and options written for the ε-prediction UNet path."""
    if not config.model.path or not is_flow_model_folder(config.model.path):
        return []
    problems = []
    if config.method.name == "inversion-dpo":
        problems.append(f"method.name = 'inversion-dpo' is not defined for flow-matching models ({config.model.path} "
                        "is an SD3 pipeline): its per-step weights come from the DDPM ELBO (SPEC §7). Use sft, "
                        "diffusion-dpo (Flow-DPO) or inpo (InPO for flows, fastinpo's own extension)")
    if config.method.name == "inpo" and config.method.eta != 0.1 and config.method.eta != 0:
        problems.append(f"method.eta = {config.method.eta}: the InPO-for-flows Euler inversion is deterministic "
                        "(SPEC §7); leave eta at its default")
    return problems


def check_before_loading(config: Config) -> None:
    """Everything the config alone can reveal, reported together before the first weight loads (an SDXL UNet takes
    ~20 s and 11 GiB to load on a CPU): the local paths, the Inversion-DPO symmetry-breaking choice and what a flow
    model (SD3) cannot run."""
    problems = local_path_problems(config) + symmetry_breaking_problems(config) + flow_model_problems(config)
    if problems:
        raise ValueError("the run cannot start:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------- loading
def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table/mapping at the top level")
    return data


def _field_type(section: str, key: str):
    """The resolved type of ``section.key`` in :class:`Config`, or None when there is no such key (the key check
    reports it later, with the valid keys)."""
    sections = typing.get_type_hints(Config)
    if section not in sections or not dataclasses.is_dataclass(sections[section]):
        return None
    return typing.get_type_hints(sections[section]).get(key)


def _string_kinds(ftype) -> tuple[bool, bool]:
    """(is a string field, may be None): ``str``, a ``Literal`` of strings, or either ``| None``."""
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) is Literal:
        return all(isinstance(a, str) for a in args), False
    if ftype is str:
        return True, False
    if args and type(None) in args:  # Optional[...]: a string field when every other member is one
        others = [a for a in args if a is not type(None)]
        return all(_string_kinds(a)[0] for a in others), True
    return False, False


def _parse_override_value(raw: str, ftype) -> Any:
    """The value of ``--set section.key=raw``.

    A string field takes the text as it is: YAML would read ``no``/``off``/``on``/``yes`` as booleans and ``null``
    as None, so ``train.mixed_precision=no`` must not go through YAML. A field that may also be None takes
    ``null`` (or nothing) as None — the only way to unset it from the command line. A JSON-quoted value
    (``'"no"'``) is unquoted. Other fields: JSON first (YAML 1.1 reads 1e-4 as a string), then YAML (numbers,
    booleans, null, lists).
    """
    is_string, nullable = _string_kinds(ftype) if ftype is not None else (False, False)
    if is_string:
        text = raw.strip()
        if nullable and text in ("", "null"):
            return None
        try:
            quoted = json.loads(text)
        except ValueError:
            return text
        return quoted if isinstance(quoted, str) else text
    try:
        return json.loads(raw)
    except ValueError:
        return yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(data: dict[str, Any], override: str) -> None:
    """``section.key=value``, the value read by the field's type (:func:`_parse_override_value`)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be section.key (e.g. train.max_steps)")
    value = _parse_override_value(raw, _field_type(parts[0], parts[1]))
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ValueError(f"config section {parts[0]!r} is not a table")
    section[parts[1]] = value


def _check_keys(cls, data: dict[str, Any], prefix: str = "") -> None:
    """Unknown keys are errors, with the valid keys listed (dacite's strict mode says less)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown config key {name!r}; valid keys here: {', '.join(fields)}")
        ftype = fields[key].type
        sub = globals().get(ftype) if isinstance(ftype, str) else ftype
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} must be a table of {', '.join(f.name for f in dataclasses.fields(sub))}")
            _check_keys(sub, value, prefix=f"{name}.")


def _to_float(value):
    """Ints and numeric strings (YAML 1.1 reads ``1e-4`` as a string) are accepted where a float is expected."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def from_dict(data: dict[str, Any], *, validate: bool = True) -> Config:
    """A validated :class:`Config` from nested dicts (types checked, ints accepted where floats are expected).
    ``validate=False`` skips the checks of a training run (e.g. a required model.path) for commands that read only
    part of the config (``fastinpo data inspect PATH``); keys and types are checked either way."""
    _check_keys(Config, data)
    try:
        config = dacite.from_dict(Config, data, config=dacite.Config(strict=True, type_hooks={float: _to_float}))
    except dacite.WrongTypeError as err:
        expected = typing.get_args(err.field_type) if typing.get_origin(err.field_type) is Literal else None
        wanted = f"one of {', '.join(map(repr, expected))}" if expected else getattr(err.field_type, "__name__",
                                                                                       str(err.field_type))
        hint = ""
        if isinstance(err.value, bool) or err.value is None:
            # A YAML file's unquoted no/off/yes/on/null reaches a string field as a bool or None.
            hint = " (YAML reads unquoted no/off/yes/on as booleans and null as nothing: quote the value, e.g. \"no\")"
        raise ValueError(f"invalid config: {err.field_path} must be {wanted}, got {err.value!r}{hint}") from None
    except dacite.DaciteError as err:
        raise ValueError(f"invalid config: {err}") from None
    return config.validate() if validate else config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                validate: bool = True) -> Config:
    """Load a TOML/YAML/JSON config file (or start from defaults), apply ``section.key=value`` overrides."""
    data = _read_file(path) if path is not None else {}
    for override in overrides:
        _apply_override(data, override)
    return from_dict(data, validate=validate)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as TOML-compatible YAML (``config.yaml``) — loadable by :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def help_text() -> str:
    """Every config key with its type, default and one-line doc."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = globals()[section.type] if isinstance(section.type, str) else section.type
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {json.dumps(default)}    # {f.metadata.get('help', '')}")
    return "\n".join(lines)
