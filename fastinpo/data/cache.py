"""The latent / text-embedding cache (`fastinpo cache`): encode a preference dataset once, train many times.

Each distinct caption is encoded once and each distinct image once; a pair holds a caption index and two image
indices. Pick-a-Pic has tens of thousands of captions for a million pairs and its images recur across pairs, so
this is what makes an SDXL cache fit on a disk (docs/DATA.md gives the measured and projected bytes per pair).

Layout of a cache folder (format 2)::

    manifest.json                 what was cached and how; the single source of truth
    empty_caption.safetensors     the encoded "" caption (caption dropout, SPEC §1), embed dtype
    plan/pairs-00000.safetensors  pass 1, per shard of ``shard_size`` dataset pairs: kept pairs' ``index``, ``rows``,
                                  ``row_hash`` (n, 32), ``image_key`` (n, 2, 32) (sha256 of each image's bytes;
                                  with random crop/flip also of the row), ``caption_key`` (n, 32); metadata: the
                                  captions and the rows skipped because an image is missing
    text-00000.safetensors        distinct captions [0, S), in order of first appearance: every named tensor of
                                  the text encoders (``prompt_embeds`` (m, L, D), ``pooled_embeds`` (m, P) for
                                  SDXL...) in the embed dtype (``data.cache_embed_dtype``)
    latents-00000.safetensors     distinct images [0, S), in order of first appearance: ``latent_mean`` and
                                  ``latent_std`` (m, C, h, w) (VAE posterior times ``scaling_factor``: training
                                  still draws a fresh sample each step) in ``data.cache_dtype``, ``time_ids``
                                  (m, 6) float32 (SDXL), ``ok`` (m,) uint8 (0: the image could not be decoded)
    pairs.safetensors             ``caption_index`` (N,), ``image_index`` (N, 2) winner first, ``rows`` (N,),
                                  ``row_hash`` (N, 32) uint8 (:func:`fastinpo.data.pickapic.row_hash`)

The build (:func:`build_cache`) runs in three passes, each split by shard over the processes of a ``torchrun``
launch (shard ``k`` to rank ``k mod W``): the plan (read image bytes and hash them: no model), the encoding of the
distinct images and captions (every rank derives the same global order from the plan files), and the pairs table
with the final manifest (rank 0). Every file is written to a temporary name and moved into place with
``os.replace``, so a build killed at any point resumes with the shards that exist and recomputes none of them; a
shard's content depends only on the data and the settings, never on the number of processes, so a build on N
processes is byte-identical to a one-process build.

Training (:class:`CachedPairDataset`) refuses a cache whose signature differs from what the training config
expects, an incomplete one, or one of the older per-pair format 1, with :class:`StaleCacheError` and the command
that rebuilds it (nothing is ever deleted without ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fastinpo.data.batch import EncodedPair

CACHE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
PAIRS = "pairs.safetensors"
PLAN_DIR = "plan"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SKIP_MISSING_IMAGE = "missing_image"


class StaleCacheError(ValueError):
    """The cache does not match what training expects (or is incomplete / missing / of an older format)."""


# What to do about a cache that does not match the config (every message that refuses one says it).
REBUILD_HINT = ("Rebuild it for this config with `fastinpo cache CONFIG --overwrite` (replaces that cache), or set "
                "data.cache_dir to a new folder and run `fastinpo cache CONFIG`.")
OLD_FORMAT = ("it was written in cache format {found} (one copy of the latents and text embedding per pair) and this "
              "fastinpo reads format " + str(CACHE_FORMAT_VERSION) + " (one copy per distinct image and caption)")


def plan_name(k: int) -> str:
    return f"{PLAN_DIR}/pairs-{k:05d}.safetensors"


def latents_name(k: int) -> str:
    return f"latents-{k:05d}.safetensors"


def text_name(k: int) -> str:
    return f"text-{k:05d}.safetensors"


def _dtype_name(dtype: torch.dtype | str, what: str = "embed dtype") -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


def _jsonable(value: Any) -> Any:
    """Normalise a value the way it comes back from manifest.json (tuples -> lists...) so comparisons are fair."""
    return json.loads(json.dumps(value))


def expected_cache_signature(dataset, encoder, embed_dtype: torch.dtype | str = torch.float16,
                             latent_dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
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
        "latent_dtype": _dtype_name(latent_dtype, "data.cache_dtype"),
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


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Metadata goes in ONE key (``fastinpo``, sorted JSON): safetensors writes several keys in a random order,
    and a shard's bytes must not depend on the process that wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"fastinpo": json.dumps({"format_version": CACHE_FORMAT_VERSION, **metadata}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
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


def _file_ok(cache_dir: Path, entry: dict | None) -> bool:
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


def _cache_files(cache_dir: Path) -> list[Path]:
    """Every file a cache of either format holds (what --overwrite replaces)."""
    names = ["shard-*.safetensors", "latents-*.safetensors", "text-*.safetensors", f"{PLAN_DIR}/*.safetensors"]
    found = [p for pattern in names for p in cache_dir.glob(pattern)]
    return found + [p for p in (cache_dir / EMPTY_CAPTION, cache_dir / PAIRS, cache_dir / MANIFEST) if p.exists()]


def _clear(cache_dir: Path) -> None:
    for p in _cache_files(cache_dir):
        p.unlink()


def _meta(f) -> dict[str, Any]:
    """The metadata :func:`_atomic_save_tensors` wrote, from an open safetensors file."""
    return json.loads((f.metadata() or {}).get("fastinpo", "{}"))


def _key_bytes(data: bytes, row: int | None) -> bytes:
    h = hashlib.sha256(data)
    if row is not None:  # a random crop/flip is drawn per row: the same bytes in two rows are two images
        h.update(f"\x1frow:{row}".encode())
    return h.digest()


def text_tensors(encoder, captions: list[str]) -> dict[str, torch.Tensor]:
    """The text conditioning of ``captions`` as named tensors (float32, CPU), the form the cache stores: an
    encoder may provide ``encode_text_named`` (any names, e.g. a pooled + sequence embedding per text encoder);
    otherwise ``encode_text``'s ``(prompt_embeds, pooled_embeds or None)``."""
    with torch.no_grad():
        named = getattr(encoder, "encode_text_named", None)
        if named is not None:
            out = named(captions)
        else:
            prompt, pooled = encoder.encode_text(captions)
            out = {"prompt_embeds": prompt} if pooled is None else {"prompt_embeds": prompt, "pooled_embeds": pooled}
    return {k: v.detach().float().cpu() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- pass 1: the plan
def _plan_shard(dataset, start: int, stop: int, random_aug: bool, bar) -> tuple[dict, dict]:
    index, rows, row_hashes, image_keys, caption_keys, captions, skipped = [], [], [], [], [], [], {}
    for i in range(start, stop):
        row, caption, win, lose, rh = dataset.read_pair_bytes(i)
        bar.update(1)
        if win is None or lose is None:
            skipped[str(row)] = SKIP_MISSING_IMAGE
            continue
        index.append(i)
        rows.append(row)
        row_hashes.append(bytes.fromhex(rh))
        r = row if random_aug else None
        image_keys.append(_key_bytes(win, r) + _key_bytes(lose, r))
        caption_keys.append(hashlib.sha256(caption.encode()).digest())
        captions.append(caption)

    def u8(parts, *shape):
        return torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy()).reshape(-1, *shape)

    tensors = {"index": torch.tensor(index, dtype=torch.int64).reshape(-1),
               "rows": torch.tensor(rows, dtype=torch.int64).reshape(-1),
               "row_hash": u8(row_hashes, 32), "image_key": u8(image_keys, 2, 32), "caption_key": u8(caption_keys, 32)}
    return tensors, {"captions": captions, "skipped": skipped}


