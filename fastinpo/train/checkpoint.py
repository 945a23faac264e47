"""Atomic, exact checkpoints.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` written first under a temporary name and renamed into
place only when every file is on disk (``state.json`` last), so a crash — even SIGKILL in the middle of a write —
leaves either a complete checkpoint or a ``.tmp-*`` folder that is ignored and removed. Resuming restores the
trainable weights, the optimizer, the LR schedule, the loss scaler and the step counters; data order and all
randomness are functions of (seed, step), so a resumed run continues exactly where it stopped.

A DeepSpeed checkpoint written on W ranks resumes on W' ranks when the pairs per optimizer step
(ranks x ``train.pairs_per_batch`` x ``train.grad_accum``) stay the same (:func:`world_size_change_problem`): the
stream position of every pair, hence all its randomness, is unchanged, and the sharded optimizer state is
converted once into DeepSpeed's universal checkpoint (:func:`universal_copy`, next to the shards, which are kept).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
WEIGHTS = "trainable.safetensors"
#: ``checkpoints/best.json``: which checkpoint ``train.keep_best`` keeps (its step, metric and value)
BEST = "best.json"
#: what a resume may change together, as long as the pairs per optimizer step stay the same
BATCH_KEYS = ("train.pairs_per_batch", "train.grad_accum")
#: ``step-N/universal/``: the DeepSpeed universal conversion of a checkpoint's shards (resume on another world size)
UNIVERSAL = "universal"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_dir(root: str | Path) -> Path:
    return Path(root) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a ``state.json`` inside), oldest first."""
    d = checkpoint_dir(root)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint (None if there is none); else a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete fastinpo checkpoint (no state.json)")
    return path


