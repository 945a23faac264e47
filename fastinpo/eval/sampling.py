"""Sampling: a stock diffusers SD1.5/SDXL pipeline from a local folder (optionally with a fastinpo ``unet/`` or
LoRA applied), images with FIXED noise per (prompt, seed), a contact sheet, and ``fastinpo sample``.

Fixed noise: the initial latents of every image are drawn on the CPU from
``torch.Generator("cpu").manual_seed(seed)`` in float32, one image at a time, then moved to the pipeline's device
and dtype. So two models (a base and its aligned version), two batch sizes, or a GPU and a CPU run start each
(prompt, seed) from the same noise, and win rates compare like with like.

Output folder of :func:`run_sample`: ``00000.png``..., ``metadata.jsonl`` (one line per image: prompt, seed,
model, unet, lora, settings), ``settings.json`` and ``contact_sheet.png``. ``fastinpo eval`` reads it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SCHEDULERS = ("default", "ddim", "euler", "dpm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _scheduler_class(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
    if name not in classes and name != "default":
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    return classes.get(name)


def _resolve_unet_folder(path: str | Path) -> Path:
    """A diffusers UNet folder (``config.json`` + weights), or a fastinpo export / pipeline folder holding
    ``unet/``."""
    path = Path(path)
    for cand in (path, path / "unet"):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(f"{path} is not a diffusers UNet folder: expected {path}/config.json or "
                            f"{path}/unet/config.json (fastinpo's export/unet/)")


# What makes two UNets the same architecture: a state dict of one loads into the other.
_ARCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
              "down_block_types", "up_block_types", "transformer_layers_per_block", "layers_per_block")


def _check_same_unet_architecture(model_folder: Path, unet_config: dict, what: str) -> None:
    """Refuse a UNet made for another architecture than the base pipeline's (an SDXL UNet on an SD1.5 base),
    naming each differing config key, before diffusers fails deep inside with a shape or type error."""
    base = json.loads((model_folder / "unet" / "config.json").read_text())
    diffs = [f"{k}: {unet_config.get(k)!r} vs the base's {base.get(k)!r}" for k in _ARCH_KEYS
             if _norm(unet_config.get(k)) != _norm(base.get(k))]
    if diffs:
        raise ValueError(f"{what} was made for another architecture than the pipeline {model_folder} "
                         f"({', '.join(diffs)}): give the base pipeline the UNet was trained from")


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_lora_fits(unet, lora_file: Path, model_folder: Path) -> None:
    """Refuse a LoRA whose adapted layers do not exist in this UNet or have other shapes (an SDXL LoRA on an
    SD1.5 base), reading only the file's header. Keys of a layout this check does not know are left to diffusers."""
    import re

    from safetensors import safe_open

    pattern = re.compile(r"^unet\.(.+)\.lora(?:_A|\.down)(?:\.[^.]+)?\.weight$")
    modules = dict(unet.named_modules())
    try:
        with safe_open(str(lora_file), framework="pt") as f:
            keys = [(m.group(1), f.get_slice(k).get_shape()) for k in f.keys() if (m := pattern.match(k))]
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"LoRA file {lora_file} is not a readable safetensors file ({err})") from None
    bad = []
    for name, shape in keys:
        module = modules.get(name)
        in_features = getattr(module, "in_features", getattr(module, "in_channels", None))
        if module is None or (in_features is not None and len(shape) >= 2 and shape[1] != in_features):
            bad.append(name if module is None else f"{name} (input {shape[1]} vs {in_features})")
    if bad:
        raise ValueError(f"LoRA {lora_file} does not fit the UNet of {model_folder}: {len(bad)} of {len(keys)} "
                         f"adapted layers are missing or of another shape (e.g. {bad[0]}); it was trained on another "
                         "architecture (SD1.5 and SDXL LoRAs are not interchangeable)")



