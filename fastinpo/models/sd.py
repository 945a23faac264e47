"""Models: loading SD1.5 / SDXL pipelines from a local diffusers folder, the :class:`Encoder` (VAE posterior and
text embeddings, SPEC §1), the UNet as the ``model(x, t, cond) -> eps`` callable the inversion loops take, and the
tiny random pipeline that tests and the demo write and load through the same code as a real model.

``cond`` for a UNet is a flat dict whose tensors all have the batch as dim 0:
``{"encoder_hidden_states": (n, L, D)}`` for SD1.5, plus ``"text_embeds": (n, P)`` and ``"time_ids": (n, 6)``
for SDXL. :func:`fastinpo.ops.inversion.zero_uncond` zeros all but ``time_ids``, as Inversion-DPO's CFG needs.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SDXL_ADDED_KEYS = ("text_embeds", "time_ids")


def unet_callable(unet) -> Any:
    """Wrap a ``diffusers.UNet2DConditionModel`` as ``model(x, t, cond) -> eps``."""

    def model(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {k: cond[k] for k in SDXL_ADDED_KEYS if k in cond} or None
        return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
                    return_dict=False)[0]

    return model


def tiny_unet_config(arch: str = "sdxl") -> dict[str, Any]:
    """A UNet2DConditionModel config with the structure of SD1.5 or SDXL and almost no parameters.

    SDXL-shaped means ``addition_embed_type="text_time"`` (pooled text embeds + 6 time ids), as the real one.
    """
    config: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 24,
        "attention_head_dim": (2, 4),
    }
    if arch == "sdxl":
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=20 + 6 * 4,  # pooled text dim + 6 time ids x embed dim
        )
    elif arch != "sd15":
        raise ValueError(f"arch must be 'sd15' or 'sdxl', got {arch!r}")
    return config


def tiny_cond(arch: str, n: int, *, resolution: int = 128, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random conditioning matching :func:`tiny_unet_config` (text 7 tokens x 24; SDXL pooled 20, time ids
    ``(R, R, 0, 0, R, R)`` as the official codes use)."""
    cond = {"encoder_hidden_states": torch.randn(n, 7, 24, generator=generator, dtype=dtype)}
    if arch == "sdxl":
        cond["text_embeds"] = torch.randn(n, 20, generator=generator, dtype=dtype)
        r = float(resolution)
        cond["time_ids"] = torch.tensor([[r, r, 0.0, 0.0, r, r]], dtype=dtype).repeat(n, 1)
    return cond


# ----------------------------------------------------------------------------------------------- loading
COMMON_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def detect_arch(folder: str | Path) -> str:
    """``"sdxl"`` or ``"sd15"`` for a local diffusers pipeline folder; one clear error listing what is missing.

    SDXL is recognised by its second text encoder (or by a UNet with ``addition_embed_type="text_time"``).
    """
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"model path {folder} is a file; fastinpo reads a diffusers pipeline folder (unet/, vae/, "
                         "text_encoder/, tokenizer/, scheduler/ ...). A single-file checkpoint converts with diffusers:"
                         " StableDiffusionPipeline (or StableDiffusionXLPipeline).from_single_file(FILE)"
                         ".save_pretrained(FOLDER)")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    unet_cfg_path = folder / "unet" / "config.json"
    unet_cfg = json.loads(unet_cfg_path.read_text()) if unet_cfg_path.is_file() else {}
    is_xl = (folder / "text_encoder_2").is_dir() or unet_cfg.get("addition_embed_type") == "text_time"
    parts = COMMON_PARTS + (SDXL_PARTS if is_xl else ())
    missing = [p + "/" for p in parts if not (folder / p).is_dir()]
    if not unet_cfg_path.is_file() and "unet/" not in missing:
        missing.append("unet/config.json")
    if not (folder / "scheduler" / "scheduler_config.json").is_file() and "scheduler/" not in missing:
        missing.append("scheduler/scheduler_config.json")
    if missing:
        kind = "an SDXL" if is_xl else "an SD1.5/SDXL"
        raise FileNotFoundError(
            f"{folder} is not {kind} diffusers pipeline folder: missing {', '.join(missing)} "
            f"(expected {', '.join(p + '/' for p in parts)})"
        )
    return "sdxl" if is_xl else "sd15"


@dataclass
class PipelineComponents:
    """The parts of a Stable Diffusion pipeline that training uses (text parts may be ``None`` when a cache
    replaces them)."""

    arch: str
    folder: Path
    unet: Any
    vae: Any | None
    text_encoders: list
    tokenizers: list
    scheduler_config: dict


