"""The model-family seam: what differs between SD1.5/SDXL (a UNet predicting ε on the DDPM ᾱ schedule) and
SD3/SD3.5 (an MM-DiT transformer predicting a flow velocity, SPEC §7), behind one small interface, so that one
trainer, one cache, one sampler and one evaluator serve both.

A family owns:
- **loading and text encoding**: ``load_components`` (the denoiser, VAE, text encoders of a local diffusers
  folder), ``make_encoder`` (VAE posterior and prompt embeddings, what the cache stores), ``encoder_signature``
  (what a cache depends on, read without loading weights);
- **the denoiser**: its class and folder (``unet/`` or ``transformer/``), :func:`denoiser_forward` (the
  ``(x, t, cond) -> prediction`` call, dispatched on the conditioning's keys so DeepSpeed-wrapped modules take it
  too), ``conditioning`` (the cond dict of [winners; losers] from the cached embeddings), the LoRA targets;
- **the noise schedule**: ``build_schedule`` (the ᾱ table or the flow sigmas, from the model's own scheduler
  config) — forward noising, the target and the inversion step are the methods' (:mod:`fastinpo.methods`), which
  pick the ε or the flow arithmetic from the schedule's kind (``schedule_kind``);
- **the sampler**: ``pipeline_class`` (the stock diffusers pipeline that samples and evaluates it) and the LoRA
  export format.

:func:`family_for_folder` picks the family of a pipeline folder from its ``model_index.json`` (or its parts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from fastinpo.config import is_flow_model_folder
from fastinpo.models import sd

#: cond keys of the SD3 transformer (the UNet's are ``encoder_hidden_states`` and SDXL's ``text_embeds``,
#: ``time_ids``)
SD3_POOLED_KEY = "pooled_projections"


def denoiser_forward(module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> torch.Tensor:
    """One forward of a UNet (SD1.5/SDXL: ε) or an SD3 transformer (velocity) with its inputs in ``dtype``.

    The family is read off the conditioning (an SD3 cond holds ``pooled_projections``), so the same call serves a
    bare module, a ``torch.compile``'d one and a DeepSpeed engine. ``t``: UNet integer timesteps; SD3 ``σ·T``
    (float)."""
    if SD3_POOLED_KEY in cond:
        return module(hidden_states=x.to(dtype), timestep=t,
                      encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                      pooled_projections=cond[SD3_POOLED_KEY].to(dtype), return_dict=False)[0]
    added = {k: cond[k].to(dtype) for k in sd.SDXL_ADDED_KEYS if k in cond} or None
    return module(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  added_cond_kwargs=added, return_dict=False)[0]


class ModelFamily(Protocol):
    """What the trainer, the cache, the sampler and the evaluator need of a model family."""

    name: str  # "unet" or "sd3"
    schedule_kind: str  # "ddpm" (ᾱ table, ε / v prediction) or "flow" (SPEC §7)
    denoiser_folder: str  # "unet" or "transformer"

    def detect_arch(self, folder: str | Path) -> str: ...
    def load_components(self, folder: str | Path, **kwargs) -> Any: ...
    def make_encoder(self, components, device, **kwargs) -> Any: ...
    def encoder_signature(self, folder: str | Path) -> Any: ...
    def build_schedule(self, scheduler_config: dict) -> Any: ...
    def denoiser_class(self) -> type: ...
    def conditioning(self, prompt: torch.Tensor, pooled: torch.Tensor | None,
                     time_ids: torch.Tensor | None) -> dict[str, torch.Tensor]: ...
    def lora_targets(self, configured: list[str], module) -> list[str]: ...
    def pipeline_class(self, arch: str) -> type: ...


class UNetFamily:
    """SD1.5 / SDXL: ``unet/`` (``UNet2DConditionModel``), the DDPM ᾱ schedule, ε (or v) prediction
    (:mod:`fastinpo.models.sd`)."""

    name = "unet"
    schedule_kind = "ddpm"
    denoiser_folder = "unet"

    def detect_arch(self, folder):
        return sd.detect_arch(folder)

    def load_components(self, folder, **kwargs):
        return sd.load_components(folder, **kwargs)

    def make_encoder(self, components, device, **kwargs):
        return sd.Encoder(components, device, **kwargs)

    def encoder_signature(self, folder):
        return sd.encoder_signature(folder)

    def build_schedule(self, scheduler_config):
        from fastinpo.ops.schedule import NoiseSchedule

        return NoiseSchedule.from_config(scheduler_config)

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def conditioning(self, prompt, pooled, time_ids):
        cond = {"encoder_hidden_states": prompt}
        if pooled is not None:
            cond["text_embeds"] = pooled
            cond["time_ids"] = time_ids
        return cond

    def lora_targets(self, configured, module):
        return list(configured)

    def pipeline_class(self, arch):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


class SD3Family:
    """SD3 / SD3.5: ``transformer/`` (``SD3Transformer2DModel``), the rectified-flow schedule of
    ``FlowMatchEulerDiscreteScheduler``, velocity prediction (SPEC §7; :mod:`fastinpo.models.sd3`)."""

    name = "sd3"
    schedule_kind = "flow"
    denoiser_folder = "transformer"

    def detect_arch(self, folder):
        from fastinpo.models import sd3

        return sd3.detect_sd3(folder)

    def load_components(self, folder, **kwargs):
        from fastinpo.models import sd3

        return sd3.load_components(folder, **kwargs)

    def make_encoder(self, components, device, **kwargs):
        from fastinpo.models import sd3

        return sd3.SD3Encoder(components, device, **kwargs)

    def encoder_signature(self, folder):
        from fastinpo.models import sd3

        return sd3.encoder_signature(folder)

    def build_schedule(self, scheduler_config):
        from fastinpo.ops.flow import FlowSchedule

        return FlowSchedule.from_config(scheduler_config)

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def conditioning(self, prompt, pooled, time_ids):
        if pooled is None:
            raise ValueError("an SD3 model needs pooled prompt embeddings (a cache built for another family?)")
        return {"encoder_hidden_states": prompt, SD3_POOLED_KEY: pooled}

    def lora_targets(self, configured, module):
        """The configured targets, and the joint attention's context-stream projections (``add_q_proj``,
        ``add_k_proj``, ``add_v_proj``) alongside ``to_q``/``to_k``/``to_v`` when the transformer has them."""
        targets = list(configured)
        names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
        for plain, added in (("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")):
            if plain in targets and added in names and added not in targets:
                targets.append(added)
        return targets

    def pipeline_class(self, arch):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline


FAMILIES: dict[str, ModelFamily] = {"unet": UNetFamily(), "sd3": SD3Family()}
#: arch (what ``detect_arch`` returns, what caches and exports record) -> family
ARCH_FAMILY = {"sd15": "unet", "sdxl": "unet", "sd3": "sd3"}


def is_sd3_folder(folder: str | Path) -> bool:
    """An SD3/SD3.5 pipeline folder: ``model_index.json`` names a ``StableDiffusion3*`` pipeline, or the folder has
    ``transformer/`` and no ``unet/``."""
    return is_flow_model_folder(folder)


def family_for_folder(folder: str | Path) -> ModelFamily:
    """The family of a local diffusers pipeline folder."""
    return FAMILIES["sd3"] if is_sd3_folder(folder) else FAMILIES["unet"]


def family_for_arch(arch: str) -> ModelFamily:
    if arch not in ARCH_FAMILY:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCH_FAMILY)}")
    return FAMILIES[ARCH_FAMILY[arch]]


def detect_arch(folder: str | Path) -> str:
    """``"sd15"``, ``"sdxl"`` or ``"sd3"`` for a local pipeline folder (one clear error listing what is missing)."""
    return family_for_folder(folder).detect_arch(folder)


def encoder_signature(folder: str | Path) -> Any:
    """What a cache depends on of a model folder (identity, arch, scaling), read without loading weights."""
    return family_for_folder(folder).encoder_signature(folder)


def family_of_denoiser(module) -> ModelFamily:
    """The family of a loaded denoiser module (an ``SD3Transformer2DModel`` or a UNet)."""
    return FAMILIES["sd3"] if type(module).__name__.startswith("SD3Transformer") else FAMILIES["unet"]
