"""SD3 / SD3.5: loading a local ``StableDiffusion3Pipeline`` folder (``transformer/`` = ``SD3Transformer2DModel``,
``vae/``, CLIP-L ``text_encoder/``, CLIP-G ``text_encoder_2/``, optional T5 ``text_encoder_3/``, ``scheduler/`` =
``FlowMatchEulerDiscreteScheduler``), the :class:`SD3Encoder` (VAE posterior with SD3's shift and scale, and the
prompt embeddings exactly as ``StableDiffusion3Pipeline.encode_prompt``, SPEC §7), and the tiny random SD3 pipeline
of tests and the demo.

The transformer's conditioning is ``{"encoder_hidden_states": (n, 77 + L_T5, D_joint), "pooled_projections":
(n, P)}``; its timestep input is ``σ·T`` (float).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastinpo.models.sd import (
    PipelineComponents,
    check_weight_files,
    hash_parts,
    signature_from_folder,
    write_clip_tokenizer,
)

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
#: ``StableDiffusion3Pipeline``'s default ``max_sequence_length`` (the T5 part of the prompt embeddings)
MAX_SEQUENCE_LENGTH = 256


def detect_sd3(folder: str | Path) -> str:
    """``"sd3"`` for a complete SD3/SD3.5 folder (T5 optional); one clear error listing what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    missing = [p + "/" for p in PARTS if not (folder / p).is_dir()]
    for part, name in (("transformer", "config.json"), ("scheduler", "scheduler_config.json")):
        if (folder / part).is_dir() and not (folder / part / name).is_file():
            missing.append(f"{part}/{name}")
    if missing:
        raise FileNotFoundError(f"{folder} is not an SD3 diffusers pipeline folder: missing {', '.join(missing)} "
                                f"(expected {', '.join(p + '/' for p in PARTS)}, optionally text_encoder_3/ and "
                                "tokenizer_3/ for T5)")
    return "sd3"


def has_t5(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / p).is_dir() for p in T5_PARTS)