class _Plan:
    """The global order of distinct images and captions, derived from the plan shards alone (so every rank
    computes the same one without talking to the others)."""

    def __init__(self, cache_dir: Path, n_plan: int):
        parts: dict[str, list] = {k: [] for k in ("index", "rows", "row_hash", "image_key", "caption_key")}
        skipped: dict[str, str] = {}
        for k in range(n_plan):
            with safe_open(str(cache_dir / plan_name(k)), framework="pt") as f:
                for key in parts:
                    parts[key].append(f.get_tensor(key))
                skipped.update(_meta(f)["skipped"])
        cat = {k: torch.cat(v).numpy() for k, v in parts.items()}
        self.index, self.rows, self.row_hash = cat["index"], cat["rows"], cat["row_hash"]
        self.missing = skipped
        self.num_pairs = len(self.index)
        n = self.num_pairs
        # distinct images, numbered in order of first appearance (pair order, winner before loser)
        self.image_index, first = _first_appearance(cat["image_key"].reshape(2 * n, 32))
        self.image_index = self.image_index.reshape(n, 2)
        self.image_pair, self.image_side = first // 2, first % 2  # where each distinct image is read from
        self.caption_index, self.caption_first = _first_appearance(cat["caption_key"])
        self._cache_dir, self._n_plan = cache_dir, n_plan

    @property
    def num_images(self) -> int:
        return len(self.image_pair)

    @property
    def num_captions(self) -> int:
        return len(self.caption_first)

    def captions(self, start: int, stop: int) -> list[str]:
        """The text of distinct captions [start, stop) (read back from the plan shards' metadata)."""
        want = self.caption_first[start:stop]
        out: dict[int, str] = {}
        offset = 0
        for k in range(self._n_plan):
            with safe_open(str(self._cache_dir / plan_name(k)), framework="pt") as f:
                caps = _meta(f)["captions"]
            for pos in want[(want >= offset) & (want < offset + len(caps))].tolist():
                out[pos] = caps[pos - offset]
            offset += len(caps)
        return [out[p] for p in want.tolist()]


