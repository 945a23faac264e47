"""Validation sample grids during training: the live policy UNet in a stock diffusers pipeline, the same prompts
and seeds every time, one PNG per ``train.sample_every`` steps (rows: prompts, columns: seeds)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from fastinpo.config import Config

SEEDS = (0, 1, 2, 3)
DEFAULT_PROMPTS = ("a photo of a cat", "a castle on a hill")


class ValidationGrids:
    def __init__(self, config: Config, out_dir: Path, device: torch.device):
        self.config, self.device = config, device
        self.dir = out_dir / "samples"
        self.prompts = list(config.train.sample_prompts) or list(DEFAULT_PROMPTS)
        self.pipe = None

    def __call__(self, step: int, unet) -> Path:
        from fastinpo.eval.sampling import build_pipeline, contact_sheet, generate

        if self.pipe is None:  # the VAE and text encoders are loaded only when a grid is first asked for
            self.pipe = build_pipeline(self.config.model.path, unet=unet, device=self.device)
        was_training = unet.training
        unet.eval()
        try:
            # a half-precision frozen LoRA base (model.base_dtype) beside float32 adapters and encoders: sampled
            # under the autocast of the base's dtype, as training evaluates it
            base = unet.dtype
            amp = torch.autocast(self.device.type, dtype=base) if base != torch.float32 else nullcontext()
            with torch.no_grad(), amp:
                R = self.config.data.resolution
                prompts = [p for p in self.prompts for _ in SEEDS]
                images = generate(self.pipe, prompts, list(SEEDS) * len(self.prompts), steps=20,
                                  guidance_scale=5.0, height=R, width=R, progress=False)
        finally:
            unet.train(was_training)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:08d}.png"
        contact_sheet(images, rows=len(self.prompts), cols=len(SEEDS), labels=self.prompts).save(path)
        return path