def load_components(folder: str | Path, *, load_unet: bool = True, load_vae: bool = True, load_text: bool = True,
                    dtype: torch.dtype = torch.float32, unet_dtype: torch.dtype = torch.float32) -> PipelineComponents:
    """Load an SD3 pipeline's parts with ``from_pretrained`` (nothing downloaded). The transformer (the policy)
    comes in ``unet_dtype`` (float32 for training) and sits in ``PipelineComponents.unet``; the text encoders are
    ``[CLIP-L, CLIP-G]`` plus T5 when the folder has it."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    arch = detect_sd3(folder)
    t5 = has_t5(folder)
    parts = (["transformer"] if load_unet else []) + (["vae"] if load_vae else []) + (
        ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if t5 else []) if load_text else [])
    for part in parts:
        check_weight_files(folder / part)
    transformer = (SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=unet_dtype)
                   if load_unet else None)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype) if load_vae else None
    encoders, tokenizers = [], []
    if load_text:
        for sub in ("", "_2"):
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder" + sub,
                                                                        torch_dtype=dtype))
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer" + sub))
        if t5:
            from transformers import T5EncoderModel, T5TokenizerFast

            encoders.append(T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", torch_dtype=dtype))
            tokenizers.append(T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3"))
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for module in [transformer, vae, *encoders]:
        if module is not None:
            module.eval()
    return PipelineComponents(arch, folder, transformer, vae, encoders, tokenizers, scheduler_config)


def model_identity(folder: str | Path) -> str:
    """The folder's name and a hash of its VAE and text parts' configs and weight sizes (what a cache depends on)."""
    folder = Path(folder)
    h = hash_parts(folder, ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                            "tokenizer_3"))
    # the T5-less prompt embeddings' width is the transformer's joint_attention_dim
    cfg = folder / "transformer" / "config.json"
    if cfg.is_file():
        h.update(str(json.loads(cfg.read_text()).get("joint_attention_dim")).encode())
    return f"{folder.name}@{h.hexdigest()[:16]}"


def encoder_signature(folder: str | Path) -> Any:
    """``identity``, ``arch`` and ``scaling_factor`` read from the folder without loading weights."""
    folder = Path(folder)
    return signature_from_folder(folder, model_identity(folder), detect_sd3(folder), default_scaling=1.5305)


class SD3Encoder:
    """The VAE and text encoders of an SD3 pipeline.

    ``encode_images``: the VAE posterior ``((mean - shift_factor) · scaling_factor, std · scaling_factor)``, the
    latents SD3's training and pipeline use. ``encode_text``: exactly ``StableDiffusion3Pipeline.encode_prompt``
    (no CFG, ``clip_skip=None``, ``max_sequence_length=256``): CLIP-L and CLIP-G penultimate hidden states
    concatenated on the last dim, zero-padded to the T5 width and concatenated with the T5 sequence (zeros of
    ``(256, joint_attention_dim)`` without T5); pooled = both CLIP projected outputs concatenated. Float32 out.
    """

    arch = "sd3"

    def __init__(self, components: PipelineComponents, device: torch.device | str = "cpu", *,
                 vae_slicing: bool = False, vae_tiling: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        if components.vae is None or len(components.text_encoders) < 2:
            raise ValueError("SD3Encoder needs the VAE and the text encoders (load_components(load_vae/load_text))")
        if vae_slicing:
            components.vae.enable_slicing()
        if vae_tiling:
            components.vae.enable_tiling()
        self.device = torch.device(device)
        self.dtype = next(components.vae.parameters()).dtype
        self.vae = components.vae.to(self.device).requires_grad_(False)
        self.text_encoders = [e.to(self.device).requires_grad_(False) for e in components.text_encoders]
        self.tokenizers = components.tokenizers
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.max_sequence_length = max_sequence_length
        cfg = Path(components.folder) / "transformer" / "config.json"
        self.joint_attention_dim = int(json.loads(cfg.read_text())["joint_attention_dim"])
        self.identity = model_identity(components.folder)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return ((dist.mean.float() - self.shift_factor) * self.scaling_factor,
                dist.std.float() * self.scaling_factor)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        clip_dtype = self.text_encoders[0].dtype
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            ids = tok(captions, padding="max_length", max_length=self.tokenizers[0].model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(clip_dtype))
        clip = torch.cat(hidden, -1)
        if len(self.text_encoders) > 2:
            ids = self.tokenizers[2](captions, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoders[2](ids.to(self.device))[0].to(self.text_encoders[2].dtype)
        else:
            t5 = torch.zeros(len(captions), self.max_sequence_length, self.joint_attention_dim, device=self.device,
                             dtype=clip_dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], -2).float(), torch.cat(pooled, -1).float()

    def encode_batch(self, raw, *, use_std: bool = True):
        """A :class:`fastinpo.data.batch.RawBatch` -> :class:`fastinpo.data.batch.EncodedBatch` (no time ids)."""
        from fastinpo.data.batch import EncodedBatch

        mean, std = self.encode_images(raw.pixels)
        prompt, pooled = self.encode_text(raw.captions)
        return EncodedBatch(mean, std if use_std else None, prompt, pooled, None, raw.rows)


# ----------------------------------------------------------------------------------------------- tiny pipeline
TINY_TEXT_DIM = 32


def tiny_transformer_config(sample_size: int = 16) -> dict[str, Any]:
    """An ``SD3Transformer2DModel`` config with SD3.5's structure (joint attention, dual-attention first layer,
    RMS q/k norm) and almost no parameters; text widths of the tiny CLIP encoders (2 x 32)."""
    return dict(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=2 * TINY_TEXT_DIM, caption_projection_dim=16,
                pooled_projection_dim=2 * TINY_TEXT_DIM, out_channels=4, pos_embed_max_size=sample_size,
                dual_attention_layers=(0,), qk_norm="rms_norm")


#: SD3/SD3.5's scheduler config (the keys that matter: SPEC §7)
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def make_tiny_sd3_pipeline(out_dir: str | Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random SD3 pipeline (no T5: ``text_encoder_3=None``) in the standard diffusers layout, loadable
    by a stock ``StableDiffusion3Pipeline``: MM-DiT transformer (2 layers), VAE (downsampling 2, 4 latent
    channels, SD3's shift factor), two CLIP text encoders with projection (width 32, the real vocabulary), the real
    CLIP tokenizer, the flow-matching scheduler of SD3. ``sample_size`` is the image resolution."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    text_cfg = dict(vocab_size=49408, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_DIM,
                    hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    transformer = SD3Transformer2DModel(**tiny_transformer_config(sample_size // 2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tok_dir = out / "_tokenizer_build"
    tokenizer = write_clip_tokenizer(tok_dir)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae, text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out