def _first_appearance(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (n, 32) uint8 -> ``(ids (n,), first (m,))``: ids of equal keys equal, numbered in order of first
    appearance, and the position of each id's first appearance. Sort-based: no dict of all keys."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    void = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids sorted by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()].astype(np.int64), first[order].astype(np.int64)


# ----------------------------------------------------------------------------------------------- pass 2: encoding
def _encode_images(dataset, encoder, plan: _Plan, start: int, stop: int, batch_images: int, store_std: bool,
                   ldtype: torch.dtype, arch: str, bar) -> tuple[dict, dict]:
    means, stds, tids, ok, reasons = [], [], [], [], {}
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    results: dict[int, tuple] = {}

    def flush():
        if pending:
            pixels = torch.stack([p for _, p, _ in pending])
            if len(pending) == 1:
                # A lone image is encoded beside a copy of itself: CPU convolution kernels give other last bits
                # for a batch of one, and training on the fly always encodes pairs (two images at least); the
                # same latents either way is what makes training from the cache equal training on the fly.
                pixels = torch.cat([pixels, pixels])
            with torch.no_grad():
                mean, std = encoder.encode_images(pixels)
            for k, (j, _, t) in enumerate(pending):
                results[j] = (mean[k].detach().float().cpu(), std[k].detach().float().cpu(), t)
            pending.clear()

    for j in range(start, stop):
        got = dataset.read_image(int(plan.index[plan.image_pair[j]]), int(plan.image_side[j]))
        bar.update(1)
        if isinstance(got, str):
            reasons[str(j)] = got
            continue
        pending.append((j, got[0], got[1]))
        if len(pending) == batch_images:
            flush()
    flush()
    if not results:  # every image of the shard undecodable: shapes from nothing, nothing reads them
        shape = (0,)
    else:
        shape = next(iter(results.values()))[0].shape
    for j in range(start, stop):
        m, s, t = results.get(j, (torch.zeros(shape), torch.zeros(shape), torch.zeros(6)))
        means.append(m)
        stds.append(s)
        tids.append(t)
        ok.append(j in results)
    tensors = {"latent_mean": torch.stack(means).to(ldtype), "ok": torch.tensor(ok, dtype=torch.uint8)}
    if store_std:
        tensors["latent_std"] = torch.stack(stds).to(ldtype)
    if arch == "sdxl":
        tensors["time_ids"] = torch.stack(tids).float()
    return tensors, {"undecodable": reasons}


def _encode_captions(encoder, captions: list[str], batch: int, edtype: torch.dtype) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(captions), batch):
        for k, v in text_tensors(encoder, captions[s:s + batch]).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).to(edtype) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------- building
