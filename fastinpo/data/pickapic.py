"""Preference pairs (SPEC §1): reading, filtering, preprocessing — one dataset for every source kind.

:class:`PickAPicDataset` reads a local directory of parquet files (the format Pick-a-Pic v2 is published in) or a
``datasets`` ``save_to_disk`` folder, with the columns ``caption`` (str), ``jpg_0``/``jpg_1`` (encoded image
bytes) and ``label_0``/``label_1`` (float, 1 = preferred), and yields :class:`fastinpo.data.batch.RawPair` records
(winner first). Pair manifests (JSONL, CSV, parquet of image paths) and ``w/``/``l/`` folders are read by
:mod:`fastinpo.data.sources`, which presents their rows in this same shape, so every rule below holds for every
kind (docs/DATA.md).

Row semantics (SPEC §1):

- ``label_0 == 1``: image 0 wins; ``label_0 == 0``: image 1 wins (the pair is swapped);
- ``label_0 == 0.5``: a tie, dropped by default (all official codes drop ties); ``keep_ties=True``
  (``data.keep_ties``) keeps it with image 0 as the winner (the diffusers example's behaviour);
- anything else (NaN, null, 0.3, ``label_0 + label_1 != 1``): the row is unusable;
- an empty, blank or null caption is a legitimate prompt (it is what caption dropout feeds): the row is kept and
  trained with the caption ``""``, unless ``keep_empty_captions=False`` (``data.keep_empty_captions``) skips it;
  a caption that is not text (a number...) is an error naming the row.

Unusable rows are skipped and counted by reason in ``dataset.skipped`` (never mislabeled). The index of usable
rows is built at construction from the caption and label columns only: the image columns of a real Pick-a-Pic
copy are hundreds of GB, so images are decoded in ``__getitem__`` (or checked at construction with
``verify_images=True``, which reads every image header).

An image found undecodable in ``__getitem__`` (``verify_images=False``, or a file that passes PIL's cheap
``verify()`` but fails to decode) must not crash a training run hours in: ``__getitem__`` deterministically
substitutes the next usable row (``i+1``, ``i+2``, ... wrapping around) and counts the bad row once under
``skipped["undecodable_image"]``. The substitute carries its own ``row`` and its own correct label, so nothing
is mislabeled; the substitution depends only on ``i`` and the data, so runs stay reproducible. The cache builder
does not substitute: it calls :meth:`PickAPicDataset.read_pair`, which reports the bad row instead.

Preprocessing (PIL + torch, no torchvision): resize the shorter side to R (bilinear, PIL antialiases when
downsampling), center crop or random crop, optional joint horizontal flip (both images of a pair together, so
the pair still shows the same composition), to float32 CHW in [-1, 1]. Random decisions come from a
``torch.Generator`` seeded by ``(seed, epoch, row)``: reproducible per row, different per epoch when the trainer
calls :meth:`PickAPicDataset.set_epoch`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from fastinpo.data.batch import RawPair
from fastinpo.data.sources import FolderSource, ManifestSource, is_pair_folder, is_pair_manifest

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
# label_1 is read when present (Pick-a-Pic has it) to catch rows whose two labels contradict each other.
OPTIONAL_COLUMNS = ("label_1",)
META_COLUMNS = ("caption", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")

# Reasons a row is skipped (keys of ``dataset.skipped``).
SKIP_TIE = "tie"
SKIP_BAD_LABEL = "bad_label"
SKIP_MISSING_LABEL = "missing_label"
SKIP_INCONSISTENT_LABELS = "inconsistent_labels"
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_UNDECODABLE = "undecodable_image"
SKIP_MISSING_IMAGE = "missing_image"

# Row groups kept decoded-from-parquet per process. Random access into a parquet file reads a whole row group
# (Pick-a-Pic's hold ~100 pairs), so a sequential pass (the cache builder) reads each one once; a shuffled
# on-the-fly pass pays one row group per item -- use `fastinpo cache` for real runs.
_ROW_GROUP_CACHE = 2


# ----------------------------------------------------------------------------------------------- sources
class _Source:
    """Row access to the underlying data. ``num_rows``, ``describe()`` (a JSON fingerprint of the files),
    ``iter_meta()`` (tables with the META columns present, in row order) and ``read(row)`` (a dict)."""

    num_rows: int
    columns: list[str]

    def describe(self) -> list[list[Any]]:
        raise NotImplementedError

    def iter_meta(self) -> Iterable[pa.Table]:
        raise NotImplementedError

    def read(self, row: int) -> dict[str, Any]:
        raise NotImplementedError


class _ParquetSource(_Source):
    def __init__(self, root: Path, files: list[Path]):
        self.root = root
        self.files = files
        self._offsets = [0]  # global row index of each file's first row
        self._rg_offsets: list[list[int]] = []  # per file: local row index of each row group's first row
        columns = None
        for f in files:
            try:
                meta = pq.ParquetFile(f).metadata
                schema = pq.read_schema(f)
            except Exception as err:  # noqa: BLE001 - any unreadable file is a clear, early error
                raise ValueError(f"cannot read parquet file {f}: {err}") from err
            names = list(schema.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise ValueError(
                    f"parquet file {f} lacks the required Pick-a-Pic column(s) {missing}; expected "
                    f"{list(REQUIRED_COLUMNS)} (+ optional {list(OPTIONAL_COLUMNS)}), found columns {names}"
                )
            columns = names if columns is None else [c for c in columns if c in names]
            rg = [0]
            for i in range(meta.num_row_groups):
                rg.append(rg[-1] + meta.row_group(i).num_rows)
            self._rg_offsets.append(rg)
            self._offsets.append(self._offsets[-1] + meta.num_rows)
        self.columns = columns or []
        self.num_rows = self._offsets[-1]
        self._handles: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __getstate__(self):
        # Open file handles and decoded row groups stay in their process (DataLoader workers reopen lazily).
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_groups"] = OrderedDict()
        return state

    def describe(self):
        return [[str(f.relative_to(self.root)) if f != self.root else f.name, f.stat().st_size,
                 self._offsets[i + 1] - self._offsets[i]] for i, f in enumerate(self.files)]

    def iter_meta(self):
        cols = [c for c in META_COLUMNS if c in self.columns]
        for f in self.files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=65536, columns=cols):
                yield pa.Table.from_batches([batch])

    def read(self, row: int) -> dict[str, Any]:
        fi = int(np.searchsorted(self._offsets, row, side="right")) - 1
        local = row - self._offsets[fi]
        rgs = self._rg_offsets[fi]
        gi = int(np.searchsorted(rgs, local, side="right")) - 1
        key = (fi, gi)
        table = self._groups.get(key)
        if table is None:
            handle = self._handles.get(fi)
            if handle is None:
                handle = self._handles[fi] = pq.ParquetFile(self.files[fi])
            cols = [c for c in (*META_COLUMNS, *IMAGE_COLUMNS) if c in self.columns]
            table = handle.read_row_group(gi, columns=cols)
            self._groups[key] = table
            while len(self._groups) > _ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        r = local - rgs[gi]
        return {c: table.column(c)[r].as_py() for c in table.column_names}


class _DiskSource(_Source):
    """A ``datasets.Dataset.save_to_disk`` folder, read memory-mapped through ``datasets.load_from_disk``."""

    def __init__(self, root: Path):
        import datasets  # imported here: slow to import and only needed for this input kind

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{root} is a datasets DatasetDict with splits {list(ds.keys())}; point the data path "
                             f"at one split's folder, e.g. {root / next(iter(ds.keys()), 'train')}")
        self.root = root
        self.columns = list(ds.column_names)
        missing = [c for c in REQUIRED_COLUMNS if c not in self.columns]
        if missing:
            raise ValueError(
                f"datasets folder {root} lacks the required Pick-a-Pic column(s) {missing}; expected "
                f"{list(REQUIRED_COLUMNS)} (+ optional {list(OPTIONAL_COLUMNS)}), found columns {self.columns}"
            )
        self.num_rows = ds.num_rows
        # The arrow format hands out zero-copy slices of the memory-mapped files; image columns stored with the
        # datasets Image feature come back as {bytes, path} structs, plain binary columns as bytes.
        self._ds = ds.with_format("arrow")

    def describe(self):
        files = sorted(p for p in self.root.iterdir() if p.suffix == ".arrow")
        return [[p.name, p.stat().st_size, None] for p in files] + [["num_rows", None, self.num_rows]]

    def iter_meta(self):
        cols = [c for c in META_COLUMNS if c in self.columns]
        sub = self._ds.select_columns(cols)
        step = 65536
        for start in range(0, self.num_rows, step):
            yield sub[start:start + step]

    def read(self, row: int) -> dict[str, Any]:
        table = self._ds[row]
        return {c: table.column(c)[0].as_py() for c in table.column_names
                if c in (*META_COLUMNS, *IMAGE_COLUMNS)}


DATA_KINDS = ("a directory of Pick-a-Pic parquet files, one .parquet file, a datasets save_to_disk folder, a pair "
              "manifest (.jsonl, .csv or .parquet with caption + image_0/image_1/label_0 or chosen/rejected), or a "
              "folder of w/ and l/ images")


def _open_source(path: Path) -> _Source:
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist (expected {DATA_KINDS})")
    if path.is_file():
        if is_pair_manifest(path):
            return ManifestSource(path)
        if path.suffix == ".parquet":
            return _ParquetSource(path.parent, [path])
        raise ValueError(f"data path {path} is a file but neither a .parquet file nor a pair manifest (.jsonl, .csv); "
                         f"expected {DATA_KINDS}")
    if is_pair_folder(path):
        return FolderSource(path)
    entries = sorted(os.listdir(path))
    if "dataset_dict.json" in entries or ("state.json" in entries and "dataset_info.json" in entries):
        return _DiskSource(path)
    parquet = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".parquet")
    if parquet:
        return _ParquetSource(path, parquet)
    nested = sorted(str(p.relative_to(path)) for p in path.rglob("*.parquet"))[:5]
    hint = f"; parquet files in subfolders (point the path at one of them, e.g. one split): {nested}" if nested else ""
    shown = entries[:20] + (["..."] if len(entries) > 20 else [])
    raise ValueError(
        f"data path {path} is neither a directory of .parquet files (Pick-a-Pic format), a datasets save_to_disk "
        f"folder (state.json + dataset_info.json + *.arrow) nor a pair folder (w/ and l/); found "
        f"{shown or 'an empty directory'}{hint}"
    )


# ----------------------------------------------------------------------------------------------- helpers
def _image_bytes(value: Any) -> bytes | None:
    """Column value -> encoded bytes: plain binary, or the datasets Image feature's {bytes, path} struct."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError:
                return None
    return None


