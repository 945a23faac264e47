"""The engine: what differs between training in one process and under DeepSpeed ZeRO, behind one interface.

:func:`fastinpo.train.loop.train` is written once; it asks the engine, chosen once from
``distributed.backend`` (:func:`fastinpo.train.loop.make_engine`), for everything that depends on how the policy
is held and stepped:

============================  =====================================  ==========================================
                              :class:`~fastinpo.train.engine_plain.  :class:`~fastinpo.train.engine_deepspeed.
                              PlainEngine`                           DeepSpeedEngine`
============================  =====================================  ==========================================
ranks, device, barrier        one process, ``train.device``          the launch's process group, one GPU a rank
:meth:`Engine.wrap`           policy + reference on the device,      the policy as a DeepSpeed engine (ZeRO
                              optimizer, LR schedule, loss scaler    sharding), reference, LR schedule
:meth:`Engine.backward`       (scaled) ``loss.backward()``           ``engine.backward`` + ``engine.step``
:meth:`Engine.step`           clip, optimizer step skipped on the    DeepSpeed's step (it skips a non-finite
                              device when non-finite, LR schedule    one itself); the global gradient norm
checkpoints                   :mod:`fastinpo.train.checkpoint`       every rank's shards, one ``state.json``
:meth:`Engine.export`         the live policy                        the policy gathered on rank 0
:meth:`Engine.reduce_metrics` nothing to reduce                      mean over ranks (one all-reduce a log)
============================  =====================================  ==========================================

The model family (the UNet, its ε callables, its export format) stays out of the engine: the engine gets its
models from :mod:`fastinpo.train.models` and writes exports with :mod:`fastinpo.models.export`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from fastinpo.config import Config


def pick_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available")
    return device


class Engine(ABC):
    """The interface the training loop runs over (see the module docstring). Constructed from the config before
    anything is loaded; :meth:`wrap` then takes the loaded policy UNet. ``models`` (after :meth:`wrap`) has
    ``unet``, ``lora``, ``callables`` (what methods call) and ``refresh_inversion_copy()``."""

    #: ``distributed.backend`` of the engine ("none" or "deepspeed"); checkpoints record it
    backend: str
    device: torch.device
    rank: int = 0
    world_size: int = 1
    models: Any = None

    def __init__(self, config: Config):
        self.config = config

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's files."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """Appended to the progress bar's description."""
        return ""

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        return None  # default: nothing to do

    def check_output_dir(self, out_dir: Path) -> None:
        """Refuse an output folder that is not the same on every rank (nothing to check in one process)."""
        return None  # default: nothing to do

    def check_resume_point(self, resume_from: Path | None) -> None:
        """Refuse to resume unless every rank found the same complete checkpoint (one process: nothing to do)."""
        return None  # default: nothing to do

    # ------------------------------------------------------------------------------------------- set-up
    @abstractmethod
    def wrap(self, unet, schedule, pairs_per_step: int) -> None:
        """Take the loaded float32 policy UNet: build ``self.models`` and what steps them."""

    def write_settings(self, out_dir: Path) -> None:
        """Rank 0, at the start of a run: any settings file of the engine besides ``config.yaml``."""
        return None  # default: nothing to do

    # ------------------------------------------------------------------------------------------- one step
    def begin_step(self) -> None:
        """Before the first micro-batch of an optimizer step."""
        return None  # default: nothing to do

    def begin_micro_batch(self, batch) -> None:
        """Before a micro-batch's method call (``batch``: its :class:`fastinpo.data.batch.EncodedBatch`)."""
        return None  # default: nothing to do

    @abstractmethod
    def backward(self, out, scale: float) -> None:
        """Back-propagate a micro-batch's ``out.loss * scale`` (unless the method did, ``out.backward_done``)."""

    @abstractmethod
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer step after the last micro-batch, with the LR schedule's. Returns ``(skipped, grad_norm)``,
        device tensors: ``skipped`` (bool) says the update was skipped as non-finite; no host read."""

    @abstractmethod
    def lr(self) -> float:
        """The current learning rate (read at logging steps only)."""

    def reduce_metrics(self, stacked: torch.Tensor) -> torch.Tensor:
        """Per-rank metric means -> means over the global batch (a collective: every rank calls)."""
        return stacked

    # ------------------------------------------------------------------------------------------- state
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint's ``state.json`` records of the engine, besides the loop's counters."""
        return {}

    @abstractmethod
    def save_checkpoint(self, out_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        """Write ``checkpoints/step-{step}`` atomically (every rank calls); returns its path."""

    @abstractmethod
    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote (weights, optimizer, LR schedule, ...) and refresh the
        inversion copy; returns the saved ``state.json``."""

    @abstractmethod
    def export(self, out: Path, arch: str) -> Path:
        """Write the trained policy for a stock diffusers pipeline (every rank calls)."""

    def summary(self) -> dict[str, Any]:
        """What the run's ``summary.json`` records of the engine."""
        return {}