def build_cache(dataset, encoder, cache_dir: str | os.PathLike, *, shard_size: int = 256, batch_size: int = 8,
                store_std: bool = True, embed_dtype: torch.dtype | str = torch.float16,
                cache_dtype: torch.dtype | str = torch.float32, progress: bool = True,
                allow_frozen_augmentation: bool = False, overwrite: bool = False,
                on_shard_done: Callable[[str], None] | None = None, rank: int = 0, world_size: int = 1,
                barrier: Callable[[], None] | None = None) -> dict:
    """Encode every usable pair of ``dataset`` with ``encoder`` into ``cache_dir`` and return the manifest.

    ``shard_size``: pairs per plan shard, images per latents shard, captions per text shard. ``batch_size``: pairs
    per encoder call (``2 * batch_size`` images per VAE call). ``cache_dtype``: dtype of the stored latents;
    ``embed_dtype``: of the stored text embeddings.

    Several processes: every rank calls this with its ``rank``, the ``world_size`` and a ``barrier`` (e.g.
    ``torch.distributed.barrier``); shard ``k`` of each pass is done by rank ``k mod world_size``; rank 0 writes
    the manifest. Resumable: shard files of a previous, interrupted build with the same signature and options are
    kept; a complete matching cache returns at once. A folder holding a cache for *other* settings (or of the older
    format) is an error unless ``overwrite=True`` (which deletes it first). ``on_shard_done(name)`` is called after
    each shard file is committed.

    A random crop or flip is a per-epoch augmentation in the official codes; a cache would freeze one draw, so
    such a dataset is refused unless ``allow_frozen_augmentation=True`` (recorded in the manifest).
    """
    cache_dir = Path(cache_dir)
    sync = barrier if barrier is not None else (lambda: None)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("a build on several processes needs a barrier (e.g. torch.distributed.barrier)")
    frozen = bool(dataset.random_augmentation)
    if frozen and not allow_frozen_augmentation:
        opts = dataset.preprocessing_options()
        raise ValueError(
            f"the dataset uses random augmentation (crop={opts['crop']!r}, random_flip={opts['random_flip']}), "
            "which the official codes redraw every epoch; a cache would freeze one draw per pair. Use center crop "
            "and no flip for caching (data.center_crop = true, data.random_flip = false), or pass "
            "--allow-frozen-augmentation (allow_frozen_augmentation=True) to accept the frozen draw."
        )
    signature = expected_cache_signature(dataset, encoder, embed_dtype, cache_dtype)
    edtype, ldtype = _DTYPES[signature["embed_dtype"]], _DTYPES[signature["latent_dtype"]]
    n_pairs = len(dataset)
    n_plan = math.ceil(n_pairs / shard_size)
    options = {"store_std": bool(store_std), "shard_size": int(shard_size), "batch_size": int(batch_size),
               "frozen_augmentation": frozen}

    # every rank reads the folder and reaches the same verdict (so a refusal stops them all, none waits)
    manifest = _existing_manifest(cache_dir, signature, options, overwrite)
    if manifest is not None and manifest.get("complete") and _complete_files_ok(cache_dir, manifest):
        return manifest
    sync()  # nobody may still be reading what rank 0 is about to replace
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale_tmp in [*cache_dir.glob(".*.tmp-*"), *cache_dir.glob(f"{PLAN_DIR}/.*.tmp-*")]:
            stale_tmp.unlink()  # leftovers of writes killed half-way
        if manifest is None:
            _clear(cache_dir)  # only reached with overwrite=True or a folder holding no cache file
            manifest = {"format": "fastinpo-cache", "format_version": CACHE_FORMAT_VERSION, "signature": signature,
                        "build": options, "scaling_factor": float(encoder.scaling_factor),
                        "num_pairs_in_dataset": n_pairs, "complete": False}
            _write_manifest(cache_dir, manifest)
    sync()
    show = progress and rank == 0

    def commit(name: str, tensors: dict, metadata: dict) -> None:
        _atomic_save_tensors(cache_dir / name, tensors, metadata)
        if on_shard_done is not None:
            on_shard_done(name)

    # pass 1: the plan (image bytes read and hashed, no model)
    mine = [k for k in range(n_plan) if k % world_size == rank and not (cache_dir / plan_name(k)).is_file()]
    with tqdm(total=sum(min(shard_size, n_pairs - k * shard_size) for k in mine), disable=not show, unit="pair",
              desc="fastinpo cache: plan") as bar:
        for k in mine:
            tensors, meta = _plan_shard(dataset, k * shard_size, min((k + 1) * shard_size, n_pairs), frozen, bar)
            commit(plan_name(k), tensors, meta)
    sync()

    # pass 2: distinct images and captions, in the order every rank derives from the plan
    plan = _Plan(cache_dir, n_plan)
    n_img, n_cap = math.ceil(plan.num_images / shard_size), math.ceil(plan.num_captions / shard_size)
    todo_img = [j for j in range(n_img) if j % world_size == rank and not (cache_dir / latents_name(j)).is_file()]
    todo_cap = [j for j in range(n_cap) if j % world_size == rank and not (cache_dir / text_name(j)).is_file()]
    if rank == 0 and not (cache_dir / EMPTY_CAPTION).is_file():
        commit(EMPTY_CAPTION, {k: v[0].to(edtype) for k, v in text_tensors(encoder, [""]).items()}, {})
    with tqdm(total=sum(min(shard_size, plan.num_images - j * shard_size) for j in todo_img), disable=not show,
              unit="image", desc="fastinpo cache: images") as bar:
        for j in todo_img:
            start, stop = j * shard_size, min((j + 1) * shard_size, plan.num_images)
            tensors, meta = _encode_images(dataset, encoder, plan, start, stop, 2 * batch_size, store_std, ldtype,
                                           str(encoder.arch), bar)
            commit(latents_name(j), tensors, meta)
    for j in tqdm(todo_cap, disable=not show, unit="shard", desc="fastinpo cache: captions"):
        start, stop = j * shard_size, min((j + 1) * shard_size, plan.num_captions)
        commit(text_name(j), _encode_captions(encoder, plan.captions(start, stop), 2 * batch_size, edtype), {})
    sync()

    # pass 3: the pairs table and the manifest (rank 0); the others wait for it and read it back
    if rank == 0:
        manifest = _finish(cache_dir, dataset, plan, manifest, n_plan, n_img, n_cap)
    sync()
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete"):
        raise ValueError(f"no pair of {dataset.path} could be encoded (skipped: {manifest.get('skipped')})")
    return manifest


