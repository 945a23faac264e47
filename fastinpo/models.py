"""Model adapters: a diffusers UNet as the ``model(x, t, cond) -> eps`` callable the inversion loops take,
and the tiny UNet configs that tests and quick examples build (the full tiny-pipeline maker, with VAE, text
encoders and tokenizers on disk, belongs to the trainer).

``cond`` for a UNet is a flat dict whose tensors all have the batch as dim 0:
``{"encoder_hidden_states": (n, L, D)}`` for SD1.5, plus ``"text_embeds": (n, P)`` and ``"time_ids": (n, 6)``
for SDXL. :func:`fastinpo.inversion.zero_uncond` zeros all but ``time_ids``, as Inversion-DPO's CFG needs.
"""

from __future__ import annotations

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
