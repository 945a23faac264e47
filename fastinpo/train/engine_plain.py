"""The one-process engine (``distributed.backend = "none"``): the policy, its reference and an ordinary torch
optimizer on one device.

Per optimizer step: gradient clipping, the optimizer (a non-finite loss or gradient skips the update on the
device: the fused AdamW is told through ``found_inf``, an fp16 run's ``GradScaler`` skips by itself; only an
optimizer without device-side skipping reads the flag on the host), the LR schedule. Checkpoints:
:mod:`fastinpo.train.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastinpo.config import Config
from fastinpo.models.export import export_policy
from fastinpo.train import checkpoint as ckpt
from fastinpo.train.engine import Engine, pick_device
from fastinpo.train.models import build_lr_scheduler, build_models, build_optimizer


class PlainEngine(Engine):
    backend = "none"

    def __init__(self, config: Config):
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
        if world > 1:
            # each process would train alone, all of them into the same train.output_dir
            raise ValueError(f"a launcher started {world} processes (WORLD_SIZE={world}) but distributed.backend = "
                             "'none' trains in one process: set distributed.backend = 'deepspeed' (e.g. --set "
                             "distributed.backend=deepspeed), or start one process without a launcher")
        super().__init__(config)
        self.device = pick_device(config.train.device)

    def wrap(self, unet, schedule, pairs_per_step: int) -> None:
        config = self.config
        self.models = build_models(config, unet, self.device)
        self.optimizer = build_optimizer(config, self.models.trainable, self.device, pairs_per_step)
        self.lr_scheduler = build_lr_scheduler(config, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.train.mixed_precision == "fp16" else None
        self.trainable = dict(zip(self.models.trainable_names, self.models.trainable, strict=True))
        # the fused optimizer skips the whole update on the device when told of a non-finite step
        self.fused_skip = getattr(self.optimizer, "_step_supports_amp_scaling", False) and self.scaler is None

    def begin_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def backward(self, out, scale: float) -> None:
        if not out.backward_done:
            loss = out.loss * scale
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.bad |= ~torch.isfinite(out.loss)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        models, optimizer, scaler, bad = self.models, self.optimizer, self.scaler, self.bad
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = self.config.optim.max_grad_norm
        grad_norm = (torch.nn.utils.clip_grad_norm_(models.trainable, max_norm) if max_norm > 0
                     else torch.nn.utils.get_total_norm([p.grad for p in models.trainable if p.grad is not None]))
        bad |= ~torch.isfinite(grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif self.fused_skip:  # the fused optimizer skips the whole update on the device when bad is set
            optimizer.grad_scale, optimizer.found_inf = None, bad.float()
            optimizer.step()
        elif not bool(bad):  # optimizers without device-side skipping: one host read per step
            optimizer.step()
        self.lr_scheduler.step()
        return bad, grad_norm

    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def save_checkpoint(self, out_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        return ckpt.save_checkpoint(out_dir, step, trainable=self.trainable, optimizer=self.optimizer,
                                    lr_scheduler=self.lr_scheduler, scaler=self.scaler, state=state,
                                    keep_last=keep_last)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        saved = ckpt.load_checkpoint(path, trainable=self.trainable, optimizer=self.optimizer,
                                     lr_scheduler=self.lr_scheduler, scaler=self.scaler)
        self.models.refresh_inversion_copy()
        return saved

    def export(self, out: Path, arch: str) -> Path:
        return export_policy(out, self.models.unet, lora=self.models.lora, arch=arch)