def save_checkpoint(root: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    scaler, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, then keep only the newest ``keep_last``."""
    d = checkpoint_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / WEIGHTS)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    return commit_checkpoint(root, tmp, step, state=state, keep_last=keep_last)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, then ``folder``: before it is renamed into place, so that a
    crash leaves either the complete folder or the temporary one."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(folder)


def commit_checkpoint(root: str | Path, tmp: Path, step: int, *, state: dict[str, Any], keep_last: int) -> Path:
    """Finish a checkpoint whose files are all in ``tmp``: fsync them, write ``state.json`` last, rename ``tmp``
    to ``checkpoints/step-{step}``, prune to the newest ``keep_last``. Under DeepSpeed every rank has written its
    shards into ``tmp`` before rank 0 calls this (after a barrier)."""
    d = checkpoint_dir(root)
    final = d / f"step-{step:08d}"
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(d)
    prune(root, keep_last)
    return final


def prune(root: str | Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints — never the best one (``best.json``)."""
    best = best_checkpoint(root)
    for _, old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if best is None or old != best[1]:
            shutil.rmtree(old, ignore_errors=True)


def best_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the checkpoint ``train.keep_best`` kept, or None (none recorded, or it is missing)."""
    path = checkpoint_dir(root) / BEST
    if not path.is_file():
        return None
    step = int(json.loads(path.read_text())["step"])
    found = dict(list_checkpoints(root))
    return (step, found[step]) if step in found else None


def mark_best(root: str | Path, step: int, record: dict[str, Any], keep_last: int) -> Path:
    """Record the complete checkpoint of ``step`` as the best (``best.json`` written under a temporary name and
    renamed: a crash leaves the previous record, whose checkpoint is still there), then prune the previous best
    unless it is one of the newest ``keep_last``."""
    d = checkpoint_dir(root)
    final = d / f"step-{step:08d}"
    if not (final / "state.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint {final} to mark as the best")
    tmp = d / f".tmp-{BEST}-{os.getpid()}"
    tmp.write_text(json.dumps({**record, "step": step, "checkpoint": final.name}, indent=2))
    _fsync_file(tmp)
    os.replace(tmp, d / BEST)
    _fsync_dir(d)
    prune(root, keep_last)
    return final


def resolve_checkpoint(root: str | Path, which: str) -> Path:
    """``best`` (``train.keep_best``'s), ``latest`` or ``step-N`` (``N`` with or without leading zeros) of a run
    folder; a clear error naming what the run has when it is not there."""
    found = list_checkpoints(root)
    have = ", ".join(p.name for _, p in found) or "none"
    if which == "latest":
        if not found:
            raise FileNotFoundError(f"{root} has no complete checkpoint (in {checkpoint_dir(root)})")
        return found[-1][1]
    if which == "best":
        best = best_checkpoint(root)
        if best is None:
            raise FileNotFoundError(f"{root} has no best checkpoint (train.keep_best was not set, or no validation "
                                    f"ran yet); its checkpoints: {have}")
        return best[1]
    m = re.fullmatch(r"step-(\d+)", which)
    if m is None:
        raise ValueError(f"--checkpoint must be best, latest or step-N, got {which!r}")
    step = int(m.group(1))
    for s, p in found:
        if s == step:
            return p
    raise FileNotFoundError(f"{root} has no checkpoint of step {step}; its checkpoints: {have}")


def remove_partial(root: str | Path) -> list[Path]:
    """Delete the leftovers of interrupted writes (``.tmp-*``); returns what was removed."""
    d = checkpoint_dir(root)
    removed = [p for p in d.glob(".tmp-*")] if d.is_dir() else []
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:  # a best.json that was being written
            p.unlink(missing_ok=True)
    return removed


def load_checkpoint(path: Path, *, trainable: dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
                    scaler) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the saved state dict (step, counters)."""
    saved_backend = json.loads((path / "state.json").read_text()).get("backend", "none")
    if saved_backend != "none":
        raise ValueError(f"checkpoint {path} was written by a distributed.backend = {saved_backend!r} run (sharded "
                         "optimizer state); resume it with the same backend and world size")
    weights = load_file(path / WEIGHTS)
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                         "(same model, LoRA settings and method as the run that wrote it?)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------------------------- another world size
def saved_world_size(state: dict[str, Any]) -> int:
    """The ranks that wrote a checkpoint (its ``state.json``; one-process checkpoints: 1)."""
    return int(state.get("world_size") or 1)


def keeps_pairs_per_step(saved: tuple[int, int, int], now: tuple[int, int, int]) -> bool:
    """Whether ``(ranks, pairs_per_batch, grad_accum)`` ``now`` trains as many pairs per optimizer step as
    ``saved``: the condition for a resume to continue the same training under another split."""
    return saved[0] * saved[1] * saved[2] == now[0] * now[1] * now[2]


def batch_settings(pairs_per_step: int, world_size: int, pairs_per_batch: int, grad_accum: int
                   ) -> list[tuple[int, int]]:
    """``(pairs_per_batch, grad_accum)`` that give ``pairs_per_step`` on ``world_size`` ranks, the ones closest to
    the current settings first: same pairs per rank and forward pass (same memory) with another accumulation, then
    the same accumulation with other pairs per forward pass. Empty when ``world_size`` does not divide it."""
    if pairs_per_step % world_size:
        return []
    per_rank = pairs_per_step // world_size
    found = []
    if per_rank % pairs_per_batch == 0:
        found.append((pairs_per_batch, per_rank // pairs_per_batch))
    if per_rank % grad_accum == 0 and (per_rank // grad_accum, grad_accum) not in found:
        found.append((per_rank // grad_accum, grad_accum))
    if not found:
        found.append((per_rank, 1))
    return found


def world_size_change_problem(checkpoint: Path, saved: tuple[int, int, int], now: tuple[int, int, int], *,
                              resume: str = "latest") -> str | None:
    """None when a checkpoint written with ``saved = (ranks, pairs_per_batch, grad_accum)`` can continue as
    ``now``: the same pairs per optimizer step, so every pair keeps its stream position and randomness and the
    run continues the same training. Otherwise the message, naming the settings that would keep it."""
    (w0, b0, a0), (w1, b1, a1) = saved, now
    pairs = w0 * b0 * a0
    if keeps_pairs_per_step(saved, now):
        return None
    head = (f"checkpoint {checkpoint} was written by {w0} rank(s) x train.pairs_per_batch = {b0} x train.grad_accum "
            f"= {a0} = {pairs} pairs per optimizer step; this run has {w1} rank(s) x {b1} x {a1} = {w1 * b1 * a1}. ")
    options = batch_settings(pairs, w1, b1, a1)
    if not options:
        divisors = [d for d in range(1, pairs + 1) if pairs % d == 0]
        return head + (f"{pairs} pairs per step cannot be split evenly over {w1} ranks, so this run cannot continue "
                       f"the same training: launch on a number of ranks that divides {pairs} "
                       f"({', '.join(map(str, divisors))}).")
    how = " or ".join(f"`fastinpo train CONFIG --resume {resume} --set train.pairs_per_batch={b} "
                      f"--set train.grad_accum={a}`" for b, a in options)
    same_memory = " (the first keeps the pairs per forward pass, so the memory per rank)" if (
        len(options) > 1 and options[0][0] == b1) else ""
    return head + (f"To continue the same training on {w1} rank(s), keep {pairs} pairs per step: relaunch (under "
                   f"your launcher, e.g. torchrun --nproc_per_node {w1}) with {how}{same_memory}. "
                   "A DeepSpeed checkpoint of another world size is converted once to DeepSpeed's "
                   f"universal format (in {UNIVERSAL}/ inside the checkpoint; the original shards are kept).")


def universal_copy(checkpoint: Path, tag: str) -> Path:
    """``checkpoint/universal``: DeepSpeed's universal conversion of the shards in ``checkpoint/tag`` (any ZeRO
    stage, any number of ranks; fp32 master weights, Adam moments and step per parameter), made once and reused.
    Written under a temporary name, fsynced and renamed (a crash leaves a ``.tmp-universal-*`` folder, removed
    by the next conversion); the original shards are only read. Returns the folder to pass to
    ``engine.load_checkpoint(..., tag=tag)`` with ``checkpoint.load_universal`` set."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    final = checkpoint / UNIVERSAL
    if (final / "latest_universal").is_file():
        return final
    for stale in checkpoint.glob(f".tmp-{UNIVERSAL}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoint / f".tmp-{UNIVERSAL}-{os.getpid()}"
    tmp.mkdir()
    # one worker: the conversion's process pool would fork a process that holds the process group's threads;
    # inject_missing_state: a diffusers UNet records no universal-checkpoint info (no tensor/pipeline parallelism)
    args = argparse.Namespace(input_folder=str(checkpoint / tag), output_folder=str(tmp / tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars and prints
        ds_to_universal.main(args)
    (tmp / "conversion.log").write_text(log.getvalue())
    _fsync_tree(tmp)
    if final.exists():  # an incomplete folder of that name (no latest_universal): not ours to keep
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(checkpoint)
    return final
