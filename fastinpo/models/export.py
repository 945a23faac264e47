"""Writing a trained policy for a stock diffusers pipeline: ``unet/`` (SD1.5 / SDXL) or ``transformer/`` (SD3)
for full fine-tuning, or LoRA safetensors (``lora/``, the family pipeline's ``save_lora_weights`` format),
written under a temporary name and renamed into place, so a crash never leaves half an
export where a finished one is expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def export_policy(out: Path, unet, *, lora: bool, arch: str, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``unet``'s (the denoiser's: a UNet or an SD3 transformer) trained weights to ``out``. ``state``
    replaces the module's own weights when they are not all in it (ZeRO-3 shards: a state dict gathered on one
    rank); LoRA: the adapter weights, full: the denoiser in its pipeline subfolder."""
    from fastinpo.models.family import family_for_arch

    family = family_for_arch(arch)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(unet, state_dict=state)
        if family.name != "sd3":  # SD3's loader reads peft's own names (lora_A/lora_B); the UNet's, diffusers'
            layers = convert_state_dict_to_diffusers(layers)
        layers = _fold_lora_scale(layers, unet)
        key = "transformer_lora_layers" if family.name == "sd3" else "unet_lora_layers"
        family.pipeline_class(arch).save_lora_weights(tmp / "lora", **{key: layers}, safe_serialization=True)
    elif state is None:
        unet.save_pretrained(tmp / family.denoiser_folder, safe_serialization=True)
    else:
        full = family.denoiser_class().from_config(unet.config)
        full.load_state_dict(state, strict=True)
        full.save_pretrained(tmp / family.denoiser_folder, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _fold_lora_scale(layers: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    """The trained adapter's scale ``lora_alpha / r`` folded into its up (B) weights.

    The diffusers LoRA file format carries no alpha: a stock pipeline's ``load_lora_weights`` builds adapters with
    ``lora_alpha = r`` (scale 1), so an adapter trained with ``alpha != r`` would apply ``r / alpha`` of its trained
    change. ``B · (alpha / r)`` at scale 1 is exactly the trained ``(alpha / r) · B A``, whatever the loader."""
    config = unet.peft_config["default"]
    ranks = dict(config.rank_pattern or {})
    alphas = dict(config.alpha_pattern or {})
    if ranks or alphas:
        raise ValueError("LoRA export with per-layer rank/alpha patterns is not supported")
    scale = float(config.lora_alpha) / float(config.r)
    if scale == 1.0:
        return layers
    return {k: (v * scale if (".lora.up." in k or ".lora_B." in k) else v) for k, v in layers.items()}