def _decode(data: bytes | None) -> Image.Image | None:
    """Fully decode to RGB, or None. Any PIL/decoder failure (truncated file, garbage, decompression bomb) counts
    as undecodable: the row is then skipped, not the run crashed."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None


def _verify(data: bytes | None) -> bool:
    """Cheap check (header + structure, no pixel decode) used by ``verify_images=True``."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001
        return False


def _row_seed(seed: int, epoch: int, row: int) -> int:
    # A hash, not seed + row: neighbouring (seed, row) pairs must not share streams.
    digest = hashlib.sha256(f"fastinpo-data:{seed}:{epoch}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_hash(caption: str | None, jpg_0: bytes | None, jpg_1: bytes | None, label_0: Any, label_1: Any) -> str:
    """sha256 of a source row (caption, both images' bytes, both labels), length-prefixed so fields cannot
    bleed into each other. The cache records it per row."""
    h = hashlib.sha256()
    for part in ((caption or "").encode(), jpg_0 or b"", jpg_1 or b"", repr(label_0).encode(),
                 repr(label_1).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass
class PairRecord:
    """What :meth:`PickAPicDataset.read_pair` returns: the preprocessed pair, or ``None`` with the reason it
    could not be used; the source row and its hash either way."""

    pair: RawPair | None
    skip_reason: str | None
    row: int
    row_hash: str


# ----------------------------------------------------------------------------------------------- dataset
class PickAPicDataset(torch.utils.data.Dataset):
    """Usable preference pairs of a Pick-a-Pic-format dataset (see the module docstring for the rules).

    Args:
        path: directory of ``*.parquet`` files (top level, sorted by name), one ``.parquet`` file, a
            ``datasets`` ``save_to_disk`` folder of one split, a pair manifest (``.jsonl``, ``.csv``, or a
            ``.parquet`` of image paths) or a folder of ``w/`` and ``l/`` images (:mod:`fastinpo.data.sources`).
        resolution: training resolution R (square crops).
        center_crop: center crop (default) or, when False, a random crop drawn per (seed, epoch, row).
        random_flip: flip both images of a pair horizontally together with probability 0.5.
        keep_ties: keep ``label_0 == 0.5`` rows with image 0 as the winner (default: drop them).
        per_sample_time_ids: SDXL ``time_ids`` ``(orig_h, orig_w, crop_top, crop_left, R, R)`` per image instead of
            the official constant ``(R, R, 0, 0, R, R)``.
        max_rows: keep only the first ``max_rows`` rows whose labels and caption are usable.
        seed: seed of the random crop / flip.
        keep_empty_captions: keep rows whose caption is empty, blank or null, trained as the caption "" (the
            caption that caption dropout feeds; default). False drops them as ``empty_caption``.
        verify_images: check every image's header at construction (reads all image bytes: slow on a real copy).
    """

    def __init__(self, path: str | os.PathLike, resolution: int, *, center_crop: bool = True,
                 random_flip: bool = False, keep_ties: bool = False, per_sample_time_ids: bool = False,
                 max_rows: int | None = None, seed: int = 0, verify_images: bool = False,
                 keep_empty_captions: bool = True):
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if max_rows is not None and int(max_rows) <= 0:
            raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
        self.path = Path(path)
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.keep_ties = bool(keep_ties)
        self.keep_empty_captions = bool(keep_empty_captions)
        self.per_sample_time_ids = bool(per_sample_time_ids)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.seed = int(seed)
        self.verify_images = bool(verify_images)
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self._late_bad: set[int] = set()

        self._source = _open_source(self.path)
        rows, swap, digest, counts = self._build_index()
        self.num_candidate_rows = len(rows)
        self.index_digest = digest
        if self.verify_images and len(rows):
            keep = np.ones(len(rows), dtype=bool)
            for k, r in enumerate(rows.tolist()):
                raw = self._source.read(r)
                b0, b1 = _image_bytes(raw.get("jpg_0")), _image_bytes(raw.get("jpg_1"))
                if b0 is None or b1 is None:
                    counts[SKIP_MISSING_IMAGE] += 1
                    keep[k] = False
                elif not (_verify(b0) and _verify(b1)):
                    counts[SKIP_UNDECODABLE] += 1
                    keep[k] = False
            rows, swap = rows[keep], swap[keep]
        self.skipped = {k: v for k, v in sorted(counts.items()) if v}
        self._rows = rows
        self._swap = swap
        if len(self._rows) == 0:
            raise ValueError(
                f"no usable preference pairs in {self.path} ({self._source.num_rows} rows read, columns "
                f"{self._source.columns}); skipped by reason: {self.skipped or 'none'}"
                + ("" if self.keep_ties else " (ties are dropped by default; data.keep_ties = true keeps them)")
            )

    # ------------------------------------------------------------------ index
    def _build_index(self) -> tuple[np.ndarray, np.ndarray, str, Counter]:
        """One pass over caption/label columns: usable rows, their swap flags, and a digest of what was read
        (row indices, captions, labels) that a cache records to detect changed data without reading images."""
        counts: Counter = Counter()
        rows: list[np.ndarray] = []
        swaps: list[np.ndarray] = []
        digest = hashlib.sha256()
        offset = 0
        found = 0
        for table in self._source.iter_meta():
            n = table.num_rows
            caps = table.column("caption").to_pylist()
            l0 = _as_float(table.column("label_0"), "label_0", self.path)
            l1 = _as_float(table.column("label_1"), "label_1", self.path) if "label_1" in table.column_names else None
            valid0 = ~np.isnan(l0)
            is_win0 = l0 == 1.0
            is_win1 = l0 == 0.0
            is_tie = l0 == 0.5
            reason = np.full(n, "", dtype=object)
            reason[~valid0] = SKIP_MISSING_LABEL
            bad = valid0 & ~(is_win0 | is_win1 | is_tie)
            reason[bad] = SKIP_BAD_LABEL
            if l1 is not None:
                # Pick-a-Pic's two labels sum to 1; a row where they do not is ambiguous, never guessed.
                incons = (is_win0 | is_win1 | is_tie) & ~(np.abs(l0 + l1 - 1.0) < 1e-6)
                reason[incons & (reason == "")] = SKIP_INCONSISTENT_LABELS
            reason[is_tie & (reason == "") & (not self.keep_ties)] = SKIP_TIE
            not_text = [(k, c) for k, c in enumerate(caps) if c is not None and not isinstance(c, str)]
            if not_text:
                k, c = not_text[0]
                raise ValueError(f"{self.path}: the 'caption' column must hold text (or null), but row "
                                 f"{offset + k} holds {type(c).__name__} {c!r} ({len(not_text)} such row(s) in "
                                 "this batch of rows)")
            if not self.keep_empty_captions:
                empty = np.array([c is None or not c.strip() for c in caps], dtype=bool)
                reason[empty & (reason == "")] = SKIP_EMPTY_CAPTION
            ok = reason == ""
            idx = np.nonzero(ok)[0]
            if self.max_rows is not None and found + len(idx) > self.max_rows:
                idx = idx[: self.max_rows - found]
                # Rows past the cap are neither used nor counted as skipped: only rows before it were looked at.
                stop = int(idx[-1]) + 1 if len(idx) else 0
                reason = reason[:stop]
            for r in reason:
                if r:
                    counts[r] += 1
            for k in idx.tolist():
                digest.update(f"{offset + k}\x1f{caps[k]}\x1f{l0[k]!r}\x1e".encode())
            rows.append(idx.astype(np.int64) + offset)
            swaps.append(is_win1[idx])
            found += len(idx)
            offset += n
            if self.max_rows is not None and found >= self.max_rows:
                break
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        s = np.concatenate(swaps) if swaps else np.zeros(0, bool)
        return r, s, digest.hexdigest(), counts

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Random crop/flip are drawn from (seed, epoch, row): call once per epoch for fresh augmentations."""
        self.epoch = int(epoch)

    @property
    def num_source_rows(self) -> int:
        """Rows in the source data (usable or not)."""
        return int(self._source.num_rows)

    def source_row(self, i: int) -> int:
        """Row index in the source data of usable pair ``i``."""
        return int(self._rows[i])

    @property
    def random_augmentation(self) -> bool:
        return (not self.center_crop) or self.random_flip

    def preprocessing_options(self) -> dict[str, Any]:
        """The options that change what a pair looks like after preprocessing (recorded by the cache)."""
        return {
            "resolution": self.resolution,
            "crop": "center" if self.center_crop else "random",
            "random_flip": self.random_flip,
            "augmentation_seed": self.seed if self.random_augmentation else None,
            "keep_ties": self.keep_ties,
            "keep_empty_captions": self.keep_empty_captions,
            "per_sample_time_ids": self.per_sample_time_ids,
            "max_rows": self.max_rows,
        }

    def source_fingerprint(self) -> list[list[Any]]:
        """File names (relative), sizes and row counts of the source: a cheap check that the data is unchanged."""
        return self._source.describe()

    def read_pair(self, i: int) -> PairRecord:
        """Usable pair ``i`` decoded and preprocessed, or ``pair=None`` with the skip reason (images missing or
        undecodable). Never substitutes another row (the cache builder uses this)."""
        if not 0 <= i < len(self._rows):
            raise IndexError(f"pair index {i} out of range for {len(self._rows)} usable pairs")
        row = int(self._rows[i])
        raw = self._source.read(row)
        b0, b1 = _image_bytes(raw.get("jpg_0")), _image_bytes(raw.get("jpg_1"))
        h = row_hash(raw.get("caption"), b0, b1, raw.get("label_0"), raw.get("label_1"))
        if b0 is None or b1 is None:
            return PairRecord(None, SKIP_MISSING_IMAGE, row, h)
        im0, im1 = _decode(b0), _decode(b1)
        if im0 is None or im1 is None:
            return PairRecord(None, SKIP_UNDECODABLE, row, h)
        if self._swap[i]:
            im0, im1 = im1, im0
        pixels, time_ids = self._preprocess(im0, im1, row)
        return PairRecord(RawPair(pixels=pixels, caption=raw["caption"] or "", time_ids=time_ids, row=row), None,
                          row, h)

    def __getitem__(self, i: int) -> RawPair:
        n = len(self._rows)
        if i < 0:
            i += n
        found: list[tuple[int, str]] = []
        for k in range(n):
            j = (i + k) % n
            rec = self.read_pair(j)
            if rec.pair is not None:
                return dataclasses.replace(rec.pair, skipped_rows=tuple(found)) if found else rec.pair
            found.append((rec.row, rec.skip_reason))
            if rec.row not in self._late_bad:
                # Counted once per row and process (DataLoader workers count in their own copy).
                self._late_bad.add(rec.row)
                self.skipped[rec.skip_reason] = self.skipped.get(rec.skip_reason, 0) + 1
        raise RuntimeError(f"none of the {n} pairs of {self.path} has two decodable images "
                           f"(skipped: {self.skipped})")

    def __repr__(self) -> str:
        return (f"PickAPicDataset({str(self.path)!r}, pairs={len(self)}, resolution={self.resolution}, "
                f"skipped={self.skipped})")

    # ------------------------------------------------------------------ preprocessing
    def _draws(self, row: int) -> tuple[list[float], bool]:
        """The pair's random draws: one per pair, shared by both images (same relative crop position, identical
        crop when the two images have the same size, as Pick-a-Pic's do, and the same flip decision)."""
        gen = None
        if self.random_augmentation:
            gen = torch.Generator().manual_seed(_row_seed(self.seed, self.epoch, row))
        u = torch.rand(3, generator=gen).tolist() if gen is not None else [0.0, 0.0, 1.0]
        return u, self.random_flip and u[2] < 0.5

    def _preprocess(self, win: Image.Image, lose: Image.Image, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, flip = self._draws(row)
        pix, tids = zip(*(self._preprocess_one(img, u, flip) for img in (win, lose)), strict=True)
        return torch.stack(pix), torch.stack(tids)

    def _preprocess_one(self, img: Image.Image, u: list[float], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        R = self.resolution
        w, h = img.size
        scale = R / min(w, h)
        nw, nh = max(R, round(w * scale)), max(R, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
        if self.center_crop:
            # Same rounding as torchvision's CenterCrop (the official codes' transform).
            top, left = int(round((nh - R) / 2.0)), int(round((nw - R) / 2.0))
        else:
            top, left = min(int(u[0] * (nh - R + 1)), nh - R), min(int(u[1] * (nw - R + 1)), nw - R)
        img = img.crop((left, top, left + R, top + R))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            # crop_left in the flipped image's coordinates (the mirrored crop window).
            left = nw - left - R
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (R, R, 3)
        pixels = arr.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
        tids = [h, w, top, left, R, R] if self.per_sample_time_ids else [R, R, 0, 0, R, R]
        return pixels, torch.tensor(tids, dtype=torch.float32)

    # ------------------------------------------------------------------ cache builder access
    def read_pair_bytes(self, i: int) -> tuple[int, str, bytes | None, bytes | None, str]:
        """``(row, caption, winner bytes, loser bytes, row hash)`` of usable pair ``i`` without decoding anything
        (an image that is absent comes back as ``None``)."""
        row = int(self._rows[i])
        raw = self._source.read(row)
        b0, b1 = _image_bytes(raw.get("jpg_0")), _image_bytes(raw.get("jpg_1"))
        h = row_hash(raw.get("caption"), b0, b1, raw.get("label_0"), raw.get("label_1"))
        if self._swap[i]:
            b0, b1 = b1, b0
        return row, raw.get("caption") or "", b0, b1, h

    def read_image(self, i: int, side: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        """One image of usable pair ``i`` (``side`` 0: the winner, 1: the loser) preprocessed exactly as
        :meth:`read_pair` does it: ``(pixels (3, R, R), time_ids (6,))``, or the skip reason."""
        row = int(self._rows[i])
        raw = self._source.read(row)
        key = "jpg_1" if (side == 0) == bool(self._swap[i]) else "jpg_0"
        data = _image_bytes(raw.get(key))
        if data is None:
            return SKIP_MISSING_IMAGE
        img = _decode(data)
        if img is None:
            return SKIP_UNDECODABLE
        u, flip = self._draws(row)
        return self._preprocess_one(img, u, flip)


def _as_float(col: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    try:
        arr = pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"column {name!r} of {path} must be numeric (Pick-a-Pic labels are floats), found type "
                         f"{col.type}: {err}") from err
    # nulls -> NaN so they are counted as missing labels
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)


# ----------------------------------------------------------------------------------------------- writing data
def write_pickapic_parquet(path: str | os.PathLike, rows: Sequence[dict[str, Any] | Sequence[Any]], *,
                           row_group_size: int | None = None) -> Path:
    """Write rows ``(caption, jpg_0 bytes, jpg_1 bytes, label_0, label_1)`` (tuples or dicts with those keys)
    as one Pick-a-Pic-format parquet file (same column names and types as Pick-a-Pic v2)."""
    cols: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    for r in rows:
        values = [r[k] for k in cols] if isinstance(r, dict) else list(r)
        if len(values) != 5:
            raise ValueError(f"a row needs 5 fields (caption, jpg_0, jpg_1, label_0, label_1), got {len(values)}")
        for k, v in zip(cols, values, strict=True):
            cols[k].append(v)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    table = pa.table(cols, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def encode_image(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt.upper() in ("JPEG", "JPG") else {}))
    return buf.getvalue()


def _synthetic_image(rng: np.random.Generator, width: int, height: int, warm: bool) -> Image.Image:
    """A gradient plus a few filled shapes; ``warm`` images are red-dominant, the others blue-dominant, so a
    test can tell which source image ended up as the winner."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    g = (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2
    base = np.stack([0.55 + 0.35 * g, 0.2 + 0.3 * g, 0.15 + 0.1 * (1 - g)], -1)
    if not warm:
        base = base[..., ::-1]
    img = (base * 255).clip(0, 255)
    for _ in range(3):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.3) * min(width, height)
        color = rng.uniform(0, 60, size=3)
        color[0 if warm else 2] += 180
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = color
    return Image.fromarray(img.astype(np.uint8), "RGB")


def synthetic_rows(n: int, resolution: int, seed: int = 0, *, tie_every: int = 5, undecodable_row: int | None = None,
                   fmt: str = "PNG") -> list[dict[str, Any]]:
    """``n`` Pick-a-Pic-format rows of random, non-constant images (original sizes between R and 1.5 R, not
    square) with captions and labels: every ``tie_every``-th row (row % tie_every == tie_every - 1) is a tie,
    the others alternate at random between image 0 and image 1 winning. Image 0 is always red-dominant and
    image 1 blue-dominant (see :func:`_synthetic_image`). ``undecodable_row`` replaces that row's ``jpg_1`` by
    bytes no decoder accepts."""
    rng = np.random.default_rng(seed)
    words = ["a red fox", "a castle", "a bowl of fruit", "the sea at night", "a robot", "a city street",
             "a mountain lake", "an old car"]
    rows = []
    for i in range(n):
        w = int(rng.integers(resolution, math.ceil(1.5 * resolution) + 1))
        h = int(rng.integers(resolution, math.ceil(1.5 * resolution) + 1))
        im0 = encode_image(_synthetic_image(rng, w, h, warm=True), fmt)
        im1 = encode_image(_synthetic_image(rng, w, h, warm=False), fmt)
        if tie_every and i % tie_every == tie_every - 1:
            l0 = 0.5
        else:
            l0 = float(rng.integers(0, 2))
        if undecodable_row is not None and i == undecodable_row:
            im1 = b"\x89PNG not really an image" + bytes(rng.integers(0, 256, 32, dtype=np.uint8))
        rows.append({"caption": f"{words[i % len(words)]}, study {i}", "jpg_0": im0, "jpg_1": im1,
                     "label_0": l0, "label_1": 1.0 - l0})
    return rows


def describe_skipped(skipped: dict[str, int]) -> str:
    """``{"tie": 3, ...}`` -> ``"3 tie, ..."`` for logs."""
    return ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "none"


__all__ = ["PickAPicDataset", "PairRecord", "write_pickapic_parquet", "synthetic_rows", "encode_image", "row_hash",
           "describe_skipped", "REQUIRED_COLUMNS"]