def _existing_manifest(cache_dir: Path, signature: dict, options: dict, overwrite: bool) -> dict | None:
    """The manifest of a build to resume, or None for a fresh one; a folder holding anything else is refused
    unless ``overwrite``."""
    try:
        manifest = read_manifest(cache_dir)
    except StaleCacheError:
        if not overwrite:
            raise
        return None
    if manifest is None:
        leftovers = [p for p in _cache_files(cache_dir) if p.name != MANIFEST] if cache_dir.is_dir() else []
        if leftovers and not overwrite:
            raise StaleCacheError(f"{cache_dir} holds cache files ({leftovers[0].name}...) but no {MANIFEST}: it is "
                                  "not a cache this build can resume. Use another data.cache_dir, or pass "
                                  "--overwrite (overwrite=True in Python) to delete them and rebuild.")
        return None
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        if overwrite:
            return None
        raise StaleCacheError(f"{cache_dir} holds a cache the build cannot extend: "
                              + OLD_FORMAT.format(found=manifest.get("format_version")) + ". " + REBUILD_HINT)
    problems = _diff(manifest.get("signature", {}), signature) + _diff(manifest.get("build", {}), options)
    if problems:
        if overwrite:
            return None
        raise StaleCacheError(
            f"{cache_dir} already holds a cache built with other settings (" + "; ".join(problems) + "). Use "
            "another data.cache_dir, or pass --overwrite (`fastinpo cache CONFIG --overwrite`; overwrite=True in "
            "Python) to delete it and rebuild.")
    return manifest


