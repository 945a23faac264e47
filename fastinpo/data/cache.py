"""The latent / text-embedding cache (`fastinpo cache`): encode a preference dataset once, train many times.

Layout of a cache folder::

    manifest.json                 what was cached and how (see below); the single source of truth
    empty_caption.safetensors     the encoded "" caption (caption dropout, SPEC §1): prompt_embeds (L, D),
                                  pooled_embeds (P,) for SDXL, in the embed dtype
    shard-00000.safetensors       pairs [0, S) of the dataset, then [S, 2S), ...

A shard holds, for its n usable pairs (winner first along dim 1):
``latent_mean`` / ``latent_std`` ``(n, 2, C, h, w)`` float32 (VAE posterior mean and std times
``scaling_factor``: training still draws a fresh sample each step, SPEC §1), ``prompt_embeds`` ``(n, L, D)`` and
``pooled_embeds`` ``(n, P)`` in the embed dtype, ``time_ids`` ``(n, 2, 6)`` float32 (SDXL), ``rows`` ``(n,)``
int64 (source row indices) and ``row_hash`` ``(n, 32)`` uint8 (sha256 of each source row's caption, image bytes
and labels, :func:`fastinpo.data.pickapic.row_hash`).

``manifest.json`` records the cache signature (:func:`expected_cache_signature`: model identity, arch,
preprocessing options, embed dtype, a fingerprint of the source data), the build options, and one entry per
completed shard (its pair range, source rows range, count, rows skipped because an image turned out
undecodable, a digest of its row hashes). The per-row hashes live in the shards rather than in the manifest
because the manifest is rewritten after every shard: with a million rows a manifest holding 64-character hashes
would be rewritten as ~70 MB thousands of times.

Every file is written to a temporary name and moved into place with ``os.replace``, and a shard is entered in
the manifest only after its file is complete, so an interrupted build resumes at the first missing shard and
recomputes nothing already done. Training (:class:`CachedPairDataset`) refuses a cache whose signature differs
from what the training config expects, or an incomplete one, with :class:`StaleCacheError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fastinpo.data.batch import EncodedPair, collate_raw

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StaleCacheError(ValueError):
    """The cache does not match what training expects (or is incomplete / missing)."""


# What to do about a cache that does not match the config (every message that refuses one says it).
REBUILD_HINT = ("Rebuild it for this config with `fastinpo cache CONFIG --overwrite` (replaces that cache), or set "
                "data.cache_dir to a new folder and run `fastinpo cache CONFIG`.")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"embed dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


def _jsonable(value: Any) -> Any:
    """Normalise a value the way it comes back from manifest.json (tuples -> lists...) so comparisons are fair."""
    return json.loads(json.dumps(value))


def expected_cache_signature(dataset, encoder, embed_dtype: torch.dtype | str = torch.float16) -> dict[str, Any]:
    """Everything a cached pair depends on. ``build_cache`` writes it and the trainer compares it with the
    manifest: one function so the two cannot drift.

    ``dataset`` is a :class:`fastinpo.data.pickapic.PickAPicDataset` (its preprocessing options and a fingerprint of the
    source files and of the caption/label columns it indexed); ``encoder`` anything with ``identity`` and ``arch``:
    a :class:`fastinpo.models.sd.Encoder`, or, to check a cache without loading the models, e.g.
    ``SimpleNamespace(identity=models.model_identity(folder), arch=models.detect_arch(folder))``. (The VAE's
    ``scaling_factor`` is covered by the identity, which hashes the VAE config.)"""
    sig = {
        "format_version": CACHE_FORMAT_VERSION,
        "model_identity": str(encoder.identity),
        "arch": str(encoder.arch),
        **dataset.preprocessing_options(),
        "embed_dtype": _dtype_name(embed_dtype),
        "source_files": dataset.source_fingerprint(),
        "num_candidate_rows": int(dataset.num_candidate_rows),
        "index_digest": str(dataset.index_digest),
    }
    return _jsonable(sig)


# ----------------------------------------------------------------------------------------------- io helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    _atomic_write_bytes(cache_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(cache_dir: str | os.PathLike) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StaleCacheError(f"{path} is not valid JSON ({err}); rebuild it with `fastinpo cache CONFIG "
                              "--overwrite`") from err


def _shard_ok(cache_dir: Path, entry: dict | None) -> bool:
    if not entry:
        return False
    path = cache_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"]


def _diff(cached: dict, expected: dict) -> list[str]:
    """One line per key of ``expected`` whose cached value differs."""
    cached, expected = _jsonable(cached), _jsonable(expected)
    out = []
    for key, want in expected.items():
        have = cached.get(key, "<absent>")
        if have != want:
            out.append(f"{key}: cached {_short(have)}, expected {_short(want)}")
    return out


def _short(v: Any, limit: int = 160) -> str:
    s = json.dumps(v)
    return s if len(s) <= limit else s[:limit] + "..."


# ----------------------------------------------------------------------------------------------- building
def _encode_batch(encoder, pairs: list) -> dict[str, torch.Tensor]:
    """Pairs -> per-pair tensors (winner first along dim 1), float32 on CPU."""
    raw = collate_raw(pairs)
    b = len(pairs)
    with torch.no_grad():
        mean, std = encoder.encode_images(raw.pixels)
        prompt, pooled = encoder.encode_text(raw.captions)

    def per_pair(x):  # (2B, ...) winners first, then losers -> (B, 2, ...)
        x = x.detach().float().cpu()
        return torch.stack([x[:b], x[b:]], 1)

    out = {"latent_mean": per_pair(mean), "latent_std": per_pair(std),
           "prompt_embeds": prompt.detach().float().cpu()}
    if pooled is not None:
        out["pooled_embeds"] = pooled.detach().float().cpu()
    return out


def _encode_range(dataset, encoder, start: int, stop: int, batch_size: int, bar):
    """Encode pairs ``[start, stop)`` of ``dataset`` in batches; rows with undecodable images are reported in
    ``skipped`` (``{row: reason}``) and NOT substituted (as ``__getitem__`` does): a cache holds each usable row
    at most once."""
    parts: dict[str, list[torch.Tensor]] = {}
    rows, hashes, time_ids, skipped = [], [], [], {}
    pending: list = []

    def flush():
        if pending:
            for key, val in _encode_batch(encoder, pending).items():
                parts.setdefault(key, []).append(val)
            time_ids.extend(p.time_ids for p in pending)
            pending.clear()

    for i in range(start, stop):
        rec = dataset.read_pair(i)
        if rec.pair is None:
            skipped[str(rec.row)] = rec.skip_reason
        else:
            rows.append(rec.row)
            hashes.append(bytes.fromhex(rec.row_hash))
            pending.append(rec.pair)
            if len(pending) == batch_size:
                flush()
        bar.update(1)
    flush()
    return parts, rows, hashes, time_ids, skipped


def build_cache(dataset, encoder, cache_dir: str | os.PathLike, *, shard_size: int = 256, batch_size: int = 8,
                store_std: bool = True, embed_dtype: torch.dtype | str = torch.float16, progress: bool = True,
                allow_frozen_augmentation: bool = False, overwrite: bool = False,
                on_shard_done: Callable[[int], None] | None = None) -> dict:
    """Encode every usable pair of ``dataset`` with ``encoder`` into ``cache_dir`` and return the manifest.

    Resumable: completed shards of a previous, interrupted build with the same signature and options are kept;
    a complete matching cache returns at once. A folder holding a cache for *other* settings is an error unless
    ``overwrite=True`` (which deletes it first). ``on_shard_done(k)`` is called after shard ``k`` is committed.

    A random crop or flip is a per-epoch augmentation in the official codes; a cache would freeze one draw, so
    such a dataset is refused unless ``allow_frozen_augmentation=True`` (recorded in the manifest).
    """
    cache_dir = Path(cache_dir)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    frozen = bool(dataset.random_augmentation)
    if frozen and not allow_frozen_augmentation:
        opts = dataset.preprocessing_options()
        raise ValueError(
            f"the dataset uses random augmentation (crop={opts['crop']!r}, random_flip={opts['random_flip']}), "
            "which the official codes redraw every epoch; a cache would freeze one draw per pair. Use center crop "
            "and no flip for caching (data.center_crop = true, data.random_flip = false), or pass "
            "--allow-frozen-augmentation (allow_frozen_augmentation=True) to accept the frozen draw."
        )
    signature = expected_cache_signature(dataset, encoder, embed_dtype)
    edtype = _DTYPES[signature["embed_dtype"]]
    n_pairs = len(dataset)
    n_shards = math.ceil(n_pairs / shard_size)
    options = {"store_std": bool(store_std), "shard_size": int(shard_size), "frozen_augmentation": frozen}

    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale_tmp in cache_dir.glob(".*.tmp-*"):  # leftovers of a write killed half-way
        stale_tmp.unlink()
    try:
        manifest = read_manifest(cache_dir)
    except StaleCacheError:
        if not overwrite:
            raise
        _clear(cache_dir)  # an unreadable manifest, replaced on request
        manifest = None
    if manifest is not None:
        problems = _diff(manifest.get("signature", {}), signature) + _diff(manifest.get("build", {}), options)
        if problems:
            if not overwrite:
                raise StaleCacheError(
                    f"{cache_dir} already holds a cache built with other settings ("
                    + "; ".join(problems) + "). Use another data.cache_dir, or pass --overwrite (`fastinpo cache "
                    "CONFIG --overwrite`; overwrite=True in Python) to delete it and rebuild.")
            _clear(cache_dir)
            manifest = None
    if manifest is None:
        manifest = {
            "format": "fastinpo-cache",
            "format_version": CACHE_FORMAT_VERSION,
            "signature": signature,
            "build": options,
            "scaling_factor": float(encoder.scaling_factor),
            "num_pairs_in_dataset": n_pairs,
            "num_shards": n_shards,
            "dataset_skipped": dict(dataset.skipped),
            "empty_caption": None,
            "shards": [None] * n_shards,
            "complete": False,
        }
    if manifest.get("complete") and all(_shard_ok(cache_dir, e) for e in manifest["shards"]) \
            and (cache_dir / EMPTY_CAPTION).is_file():
        return manifest
    manifest["complete"] = False

    if not (cache_dir / EMPTY_CAPTION).is_file() or not manifest.get("empty_caption"):
        with torch.no_grad():
            prompt, pooled = encoder.encode_text([""])
        tensors = {"prompt_embeds": prompt[0].detach().cpu().to(edtype)}
        if pooled is not None:
            tensors["pooled_embeds"] = pooled[0].detach().cpu().to(edtype)
        _atomic_save_tensors(cache_dir / EMPTY_CAPTION, tensors, {"format_version": str(CACHE_FORMAT_VERSION)})
        manifest["empty_caption"] = {"file": EMPTY_CAPTION,
                                     "shapes": {k: list(v.shape) for k, v in tensors.items()}}
    _write_manifest(cache_dir, manifest)

    done = sum(e["pairs"][1] - e["pairs"][0] for e in manifest["shards"] if _shard_ok(cache_dir, e))
    bar = tqdm(total=n_pairs, initial=done, disable=not progress, unit="pair", desc="fastinpo cache")
    try:
        for k in range(n_shards):
            if _shard_ok(cache_dir, manifest["shards"][k]):
                continue
            start, stop = k * shard_size, min((k + 1) * shard_size, n_pairs)
            parts, rows, hashes, time_ids, skipped = _encode_range(dataset, encoder, start, stop, batch_size, bar)
            tensors = _shard_tensors(parts, rows, hashes, time_ids, encoder.arch, store_std, edtype)
            path = cache_dir / shard_name(k)
            _atomic_save_tensors(path, tensors, {"format_version": str(CACHE_FORMAT_VERSION), "shard": str(k)})
            manifest["shards"][k] = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "pairs": [start, stop],
                "count": len(rows),
                "source_rows": [rows[0], rows[-1]] if rows else None,
                "skipped": skipped,
                "hashes_digest": hashlib.sha256(b"".join(hashes)).hexdigest(),
            }
            _write_manifest(cache_dir, manifest)
            if on_shard_done is not None:
                on_shard_done(k)
    finally:
        bar.close()

    late: dict[str, int] = {}
    for e in manifest["shards"]:
        for reason in e["skipped"].values():
            late[reason] = late.get(reason, 0) + 1
    total = dict(manifest["dataset_skipped"])
    for reason, c in late.items():
        total[reason] = total.get(reason, 0) + c
    manifest["num_pairs"] = sum(e["count"] for e in manifest["shards"])
    manifest["skipped"] = dict(sorted(total.items()))
    if manifest["num_pairs"] == 0:
        _write_manifest(cache_dir, manifest)
        raise ValueError(f"no pair of {dataset.path} could be encoded (skipped: {manifest['skipped']})")
    manifest["rows_digest"] = hashlib.sha256(
        "".join(e["hashes_digest"] for e in manifest["shards"]).encode()).hexdigest()
    manifest["complete"] = True
    _write_manifest(cache_dir, manifest)
    return manifest


def _shard_tensors(parts, rows, hashes, time_ids, arch, store_std, edtype) -> dict[str, torch.Tensor]:
    if rows:
        cat = {k: torch.cat(v) for k, v in parts.items()}
    else:  # a shard whose rows were all undecodable: empty tensors (shapes unknown, nothing reads them)
        cat = {"latent_mean": torch.zeros(0), "latent_std": torch.zeros(0), "prompt_embeds": torch.zeros(0)}
        if arch == "sdxl":
            cat["pooled_embeds"] = torch.zeros(0)
    out = {"latent_mean": cat["latent_mean"], "prompt_embeds": cat["prompt_embeds"].to(edtype),
           "rows": torch.tensor(rows, dtype=torch.int64),
           "row_hash": torch.from_numpy(np.frombuffer(b"".join(hashes), dtype=np.uint8).copy()).reshape(-1, 32)}
    if store_std:
        out["latent_std"] = cat["latent_std"]
    if "pooled_embeds" in cat:
        out["pooled_embeds"] = cat["pooled_embeds"].to(edtype)
    if arch == "sdxl":
        out["time_ids"] = torch.stack(time_ids) if time_ids else torch.zeros(0, 2, 6)
    return out


def _clear(cache_dir: Path) -> None:
    for p in [*cache_dir.glob("shard-*.safetensors"), cache_dir / EMPTY_CAPTION, cache_dir / MANIFEST]:
        if p.exists():
            p.unlink()


# ----------------------------------------------------------------------------------------------- reading
def _problems(cache_dir: Path, manifest: dict | None, expect: dict) -> list[str]:
    if manifest is None:
        return [f"no cache at {cache_dir} ({MANIFEST} missing)"]
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return [f"format_version: cached {manifest.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}"]
    out = _diff(manifest.get("signature", {}), expect)
    if not manifest.get("complete"):
        done = sum(1 for e in manifest.get("shards", []) if _shard_ok(cache_dir, e))
        out.append(f"incomplete: {done} of {manifest.get('num_shards')} shards written (the build was interrupted)")
    else:
        bad = [e["file"] for e in manifest["shards"] if not _shard_ok(cache_dir, e)]
        if bad:
            out.append(f"missing or truncated shard files: {bad[:5]}{'...' if len(bad) > 5 else ''}")
        if not (cache_dir / EMPTY_CAPTION).is_file():
            out.append(f"{EMPTY_CAPTION} missing")
    return out


def what_to_do(cache_dir: str | os.PathLike, expect: dict) -> str:
    """The command that fixes a cache refused for ``expect``: build a missing one, finish an interrupted one (the
    build resumes), or replace one made for other settings (a plain re-run would refuse that folder)."""
    try:
        manifest = read_manifest(cache_dir)
    except StaleCacheError:
        return REBUILD_HINT
    if manifest is None:
        return "Build it with `fastinpo cache CONFIG`."
    if manifest.get("format_version") != CACHE_FORMAT_VERSION or _diff(manifest.get("signature", {}), expect):
        return REBUILD_HINT
    return "Finish it with `fastinpo cache CONFIG`: the build resumes where it stopped and redoes missing shards."


def cache_matches(cache_dir: str | os.PathLike, expect: dict) -> tuple[bool, list[str]]:
    """``(True, [])`` when ``cache_dir`` holds a complete cache whose signature matches ``expect`` (typically
    :func:`expected_cache_signature` of the training config), else ``(False, reasons)``."""
    cache_dir = Path(cache_dir)
    try:
        reasons = _problems(cache_dir, read_manifest(cache_dir), expect)
    except StaleCacheError as err:
        reasons = [str(err)]
    return not reasons, reasons


class CachedPairDataset(torch.utils.data.Dataset):
    """The pairs of a complete cache as :class:`fastinpo.data.batch.EncodedPair` (embeddings back in float32).

    ``expect`` is what the training config implies (:func:`expected_cache_signature`, or a subset of its keys);
    any mismatch or an incomplete cache raises :class:`StaleCacheError` naming each key.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, expect: dict):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        problems = _problems(self.cache_dir, manifest, expect)
        if problems:
            raise StaleCacheError(
                f"the cache at {self.cache_dir} does not match the training config:\n  - " + "\n  - ".join(problems)
                + "\n" + what_to_do(self.cache_dir, expect))
        self.manifest = manifest
        self.signature = manifest["signature"]
        self.arch = self.signature["arch"]
        self.has_std = bool(manifest["build"]["store_std"])
        self.frozen_augmentation = bool(manifest["build"]["frozen_augmentation"])
        self.skipped: dict[str, int] = dict(manifest.get("skipped", {}))
        self._files = [e["file"] for e in manifest["shards"] if e["count"] > 0]
        counts = [e["count"] for e in manifest["shards"] if e["count"] > 0]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._handles: dict[int, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles are per process (DataLoader workers reopen them)
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _handle(self, k: int):
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.cache_dir / self._files[k]), framework="pt")
        return h

    def __getitem__(self, i: int) -> EncodedPair:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pair index {i} out of range for {n} cached pairs")
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        j = i - int(self._offsets[k])
        h = self._handle(k)
        keys = set(h.keys())

        def get(name):
            return h.get_slice(name)[j:j + 1][0] if name in keys else None

        pooled = get("pooled_embeds")
        return EncodedPair(
            latent_mean=get("latent_mean"),
            latent_std=get("latent_std"),
            prompt_embeds=get("prompt_embeds").float(),
            pooled_embeds=None if pooled is None else pooled.float(),
            time_ids=get("time_ids") if self.arch == "sdxl" else None,
            row=int(get("rows")),
        )

    def empty_caption(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoded "" caption: ``prompt_embeds`` ``(L, D)`` and ``pooled`` ``(P,)`` (SDXL) or None, float32."""
        with safe_open(str(self.cache_dir / EMPTY_CAPTION), framework="pt") as f:
            prompt = f.get_tensor("prompt_embeds").float()
            pooled = f.get_tensor("pooled_embeds").float() if "pooled_embeds" in f.keys() else None
        return prompt, pooled

    def rows(self) -> torch.Tensor:
        """Source row index of every cached pair, in order (int64)."""
        return torch.cat([self._handle(k).get_tensor("rows") for k in range(len(self._files))])

    def row_hashes(self) -> list[str]:
        """sha256 (hex) of every cached pair's source row, in order (see :func:`fastinpo.data.pickapic.row_hash`)."""
        out = []
        for k in range(len(self._files)):
            out += [bytes(r.tolist()).hex() for r in self._handle(k).get_tensor("row_hash")]
        return out


__all__ = ["build_cache", "CachedPairDataset", "StaleCacheError", "cache_matches", "expected_cache_signature",
           "read_manifest", "CACHE_FORMAT_VERSION"]