def check_weight_files(folder: str | Path) -> None:
    """Every ``*.safetensors`` file of a model folder must be complete: its header parses and the file is as long
    as the header says. Reads only the headers, so a truncated copy (an interrupted download or rsync) is one
    error naming the file before any weight loads, not a chained traceback from deep inside ``from_pretrained``."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("the header is cut off")
                header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"weights file {path} is not a complete safetensors file ({err}; {size} bytes): copy "
                             "it again") from None
        if size < 8 + n + end:
            raise ValueError(f"weights file {path} is truncated: {size} bytes, its header describes {8 + n + end} "
                             "(an interrupted download or copy): copy it again")


def load_components(folder: str | Path, *, load_unet: bool = True, load_vae: bool = True, load_text: bool = True,
                    dtype: torch.dtype = torch.float32, unet_dtype: torch.dtype = torch.float32) -> PipelineComponents:
    """Load an SD1.5 or SDXL pipeline from a local diffusers folder with diffusers' / transformers'
    ``from_pretrained`` (nothing is downloaded). ``dtype`` is that of the VAE and text encoders; the UNet, which
    training updates, comes in ``unet_dtype`` (float32: mixed precision is autocast, not low-precision weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    arch = detect_arch(folder)
    parts = (["unet"] if load_unet else []) + (["vae"] if load_vae else []) + (
        ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else []) if load_text else [])
    for part in parts:
        check_weight_files(folder / part)
    unet = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=unet_dtype)
            if load_unet else None)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype) if load_vae else None
    encoders, tokenizers = [], []
    if load_text:
        encoders.append(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
        if arch == "sdxl":
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for module in [unet, vae, *encoders]:
        if module is not None:
            module.eval()
    return PipelineComponents(arch, folder, unet, vae, encoders, tokenizers, scheduler_config)


def hash_parts(folder: Path, parts: tuple[str, ...]):
    """A sha256 over the given subfolders' file names, sizes, and config/vocabulary contents (a model identity)."""
    h = hashlib.sha256()
    for part in parts:
        d = folder / part
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            h.update(f"{part}/{f.name}:{f.stat().st_size}".encode())
            if f.suffix in (".json", ".txt"):
                h.update(f.read_bytes())
    return h


def model_identity(folder: str | Path) -> str:
    """A string naming a pipeline's VAE and text encoders (what a latent / embedding cache depends on): the
    folder's name plus a hash of those parts' configs and weight file sizes."""
    folder = Path(folder)
    h = hash_parts(folder, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    return f"{folder.name}@{h.hexdigest()[:16]}"


def encoder_signature(folder: str | Path) -> Any:
    """What a cache depends on of the model (``identity``, ``arch``, ``scaling_factor``), read from the folder
    without loading any weights — so a run that trains from a cache never loads the VAE or text encoders."""
    folder = Path(folder)
    return signature_from_folder(folder, model_identity(folder), detect_arch(folder), default_scaling=0.18215)


def signature_from_folder(folder: Path, identity: str, arch: str, *, default_scaling: float) -> Any:
    """A cache signature (``identity``, ``arch``, the VAE's ``scaling_factor`` or the family's default)."""
    from types import SimpleNamespace

    vae_config = folder / "vae" / "config.json"
    vae_cfg = json.loads(vae_config.read_text()) if vae_config.is_file() else {}
    return SimpleNamespace(identity=identity, arch=arch,
                           scaling_factor=float(vae_cfg.get("scaling_factor", default_scaling)))


class Encoder:
    """The VAE and the text encoders of a pipeline: what turns pixels and captions into training inputs.

    ``encode_images`` returns the VAE posterior mean and std times ``scaling_factor`` (SPEC §1: training draws a
    fresh sample each step); ``encode_text`` returns the conditioning of SPEC §1 (SD1.5: last hidden state;
    SDXL: both encoders' penultimate hidden states concatenated, and encoder 2's projected pooled output).
    """

    def __init__(self, components: PipelineComponents, device: torch.device | str = "cpu", *,
                 vae_slicing: bool = False, vae_tiling: bool = False):
        """``vae_slicing``: encode one image at a time inside a call (peak memory of one image);
        ``vae_tiling``: encode large images in overlapping tiles (less memory again; the latents differ slightly
        from untiled ones). Both are diffusers' own (``AutoencoderKL.enable_slicing`` / ``enable_tiling``)."""
        if components.vae is None or not components.text_encoders:
            raise ValueError("Encoder needs the VAE and the text encoders (load_components(load_vae/load_text=True))")
        if vae_slicing:
            components.vae.enable_slicing()
        if vae_tiling:
            components.vae.enable_tiling()
        self.arch = components.arch
        self.device = torch.device(device)
        # the dtype is the one the parts were loaded in (load_components(dtype=...)): casting a loaded VAE
        # with .to(dtype) would bypass diffusers' keep-in-float32 rules
        self.dtype = next(components.vae.parameters()).dtype
        self.vae = components.vae.to(self.device).requires_grad_(False)
        self.text_encoders = [e.to(self.device).requires_grad_(False) for e in components.text_encoders]
        self.tokenizers = components.tokenizers
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.identity = model_identity(components.folder)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` ``(n, 3, R, R)`` in [-1, 1] -> ``(mean, std)`` ``(n, C, R/f, R/f)`` float32, scaled."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return (dist.mean.float() * self.scaling_factor, dist.std.float() * self.scaling_factor)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``captions`` (n) -> ``prompt_embeds`` ``(n, L, D)`` and ``pooled`` ``(n, P)`` (SDXL) or ``None``."""
        hidden, pooled = [], None
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.text_encoders, strict=True)):
            ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            if self.arch == "sd15":
                hidden.append(enc(ids)[0])
            else:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if i == 1:
                    pooled = out.text_embeds.float()
        return torch.cat(hidden, -1).float(), pooled

    def encode_batch(self, raw, *, use_std: bool = True):
        """A :class:`fastinpo.data.batch.RawBatch` -> :class:`fastinpo.data.batch.EncodedBatch`."""
        from fastinpo.data.batch import EncodedBatch

        mean, std = self.encode_images(raw.pixels)
        prompt, pooled = self.encode_text(raw.captions)
        return EncodedBatch(mean, std if use_std else None, prompt, pooled,
                            raw.time_ids if self.arch == "sdxl" else None, raw.rows)


# ----------------------------------------------------------------------------------------------- tiny pipeline
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (the BPE vocabulary is written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_bpe_path() -> Path:
    """The CLIP BPE merges shipped in the open-clip-torch wheel (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary comes from the open-clip-torch wheel: "
            "pip install --no-deps open-clip-torch (scripts/install.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch")
    return path


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[str, str]:
    """``vocab.json`` and ``merges.txt`` of the standard CLIP tokenizer, built as open_clip's SimpleTokenizer does."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    return json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), merges_txt


def write_clip_tokenizer(out_dir: str | Path) -> Any:
    """Write the standard CLIP tokenizer (vocab 49408, max length 77) to ``out_dir`` and load it back.

    (Passing the files to ``CLIPTokenizer(...)`` directly builds an empty vocabulary in transformers 5: it is
    written to disk and loaded with ``from_pretrained``.)
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (out / "vocab.json").write_text(vocab, encoding="utf-8")
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


TINY_TEXT_DIM = 32


def make_tiny_pipeline(out_dir: str | Path, arch: str = "sdxl", *, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random SD1.5 or SDXL pipeline in the standard diffusers layout (with ``model_index.json``, so
    a stock diffusers pipeline loads it) and return its folder.

    UNet (2 blocks, ~0.3M parameters), VAE (downsampling 2, 4 latent channels), CLIP text encoder(s) of width 32
    with the real 49408-token vocabulary, the real CLIP tokenizer, and the SD scheduler config. ``sample_size``
    is the image resolution the VAE is built for (latents are half of it).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"arch must be 'sd15' or 'sdxl', got {arch!r}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    text_cfg = dict(vocab_size=49408, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_DIM,
                    hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    unet_cfg = tiny_unet_config(arch)
    unet_cfg["sample_size"] = sample_size // 2
    n_text = 2 if arch == "sdxl" else 1
    unet_cfg["cross_attention_dim"] = TINY_TEXT_DIM * n_text
    if arch == "sdxl":
        unet_cfg["projection_class_embeddings_input_dim"] = TINY_TEXT_DIM + 6 * unet_cfg["addition_time_embed_dim"]
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size)
    tok_dir = out / "_tokenizer_build"
    tokenizer = write_clip_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if arch == "sdxl":
        scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder,
                                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        scheduler = PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "skip_prk_steps": True})
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out