def _finish(cache_dir: Path, dataset, plan: _Plan, manifest: dict, n_plan: int, n_img: int, n_cap: int) -> dict:
    ok = np.zeros(plan.num_images, dtype=bool)
    undecodable: dict[int, str] = {}
    for j in range(n_img):
        with safe_open(str(cache_dir / latents_name(j)), framework="pt") as f:
            ok[j * manifest["build"]["shard_size"]:][:len(f.get_tensor("ok"))] = f.get_tensor("ok").numpy() > 0
            undecodable.update({int(k): v for k, v in _meta(f)["undecodable"].items()})
    keep = ok[plan.image_index].all(1) if plan.num_pairs else np.zeros(0, bool)
    skipped = Counter(dict(dataset.skipped))
    skipped.update(plan.missing.values())
    for p in np.nonzero(~keep)[0].tolist():  # a pair is skipped for the first of its images that failed
        a, b = plan.image_index[p].tolist()
        skipped[undecodable.get(a) or undecodable.get(b) or "undecodable_image"] += 1
    tensors = {"caption_index": torch.from_numpy(plan.caption_index[keep].copy()),
               "image_index": torch.from_numpy(plan.image_index[keep].copy()).reshape(-1, 2),
               "rows": torch.from_numpy(plan.rows[keep].copy()),
               "row_hash": torch.from_numpy(plan.row_hash[keep].copy()).reshape(-1, 32)}
    _atomic_save_tensors(cache_dir / PAIRS, tensors, {})

    def entry(name):
        return {"file": name, "bytes": (cache_dir / name).stat().st_size}

    files = {"plan": [entry(plan_name(k)) for k in range(n_plan)], "latents": [entry(latents_name(j))
                                                                              for j in range(n_img)],
             "text": [entry(text_name(j)) for j in range(n_cap)], "pairs": [entry(PAIRS)],
             "empty_caption": [entry(EMPTY_CAPTION)]}
    n = int(keep.sum())
    by_part = {k: sum(e["bytes"] for e in v) for k, v in files.items()}
    manifest.update({
        "num_pairs": n, "num_images": plan.num_images, "num_captions": plan.num_captions,
        "shard_size": manifest["build"]["shard_size"], "files": files,
        "skipped": dict(sorted(skipped.items())),
        "rows_digest": hashlib.sha256(tensors["row_hash"].numpy().tobytes()).hexdigest(),
        "bytes": by_part, "bytes_total": sum(by_part.values()),
        "bytes_per_pair": round(sum(by_part.values()) / n, 1) if n else None,
        "complete": n > 0,
    })
    _write_manifest(cache_dir, manifest)
    return manifest


def _complete_files_ok(cache_dir: Path, manifest: dict) -> bool:
    return all(_file_ok(cache_dir, e) for group in manifest.get("files", {}).values() for e in group)