def _lora_file(lora) -> Path:
    """The LoRA weights file of fastinpo's ``export/lora/`` folder, or the ``.safetensors`` file itself."""
    lora = Path(lora)
    lora_file = lora if lora.is_file() else lora / "pytorch_lora_weights.safetensors"
    if not lora_file.is_file():
        raise FileNotFoundError(f"LoRA {lora}: expected a folder with pytorch_lora_weights.safetensors "
                                "(fastinpo's export/lora/) or the .safetensors file itself")
    return lora_file

def build_pipeline(model_folder: str | Path, *, unet: Any = None, lora: str | Path | None = None,
                   scheduler: str = "ddim", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` from a local diffusers folder.

    ``unet``: a UNet folder (or a folder with ``unet/``) or a ``UNet2DConditionModel`` replacing the pipeline's;
    ``lora``: a folder with ``pytorch_lora_weights.safetensors`` (or the file) loaded with ``load_lora_weights``;
    ``scheduler``: ``ddim``, ``euler``, ``dpm`` (DPM-Solver++ multistep) or ``default``, always built from the
    model's own scheduler config (its betas and timestep spacing), never from class defaults.
    The SD1.5 safety checker is not loaded: it blacks out flagged images, and scorers would then rate black
    squares.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from fastinpo.models.family import detect_arch, is_sd3_folder

    folder = Path(model_folder)
    if is_sd3_folder(folder):
        return _build_sd3_pipeline(folder, transformer=unet, lora=lora, scheduler=scheduler, dtype=dtype,
                                   device=device)
    arch = detect_arch(folder)
    sched_cls = _scheduler_class(scheduler)
    kwargs: dict[str, Any] = {}
    if unet is not None:
        if isinstance(unet, (str, Path)):
            unet_folder = _resolve_unet_folder(unet)
            _check_same_unet_architecture(folder, json.loads((unet_folder / "config.json").read_text()),
                                          f"UNet {unet_folder}")
            unet = UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=dtype)
        else:
            _check_same_unet_architecture(folder, dict(unet.config), f"UNet {type(unet).__name__}")
        kwargs["unet"] = unet
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, **kwargs)
    if sched_cls is not None:
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    if lora is not None:
        lora_file = _lora_file(lora)
        _check_lora_fits(pipe.unet, lora_file, folder)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    # device only: the parts already came in ``dtype`` from from_pretrained, which keeps the modules diffusers
    # wants in float32 there (a later .to(dtype) would cast them too); a UNet module passed in is used as it is
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar over images (generate), not one per batch
    return pipe


def _build_sd3_pipeline(folder: Path, *, transformer: Any, lora, scheduler: str, dtype: torch.dtype,
                        device: str | torch.device):
    """A stock ``StableDiffusion3Pipeline`` (T5 optional: ``text_encoder_3=None`` when the folder has none).

    ``transformer``: a transformer folder (or a folder with ``transformer/``, fastinpo's export) or an
    ``SD3Transformer2DModel``; ``lora``: ``pytorch_lora_weights.safetensors`` (or its folder). A flow model has one
    sampler, its own ``FlowMatchEulerDiscreteScheduler`` (``scheduler`` ``default``, ``euler`` or ``ddim`` — the
    CLI's default — all mean it; ``dpm`` is refused); what ran is in the settings' ``scheduler_class``."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from fastinpo.models.sd3 import detect_sd3, has_t5

    detect_sd3(folder)
    if scheduler not in ("default", "euler", "ddim"):
        raise ValueError(f"scheduler {scheduler!r}: an SD3 (flow) model samples with its own "
                         "FlowMatchEulerDiscreteScheduler; use --scheduler default")
    kwargs: dict[str, Any] = {} if has_t5(folder) else {"text_encoder_3": None, "tokenizer_3": None}
    if transformer is not None:
        if isinstance(transformer, (str, Path)):
            path = Path(transformer)
            sub = next((c for c in (path, path / "transformer") if (c / "config.json").is_file()), None)
            if sub is None:
                raise FileNotFoundError(f"{path} is not a diffusers SD3 transformer folder: expected "
                                        f"{path}/config.json or {path}/transformer/config.json (fastinpo's export)")
            transformer = SD3Transformer2DModel.from_pretrained(sub, torch_dtype=dtype)
        kwargs["transformer"] = transformer
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=dtype, **kwargs)
    if lora is not None:
        lora_file = _lora_file(lora)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    """The pipeline's denoiser: ``pipe.unet`` (SD1.5/SDXL) or ``pipe.transformer`` (SD3)."""
    return pipe.transformer if getattr(pipe, "unet", None) is None else pipe.unet


def default_resolution(pipe) -> int:
    return int(denoiser_of(pipe).config.sample_size) * int(pipe.vae_scale_factor)


def initial_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """The starting noise of each image: ``(n, C, height/f, width/f)`` float32 on the CPU, image ``i`` from
    ``torch.Generator("cpu").manual_seed(seeds[i])`` alone (so it does not depend on the batch it is in, the
    device, or the dtype). The pipeline multiplies it by the scheduler's ``init_noise_sigma``."""
    f = int(pipe.vae_scale_factor)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got {height}x{width}")
    shape = (1, int(denoiser_of(pipe).config.in_channels), height // f, width // f)
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
                      for s in seeds])


def iter_generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30,
                  guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                  batch_size: int = 4, negative_prompt: str | None = None,
                  progress: bool = True) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(i, image)`` for image ``i`` of prompt ``prompts[i]`` and seed ``seeds[i]``, a batch at a time."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
    height = height or default_resolution(pipe)
    width = width or default_resolution(pipe)
    device, dtype = denoiser_of(pipe).device, denoiser_of(pipe).dtype
    with tqdm(total=len(prompts), desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            p = list(prompts[start:start + batch_size])
            latents = initial_latents(pipe, seeds[start:start + batch_size], height, width).to(device, dtype)
            images = pipe(prompt=p, negative_prompt=[negative_prompt] * len(p) if negative_prompt else None,
                          latents=latents, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                          width=width, output_type="pil").images
            for j, img in enumerate(images):
                yield start + j, img
            bar.update(len(p))


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, batch_size: int = 4,
             negative_prompt: str | None = None, progress: bool = True) -> list[Image.Image]:
    """Images for ``(prompts[i], seeds[i])`` with fixed noise per pair (:func:`initial_latents`)."""
    return [img for _, img in iter_generate(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale,
                                            height=height, width=width, batch_size=batch_size,
                                            negative_prompt=negative_prompt, progress=progress)]


def contact_sheet(images: Sequence[Image.Image | None], rows: int, cols: int, labels: Sequence[str] | None = None,
                  *, pad: int = 2, max_label_chars: int = 48) -> Image.Image:
    """A ``rows x cols`` grid (row-major; ``None`` or missing cells left blank) with optional row labels on the
    left, drawn with PIL's default font. Cells have the size of the first image."""
    from PIL import ImageDraw, ImageFont

    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    if labels is not None and len(labels) > rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows")
    first = next((im for im in images if im is not None), None)
    cw, ch = first.size if first is not None else (64, 64)
    font = ImageFont.load_default()
    texts = [(t if len(t) <= max_label_chars else t[:max_label_chars - 1] + "…") for t in (labels or [])]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((int(probe.textlength(t, font=font)) for t in texts), default=0)
    label_w = label_w + 2 * pad if texts else 0
    sheet = Image.new("RGB", (label_w + cols * (cw + pad) + pad, rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        if im is None:
            continue
        r, c = divmod(i, cols)
        cell = im if im.size == (cw, ch) else im.resize((cw, ch), Image.BICUBIC)
        sheet.paste(cell.convert("RGB"), (label_w + pad + c * (cw + pad), pad + r * (ch + pad)))
    for r, t in enumerate(texts):
        top, bottom = draw.textbbox((0, 0), t, font=font)[1::2]
        draw.text((pad, pad + r * (ch + pad) + (ch - (bottom - top)) // 2 - top), t, fill="black", font=font)
    return sheet


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_sample(model: str | Path, prompts: Sequence[Any] | str | Path, out_dir: str | Path, *,
               seeds: Sequence[int] = (0,), unet: Any = None, lora: str | Path | None = None,
               scheduler: str = "ddim", steps: int = 30, guidance_scale: float = 7.5, height: int | None = None,
               width: int | None = None, batch_size: int = 4, dtype: str | torch.dtype = "auto",
               device: str = "auto", prompt_format: str = "auto", max_prompts: int | None = None,
               negative_prompt: str | None = None, name: str | None = None, overwrite: bool = False,
               progress: bool = True, sheet_max: int = 8) -> Path:
    """Sample every prompt with every seed and write the evaluation folder (see the module doc).

    ``prompts``: a prompt file (any :func:`fastinpo.data.prompts.read_prompts` format) or a list of strings /
    :class:`~fastinpo.data.prompts.PromptItem`. Images are numbered prompt-major: prompt 0 with each seed, then
    prompt 1... The contact sheet shows the first ``sheet_max`` prompts x ``sheet_max`` seeds.
    """
    from fastinpo import __version__
    from fastinpo.data.prompts import PromptItem, read_prompts

    out = Path(out_dir)
    if (out / "metadata.jsonl").exists() and not overwrite:
        raise ValueError(f"{out} already holds samples (metadata.jsonl): choose another --out, or pass "
                         "--overwrite (overwrite=True) to replace them")
    if isinstance(prompts, (str, Path)):
        source: str | None = str(prompts)
        items = read_prompts(prompts, prompt_format)
    else:
        source = None
        items = [p if isinstance(p, PromptItem) else PromptItem(str(p)) for p in prompts]
    if max_prompts is not None:
        items = items[:max_prompts]
    seeds = [int(s) for s in seeds]
    if not items or not seeds:
        raise ValueError(f"nothing to sample: {len(items)} prompts x {len(seeds)} seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    pipe = build_pipeline(model, unet=unet, lora=lora, scheduler=scheduler, dtype=torch_dtype, device=device)
    height = height or default_resolution(pipe)
    width = width or default_resolution(pipe)
    unet_desc = None if unet is None else (str(unet) if isinstance(unet, (str, Path)) else type(unet).__name__)
    settings = {
        # the name given with --name, or None: eval then names the model after its sample folder
        "name": name, "model": str(model), "unet": unet_desc,
        "lora": None if lora is None else str(lora), "scheduler": scheduler,
        "scheduler_class": type(pipe.scheduler).__name__, "steps": steps, "guidance_scale": guidance_scale,
        "height": height, "width": width, "batch_size": batch_size, "dtype": str(torch_dtype).replace("torch.", ""),
        "device": device, "negative_prompt": negative_prompt, "prompts": source, "prompt_format": prompt_format,
        "n_prompts": len(items), "seeds": seeds, "n_images": len(items) * len(seeds),
        "noise": "torch.Generator('cpu').manual_seed(seed), float32, one image at a time",
        "fastinpo_version": __version__,
    }
    pairs = [(pi, item, s) for pi, item in enumerate(items) for s in seeds]
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / "metadata.jsonl", out / "settings.json", *out.glob("[0-9][0-9][0-9][0-9][0-9].png")]:
        old.unlink(missing_ok=True)  # overwrite: no image of an earlier, larger run may survive
    rows, cols = min(len(items), sheet_max), min(len(seeds), sheet_max)
    cells: list[Image.Image | None] = [None] * (rows * cols)
    keep = {pi * len(seeds) + si: pi * cols + si for pi in range(rows) for si in range(cols)}
    # metadata.jsonl appears only when every image is written: a failed or interrupted run leaves its record in
    # metadata.jsonl.partial, which neither eval nor the next sample's refusal mistakes for a finished folder
    partial = out / "metadata.jsonl.partial"
    with partial.open("w", encoding="utf-8") as meta:
        for i, img in iter_generate(pipe, [p[1].prompt for p in pairs], [p[2] for p in pairs], steps=steps,
                                    guidance_scale=guidance_scale, height=height, width=width,
                                    batch_size=batch_size, negative_prompt=negative_prompt, progress=progress):
            pi, item, seed = pairs[i]
            fname = f"{i:05d}.png"
            img.save(out / fname)
            record = {"index": i, "file": fname, "prompt": item.prompt, "category": item.category,
                      "prompt_index": pi, "seed": seed, "model": name or Path(model).name, "model_path": str(model),
                      "unet": unet_desc, "lora": settings["lora"], "scheduler": scheduler, "steps": steps,
                      "guidance_scale": guidance_scale, "height": height, "width": width}
            meta.write(json.dumps(record, ensure_ascii=False) + "\n")
            meta.flush()  # an interrupted run leaves a readable record of what was written
            if i in keep:
                cells[keep[i]] = img.copy()
    (out / "settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    contact_sheet(cells, rows, cols, labels=[items[r].prompt for r in range(rows)]).save(out / "contact_sheet.png")
    partial.replace(out / "metadata.jsonl")
    return out


# ----------------------------------------------------------------------------------------------- CLI
def _cmd_sample(args: argparse.Namespace) -> int:
    if args.num_seeds is not None and args.seeds is not None:
        raise ValueError("give either --seeds or --num-seeds, not both")
    seeds = args.seeds if args.seeds is not None else list(range(args.seed_offset,
                                                                 args.seed_offset + (args.num_seeds or 1)))
    size = args.resolution
    out = run_sample(args.model, args.prompts, args.out, seeds=seeds, unet=args.unet, lora=args.lora,
                     scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
                     height=args.height or size, width=args.width or size, batch_size=args.batch_size,
                     dtype=args.dtype, device=args.device, prompt_format=args.prompt_format,
                     max_prompts=args.max_prompts, negative_prompt=args.negative_prompt, name=args.name,
                     overwrite=args.overwrite, progress=not args.no_progress)
    n = sum(1 for _ in (out / "metadata.jsonl").open())
    print(f"{n} images, metadata.jsonl, settings.json and contact_sheet.png written to {out}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``sample`` to a ``fastinpo`` argparse subparsers object."""
    p = subparsers.add_parser("sample", help="generate images for a prompt set with fixed seeds (for `eval`)")
    p.add_argument("model", help="local diffusers SD1.5/SDXL pipeline folder")
    p.add_argument("--prompts", required=True, help="prompt file: .txt, PartiPrompts .tsv, HPDv2 .json (or folder), "
                                                    "Pick-a-Pic .parquet (or folder)")
    p.add_argument("--prompt-format", default="auto", choices=("auto", "pickapic", "parti", "hpdv2", "text"))
    p.add_argument("--out", required=True, help="output folder (images, metadata.jsonl, contact_sheet.png)")
    p.add_argument("--unet", default=None, help="fastinpo export/unet/ (or any diffusers UNet folder) to use; an "
                   "SD3 model: export/ or export/transformer/")
    p.add_argument("--lora", default=None, help="fastinpo export/lora/ folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, each used for every prompt")
    p.add_argument("--num-seeds", type=int, default=None, help="seeds offset..offset+N-1 (default: 1 seed)")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim",
                   help="built from the model's scheduler config (default ddim)")
    p.add_argument("--resolution", type=int, default=None, help="height and width (default: the model's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: float16 on CUDA, else float32")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--name", default=None, help="model name recorded in the metadata (default: the folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)
    return p
