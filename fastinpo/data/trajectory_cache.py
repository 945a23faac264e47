"""The on-disk cache of Inversion-DPO reference trajectories (``method.trajectory_cache_dir``).

The reference model is frozen, so a pair's reference trajectory (SPEC §4: N guided reference calls, the most
expensive part of an Inversion-DPO step after the policy) is the same every epoch — *if* the pair's inputs are
the same every epoch. That holds only when the latents are the VAE posterior mean (``data.latent_sample =
false``), no caption is dropped (``data.caption_dropout = 0``, as the official Inversion-DPO recipe) and the
images are not randomly cropped or flipped (``data.center_crop = true``, ``data.random_flip = false``).
``Config.validate`` refuses any other config (:func:`fastinpo.config.trajectory_cache_problems`), and the cache
records these settings.

Layout::

    trajectory_cache.json            the signature (see :func:`trajectory_signature`); a folder made for another
                                     signature is refused with :class:`StaleTrajectoryCacheError`
    000000/000000042.safetensors     source row 42: ``ref_eps`` ``(N, 2, C, h, w)`` float32, winner first

Only ε is stored: the trajectory's latents are replayed from ``z0`` and ε with N elementwise DDIM steps
(:func:`fastinpo.ops.inversion.replay_inversion_dpo_trajectory`), the same steps that made them, so they come back
bit for bit while the cache is half the size. Size per pair: ``N * 2 * C * h * w * 4`` bytes — SDXL at 1024²
with N = 40: 20 MiB; SD1.5 at 512²: 5 MiB. Every file is written to a temporary name and renamed into place, so a
crash leaves either a whole entry or none, and a resumed run reads exactly what the interrupted one computed.

Writing an entry copies ε to the host (a device sync) — once per pair, in the first epoch only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastinpo.data.cache import StaleCacheError

TRAJECTORY_FORMAT_VERSION = 1
SIGNATURE_FILE = "trajectory_cache.json"


class StaleTrajectoryCacheError(StaleCacheError):
    """The trajectory cache folder was made for another reference, data, schedule or grid."""


def weights_fingerprint(named_tensors) -> str:
    """A digest of a model's weights: every tensor's name, shape and dtype, and up to 4096 of its values at a
    fixed stride. Cheap on an SDXL UNet (a few MB read), and any fine-tuning changes it (it moves every weight)."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def reference_fingerprint(training_models) -> str:
    """The fingerprint of the reference the trainer calls: the frozen copy (full fine-tuning), or the UNet's base
    weights with the adapters left out (LoRA: the reference is the UNet with its adapters disabled)."""
    if training_models.reference_unet is not None:
        return weights_fingerprint(training_models.reference_unet.state_dict().items())
    return weights_fingerprint((n, p) for n, p in training_models.unet.state_dict().items() if "lora_" not in n)


def trajectory_signature(config, *, data_signature: dict, reference: str, schedule, device_type: str) -> dict:
    """Everything a cached reference trajectory depends on."""
    m, d = config.method, config.data
    alphas = schedule.alphas_cumprod.detach().double().cpu().numpy().tobytes()
    sig = {
        "format_version": TRAJECTORY_FORMAT_VERSION,
        "data": data_signature,
        "reference_weights": reference,
        "reference_dtype": "float32" if config.lora.rank > 0 else config.model.reference_dtype,
        "num_steps": int(m.num_steps),
        "guidance_scale": float(m.guidance_scale),
        "alphas_cumprod": hashlib.sha256(alphas).hexdigest()[:32],
        "alpha_init": float(schedule.alpha_init),
        "fixed_inputs": {"caption_dropout": d.caption_dropout, "latent_sample": d.latent_sample,
                         "center_crop": d.center_crop, "random_flip": d.random_flip},
        "device_type": device_type,
    }
    return json.loads(json.dumps(sig))


class TrajectoryCache:
    """Per-pair reference ε of Inversion-DPO, keyed by source row; see the module docstring.

    ``load(rows, device)`` returns ``(N, 2B, ...)`` (winners first) when every pair is cached, else None;
    ``store(rows, ref_eps)`` writes the pairs not cached yet. ``hits`` / ``misses`` count micro-batches.
    """

    def __init__(self, folder: str | os.PathLike, signature: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.signature = signature
        self.hits = self.misses = 0
        path = self.folder / SIGNATURE_FILE
        if path.exists():
            found = json.loads(path.read_text())
            if found != signature:
                diff = sorted(k for k in set(found) | set(signature) if found.get(k) != signature.get(k))
                raise StaleTrajectoryCacheError(
                    f"the trajectory cache in {self.folder} was made for another run setup (differs in: "
                    f"{', '.join(diff)}); point method.trajectory_cache_dir at a new folder or delete this one")
        else:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(signature, indent=2, sort_keys=True))
            os.replace(tmp, path)

    def path(self, row: int) -> Path:
        return self.folder / f"{row // 1000:06d}" / f"{row:09d}.safetensors"

    def load(self, rows: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
        paths = [self.path(int(r)) for r in rows.tolist()]
        if not all(p.exists() for p in paths):
            self.misses += 1
            return None
        entries = [load_file(str(p))["ref_eps"] for p in paths]  # each (N, 2, ...)
        self.hits += 1
        eps = torch.cat([torch.stack([e[:, 0] for e in entries], 1), torch.stack([e[:, 1] for e in entries], 1)], 1)
        return eps.to(device, non_blocking=True)

    def store(self, rows: torch.Tensor, ref_eps: torch.Tensor) -> None:
        B = rows.numel()
        if ref_eps.shape[1] != 2 * B:
            raise ValueError(f"ref_eps has {ref_eps.shape[1]} samples for {B} pairs (expected {2 * B})")
        host = ref_eps.detach().float().cpu()
        for b, row in enumerate(rows.tolist()):
            path = self.path(int(row))
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = torch.stack([host[:, b], host[:, B + b]], 1).contiguous()  # (N, 2, ...)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"ref_eps": entry}, str(tmp), metadata={"row": str(row)})
            os.replace(tmp, path)

    def stats(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "hits": self.hits, "misses": self.misses}


def open_for_run(config, stream, training_models, schedule, device: torch.device) -> TrajectoryCache:
    """The trainer's cache for this config (validated: :func:`fastinpo.config.trajectory_cache_problems` is part of
    ``Config.validate``); a folder made for another setup is refused."""
    sig = trajectory_signature(config, data_signature=stream.data_signature,
                               reference=reference_fingerprint(training_models), schedule=schedule,
                               device_type=device.type)
    return TrajectoryCache(config.method.trajectory_cache_dir, sig)