# ----------------------------------------------------------------------------------------------- reading
def _problems(cache_dir: Path, manifest: dict | None, expect: dict) -> list[str]:
    if manifest is None:
        return [f"no cache at {cache_dir} ({MANIFEST} missing)"]
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return [f"format_version: cached {manifest.get('format_version')!r}, expected {CACHE_FORMAT_VERSION}: "
                + OLD_FORMAT.format(found=manifest.get("format_version"))]
    out = _diff(manifest.get("signature", {}), expect)
    if not manifest.get("complete"):
        out.append("incomplete: the build was interrupted (or found no encodable pair)")
    else:
        bad = [e["file"] for group in manifest["files"].values() for e in group if not _file_ok(cache_dir, e)]
        if bad:
            out.append(f"missing or truncated files: {bad[:5]}{'...' if len(bad) > 5 else ''}")
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
    """The pairs of a complete cache as :class:`fastinpo.data.batch.EncodedPair` (latents and embeddings back in
    float32).

    ``expect`` is what the training config implies (:func:`expected_cache_signature`, or a subset of its keys);
    any mismatch, an incomplete cache or one of an older format raises :class:`StaleCacheError` naming each key.
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
        self._shard = int(manifest["shard_size"])
        with safe_open(str(self.cache_dir / PAIRS), framework="pt") as f:  # N × 64 bytes: kept in memory
            self._caption_index = f.get_tensor("caption_index")
            self._image_index = f.get_tensor("image_index")
            self._rows = f.get_tensor("rows")
        self._handles: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles are per process (DataLoader workers reopen them)
        return state

    def __len__(self) -> int:
        return len(self._rows)

    def _handle(self, name: str):
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return h

    def _latents(self, image: int) -> dict[str, torch.Tensor]:
        h = self._handle(latents_name(image // self._shard))
        j = image % self._shard
        return {k: h.get_slice(k)[j:j + 1][0] for k in h.keys() if k != "ok"}

    def text(self, caption: int) -> dict[str, torch.Tensor]:
        """Every named tensor stored for distinct caption ``caption`` (float32)."""
        h = self._handle(text_name(caption // self._shard))
        j = caption % self._shard
        return {k: h.get_slice(k)[j:j + 1][0].float() for k in h.keys()}

    def __getitem__(self, i: int) -> EncodedPair:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pair index {i} out of range for {n} cached pairs")
        a, b = (self._latents(int(x)) for x in self._image_index[i])
        text = self.text(int(self._caption_index[i]))
        return EncodedPair(
            latent_mean=torch.stack([a["latent_mean"], b["latent_mean"]]).float(),
            latent_std=torch.stack([a["latent_std"], b["latent_std"]]).float() if self.has_std else None,
            prompt_embeds=text["prompt_embeds"],
            pooled_embeds=text.get("pooled_embeds"),
            time_ids=torch.stack([a["time_ids"], b["time_ids"]]) if self.arch == "sdxl" else None,
            row=int(self._rows[i]),
        )

    def empty_caption(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoded "" caption: ``prompt_embeds`` ``(L, D)`` and ``pooled`` ``(P,)`` (SDXL) or None, float32."""
        with safe_open(str(self.cache_dir / EMPTY_CAPTION), framework="pt") as f:
            prompt = f.get_tensor("prompt_embeds").float()
            pooled = f.get_tensor("pooled_embeds").float() if "pooled_embeds" in f.keys() else None
        return prompt, pooled

    def rows(self) -> torch.Tensor:
        """Source row index of every cached pair, in order (int64)."""
        return self._rows.clone()

    def row_hashes(self) -> list[str]:
        """sha256 (hex) of every cached pair's source row, in order (see :func:`fastinpo.data.pickapic.row_hash`)."""
        with safe_open(str(self.cache_dir / PAIRS), framework="pt") as f:
            return [bytes(r.tolist()).hex() for r in f.get_tensor("row_hash")]


__all__ = ["build_cache", "CachedPairDataset", "StaleCacheError", "cache_matches", "expected_cache_signature",
           "read_manifest", "text_tensors", "CACHE_FORMAT_VERSION"]
