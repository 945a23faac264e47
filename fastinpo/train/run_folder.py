"""What a run folder (``train.output_dir``) may hold and what a start says, so that nothing is lost or silently
different:

- a folder that already holds a run is never trained into without ``--resume``: the user resumes it, picks
  another ``train.output_dir``, or passes ``--overwrite``, which moves the old run aside (never deletes it);
- a resume continues the run that was checkpointed: only the keys of :data:`RESUMABLE_KEYS` (how long, how often
  to log, sample and checkpoint) may change; any other change is refused, naming each key with its saved and new
  value, so ``config.yaml`` always describes what ran;
- the start prints one report: device and precision, the data (rows, pairs, skips by reason), the effective
  learning rate, and warnings for settings that cost without helping (fp16 on a CPU; a trajectory cache that the
  planned run can never read back).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from fastinpo.config import Config, load_config

#: config keys a resume may change: the run's length and cadence, never what or how it trains
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_last", "train.sample_every",
    "train.sample_prompts", "train.max_nan_steps", "train.progress", "train.output_dir", "data.num_workers",
    "train.validate_every", "train.early_stopping_patience",
    # where and how long the ranks talk, not what they train: the fix for a wrong interface or a slow file system,
    # and what another cluster needs when a run moves there
    "distributed.socket_ifname", "distributed.timeout_s",
})

#: what marks a folder as holding a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "export")


def existing_run(out_dir: Path) -> list[str]:
    """The run files ``out_dir`` holds (empty: no run there)."""
    if not out_dir.is_dir():
        return []
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def claim_output_dir(out_dir: Path, *, resume: str | None, overwrite: bool, is_main: bool) -> Path | None:
    """Refuse to train into a folder holding a run unless resuming it; with ``overwrite`` move the old run aside
    (to ``NAME.replaced-YYYYmmdd-HHMMSS``) and return where it went. Only rank 0 moves anything."""
    found = existing_run(out_dir)
    if not found or resume is not None:
        return None
    if not overwrite:
        raise ValueError(
            f"train.output_dir = {str(out_dir)!r} already holds a run ({', '.join(found)}). Continue it with "
            "`fastinpo train CONFIG --resume latest`, choose another train.output_dir, or pass --overwrite to move "
            "the old run aside (it is renamed, not deleted).")
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_main:
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{aside.name}-{n}")
            n += 1
        out_dir.rename(aside)
        print(f"fastinpo train: the run that was in {out_dir} was moved to {aside}")
    return aside


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in d.items() for key, value in values.items()}


def saved_config(checkpoint: Path, out_dir: Path) -> dict[str, Any] | None:
    """The config the checkpoint's run trained with: stored in the checkpoint itself, or (checkpoints of older
    versions) the run folder's ``config.yaml``."""
    import json

    state = json.loads((checkpoint / "state.json").read_text())
    if "config" in state:
        return state["config"]
    path = out_dir / "config.yaml"
    return load_config(path).to_dict() if path.is_file() else None


def check_resume_config(config: Config, checkpoint: Path, out_dir: Path, *, world_size: int = 1) -> None:
    """A resume must train what the checkpoint's run trained: every key outside :data:`RESUMABLE_KEYS` equal —
    except ``train.pairs_per_batch`` and ``train.grad_accum`` when the pairs per optimizer step (ranks x both)
    stay what they were (the same training on another number of ranks or another split: see
    :func:`fastinpo.train.checkpoint.world_size_change_problem`)."""
    import json

    from fastinpo.train.checkpoint import BATCH_KEYS, keeps_pairs_per_step, saved_world_size

    saved = saved_config(checkpoint, out_dir)
    if saved is None:
        warnings.warn(f"checkpoint {checkpoint} records no config: the resumed run cannot be checked against it",
                      stacklevel=3)
        return
    old, new = _flatten(saved), _flatten(config.to_dict())
    ranks = saved_world_size(json.loads((checkpoint / "state.json").read_text()))
    same_pairs = keeps_pairs_per_step((ranks, old.get(BATCH_KEYS[0], 1), old.get(BATCH_KEYS[1], 1)),
                                      (world_size, new[BATCH_KEYS[0]], new[BATCH_KEYS[1]]))
    allowed = RESUMABLE_KEYS | (set(BATCH_KEYS) if same_pairs else set())
    changed = [f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k not in allowed and old.get(k) != new.get(k)]
    if changed:
        raise ValueError(
            f"resuming {checkpoint} with a config that differs from the run's in keys a resume cannot change:\n  "
            + "\n  ".join(changed) + "\nResume with the run's settings (only "
            + ", ".join(sorted(RESUMABLE_KEYS)) + " may change), or start a new run in another train.output_dir.")


def start_report(config: Config, *, device, label: str, stream, pairs_per_step: int, start_step: int,
                 resumed_from: Path | None) -> list[str]:
    """The lines a start prints (rank 0), and the warnings it raises."""
    t, o = config.train, config.optim
    precision = {"no": "float32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[t.mixed_precision]
    if config.lora.rank == 0:
        weights, reference = "weights float32", f"reference {config.model.reference_dtype}"
    else:
        from fastinpo.train.models import base_weight_dtype

        base = str(base_weight_dtype(config, device)).removeprefix("torch.")
        weights = f"frozen base {base} (model.base_dtype = {config.model.base_dtype!r}), adapters float32"
        reference = f"reference the base, LoRA rank {config.lora.rank}"
    lines = [f"device {device}{label}; policy {precision} ({weights}), {reference}"]
    if t.mixed_precision == "fp16" and device.type == "cpu":
        warnings.warn("train.mixed_precision = 'fp16' on a CPU runs 10-25x slower than float32 (CPUs have no fast "
                      "fp16 kernels): use train.mixed_precision = 'no' (or 'bf16') on a CPU", stacklevel=3)
    skipped = stream.skipped
    skips = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "none"
    source = f"cache {config.data.cache_dir}" if stream.cached else f"{config.data.path} (encoded on the fly)"
    lines.append(f"data: {len(stream)} usable pairs from {source}; rows skipped: {skips}")
    lr = o.lr * pairs_per_step if o.scale_lr else o.lr
    lines.append(f"learning rate {lr:.4g}" + (f" (optim.lr {o.lr:g} x {pairs_per_step} pairs per step, "
                                              "optim.scale_lr)" if o.scale_lr else "")
                 + f", {o.lr_scheduler} with {o.warmup_steps} warm-up steps; {pairs_per_step} pairs per step, "
                 f"steps {start_step + 1}..{t.max_steps}"
                 + (f" (resumed from {resumed_from})" if resumed_from is not None else ""))
    if config.method.trajectory_cache_dir:
        planned = (t.max_steps - start_step) * pairs_per_step
        if planned < 2 * len(stream):
            warnings.warn(
                f"method.trajectory_cache_dir: this run sees {planned} pairs of {len(stream)}, so no pair is "
                f"seen twice and every cache entry is written but never read (about "
                f"{_trajectory_bytes(config) * min(planned, len(stream)) / 2**30:.1f} GiB); leave it unset "
                "unless the run is long enough to come back to its pairs", stacklevel=3)
    return lines


def _trajectory_bytes(config: Config) -> int:
    """Bytes of one pair's cached reference trajectory: N steps x 2 images x the latent, float32."""
    latent = 4 * (config.data.resolution // 8) ** 2
    return config.method.num_steps * 2 * latent * 4

