"""Pair sources other than Pick-a-Pic's own layout: pair manifests (JSONL, CSV, parquet) and ``w/``/``l/`` folders.

Each source presents its rows the way :class:`fastinpo.data.pickapic.PickAPicDataset` reads Pick-a-Pic rows, so the
row rules (ties, label swaps, skips counted by reason, undecodable images substituted) are the same code for every
kind (docs/DATA.md shows each layout):

- ``num_rows``, ``columns``; ``describe()``: a JSON fingerprint of the files;
- ``iter_meta()``: ``pyarrow`` tables of ``caption``, ``label_0``, ``label_1`` in row order, a bounded number of
  rows at a time;
- ``read(row)``: ``{"caption", "jpg_0", "jpg_1", "label_0", "label_1"}`` with the two images' encoded bytes, or
  ``None`` for an image whose file is missing (counted as ``missing_image``).

Streaming: a manifest is indexed by the byte offset of each record (8 bytes a row), read back one record at a time;
a folder keeps the sorted pair names and, for ``captions.jsonl``, the byte offset of each name's line. No source
holds all rows' captions or any image in memory.

Manifest rows: ``caption`` plus either ``image_0``, ``image_1`` and ``label_0`` (``label_1`` optional; Pick-a-Pic
semantics: 1 = image 0 preferred, 0 = image 1 preferred, 0.5 = tie), or ``chosen`` and ``rejected`` (label 1). Image
paths are relative to the manifest's folder (absolute paths are taken as they are).

Folders: ``DIR/w/NAME.ext`` is the preferred image, ``DIR/l/NAME.ext`` the other one (any extension PIL reads);
captions from ``DIR/captions.jsonl`` (lines ``{"name": NAME, "caption": TEXT}``) or ``DIR/NAME.txt`` /
``DIR/w/NAME.txt``; a pair without a caption is a null caption (the empty-caption rule applies).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_META_BATCH = 65536  # rows per table of iter_meta (bounds the memory of a pass over captions and labels)
_LABELLED = ("caption", "image_0", "image_1", "label_0")
_CHOSEN = ("caption", "chosen", "rejected")


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _label(value: Any) -> float:
    """A label as it comes from JSON, CSV text or parquet -> float (NaN when absent: counted as missing_label)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf  # not a number: a bad label, never guessed


def _meta_table(captions: list, label_0: list[float], label_1: list[float], path: Path, first_row: int) -> pa.Table:
    for k, c in enumerate(captions):
        if c is not None and not isinstance(c, str):
            raise ValueError(f"{path}: the caption must be text (or null), but row {first_row + k} holds "
                             f"{type(c).__name__} {c!r}")
    return pa.table({"caption": pa.array(captions, pa.string()), "label_0": pa.array(label_0, pa.float64()),
                     "label_1": pa.array(label_1, pa.float64())})


# ----------------------------------------------------------------------------------------------- record readers
class _JsonlRecords:
    """One JSON object per line, indexed by line offsets; blank lines are not rows."""

    def __init__(self, path: Path):
        self.path = path
        offsets = array("q")
        keys: set[str] = set()
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                    if len(offsets) <= 100:  # the columns, from the first rows (every row is checked when read)
                        keys |= set(self._parse(line, len(offsets) - 1))
                pos += len(line)
        self.offsets = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, np.int64)
        self.columns = sorted(keys)
        self.num_rows = len(self.offsets)
        self._f = None

    def _parse(self, line: bytes, row: int) -> dict:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: record {row} is not valid JSON ({err})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{self.path}: record {row} must be a JSON object, got {type(obj).__name__}")
        return obj

    def __getstate__(self):
        return {**self.__dict__, "_f": None}

    def iter_records(self) -> Iterable[dict]:
        with open(self.path, "rb") as f:
            row = 0
            for line in f:
                if line.strip():
                    yield self._parse(line, row)
                    row += 1

    def read(self, row: int) -> dict:
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for random access, one per process
        self._f.seek(int(self.offsets[row]))
        return self._parse(self._f.readline(), row)


class _CsvRecords:
    """A CSV file with a header row, indexed by record offsets (a quoted field may span lines)."""

    def __init__(self, path: Path):
        self.path = path
        offsets = array("q")
        header = None
        with open(path, "rb") as f:
            pos, start, quotes, text = 0, 0, 0, b""
            for line in f:
                if quotes == 0:
                    start, text = pos, b""
                text += line
                quotes += line.count(b'"')
                pos += len(line)
                if quotes % 2:
                    continue  # inside a quoted field: the record goes on
                quotes = 0
                if not text.strip():
                    continue
                if header is None:
                    header = next(csv.reader(io.StringIO(text.decode("utf-8-sig"))))
                else:
                    offsets.append(start)
        if header is None:
            raise ValueError(f"{path}: empty CSV file (a header row naming the columns is needed)")
        self.columns = [h.strip() for h in header]
        self.offsets = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, np.int64)
        self.num_rows = len(self.offsets)
        self._f = None

    def __getstate__(self):
        return {**self.__dict__, "_f": None}

    def _record(self, text: str) -> dict:
        values = next(csv.reader(io.StringIO(text)))
        return dict(zip(self.columns, values, strict=False))

    def _read_at(self, f, offset: int) -> str:
        f.seek(offset)
        text, quotes = b"", 0
        while True:
            line = f.readline()
            text += line
            quotes += line.count(b'"')
            if not line or quotes % 2 == 0:
                return text.decode("utf-8")

    def iter_records(self) -> Iterable[dict]:
        with open(self.path, "rb") as f:
            for off in self.offsets.tolist():
                yield self._record(self._read_at(f, off))

    def read(self, row: int) -> dict:
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for random access, one per process
        return self._record(self._read_at(self._f, int(self.offsets[row])))


class _ParquetRecords:
    """A parquet manifest, read by row group (a few decoded groups kept per process)."""

    def __init__(self, path: Path):
        self.path = path
        pf = pq.ParquetFile(path)
        self.columns = list(pf.schema_arrow.names)
        self.num_rows = pf.metadata.num_rows
        rg = [0]
        for i in range(pf.metadata.num_row_groups):
            rg.append(rg[-1] + pf.metadata.row_group(i).num_rows)
        self._rg = rg
        self._pf = None
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_pf": None, "_groups": OrderedDict()}

    def iter_records(self) -> Iterable[dict]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_META_BATCH):
            yield from batch.to_pylist()

    def read(self, row: int) -> dict:
        gi = int(np.searchsorted(self._rg, row, side="right")) - 1
        table = self._groups.get(gi)
        if table is None:
            if self._pf is None:
                self._pf = pq.ParquetFile(self.path)
            table = self._groups[gi] = self._pf.read_row_group(gi)
            while len(self._groups) > 2:
                self._groups.popitem(last=False)
        r = row - self._rg[gi]
        return {c: table.column(c)[r].as_py() for c in table.column_names}


# ----------------------------------------------------------------------------------------------- sources
class ManifestSource:
    """A pair manifest: JSONL, CSV or parquet rows of ``caption`` + ``image_0``/``image_1``/``label_0`` paths and
    labels, or ``caption`` + ``chosen``/``rejected`` paths (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.root = path.parent
        kind = path.suffix.lower()
        readers = {".jsonl": _JsonlRecords, ".csv": _CsvRecords, ".parquet": _ParquetRecords}
        self._records = readers[kind](path)
        cols = set(self._records.columns)
        if self._records.num_rows and not cols:
            raise ValueError(f"pair manifest {path} has rows but no columns")
        if set(_LABELLED) <= cols:
            self.layout = "labelled"
        elif set(_CHOSEN) <= cols:
            self.layout = "chosen"
        else:
            raise ValueError(
                f"pair manifest {path} needs the columns {list(_LABELLED)} (+ optional label_1) or "
                f"{list(_CHOSEN)}; found {sorted(cols)}")
        self.columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
        self.num_rows = self._records.num_rows

    def describe(self) -> list[list[Any]]:
        return [[self.path.name, self.path.stat().st_size, self.num_rows]]

    def _labels(self, rec: dict) -> tuple[float, float]:
        if self.layout == "chosen":
            return 1.0, 0.0
        l0 = _label(rec.get("label_0"))
        l1 = _label(rec.get("label_1")) if "label_1" in rec and rec.get("label_1") not in (None, "") else 1.0 - l0
        return l0, l1

    def iter_meta(self) -> Iterable[pa.Table]:
        caps, l0s, l1s = [], [], []
        first = 0
        for rec in self._records.iter_records():
            l0, l1 = self._labels(rec)
            caps.append(rec.get("caption"))
            l0s.append(l0)
            l1s.append(l1)
            if len(caps) == _META_BATCH:
                yield _meta_table(caps, l0s, l1s, self.path, first)
                first += len(caps)
                caps, l0s, l1s = [], [], []
        if caps or self.num_rows == 0:
            yield _meta_table(caps, l0s, l1s, self.path, first)

    def _image(self, value: Any) -> bytes | None:
        if not value or not isinstance(value, str):
            return None
        p = Path(value)
        return _read_file(p if p.is_absolute() else self.root / p)

    def read(self, row: int) -> dict[str, Any]:
        rec = self._records.read(row)
        l0, l1 = self._labels(rec)
        a, b = ("image_0", "image_1") if self.layout == "labelled" else ("chosen", "rejected")
        return {"caption": rec.get("caption"), "jpg_0": self._image(rec.get(a)), "jpg_1": self._image(rec.get(b)),
                "label_0": l0, "label_1": l1}


class FolderSource:
    """``DIR/w/NAME.*`` (preferred) and ``DIR/l/NAME.*`` pairs, rows in sorted NAME order."""

    def __init__(self, root: Path):
        self.root = root
        sides = []
        fp = hashlib.sha256()
        for side in ("w", "l"):
            found: dict[str, str] = {}
            with os.scandir(root / side) as it:
                for e in it:
                    stem, ext = os.path.splitext(e.name)
                    if ext.lower() not in IMAGE_SUFFIXES or not e.is_file():
                        continue
                    if stem in found:
                        raise ValueError(f"{root / side} holds two images named {stem!r}: {found[stem]} and "
                                         f"{e.name} (one image per name and side)")
                    found[stem] = e.name
            sides.append(found)
        names = sorted(set(sides[0]) | set(sides[1]))
        self.names = names
        self._files = [[s.get(n) for n in names] for s in sides]
        for n, w, l in zip(names, *self._files, strict=True):
            fp.update(f"{n}\x1f{w}\x1f{l}\x1e".encode())
        self._digest = fp.hexdigest()
        self.num_rows = len(names)
        self.columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
        self._captions_file = root / "captions.jsonl"
        self._caption_offsets = None
        if self._captions_file.is_file():
            where: dict[str, int] = {}
            with open(self._captions_file, "rb") as f:
                pos = 0
                for k, line in enumerate(f):
                    if line.strip():
                        name = self._caption_line(line, k)[0]
                        where[str(name)] = pos
                    pos += len(line)
            self._caption_offsets = np.array([where.get(n, -1) for n in names], dtype=np.int64)
        self._f = None

    def __getstate__(self):
        return {**self.__dict__, "_f": None}

    def _caption_line(self, line: bytes, k: int) -> tuple[str, Any]:
        try:
            obj = json.loads(line)
            return obj["name"], obj.get("caption")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self._captions_file}: line {k + 1} must be a JSON object with 'name' and "
                             f"'caption' ({err!r})") from err

    def describe(self) -> list[list[Any]]:
        cap = self._captions_file
        return [["w/ + l/", None, self.num_rows], ["names", None, self._digest]] + (
            [[cap.name, cap.stat().st_size, None]] if cap.is_file() else [])

    def caption(self, i: int) -> str | None:
        if self._caption_offsets is not None:
            off = int(self._caption_offsets[i])
            if off < 0:
                return None
            if self._f is None:
                self._f = open(self._captions_file, "rb")  # noqa: SIM115 - kept open, one per process
            self._f.seek(off)
            return self._caption_line(self._f.readline(), -1)[1]
        for p in (self.root / f"{self.names[i]}.txt", self.root / "w" / f"{self.names[i]}.txt"):
            if p.is_file():
                return p.read_text(encoding="utf-8").strip()
        return None

    def iter_meta(self) -> Iterable[pa.Table]:
        for start in range(0, max(self.num_rows, 1), _META_BATCH):
            idx = range(start, min(start + _META_BATCH, self.num_rows))
            yield _meta_table([self.caption(i) for i in idx], [1.0] * len(idx), [0.0] * len(idx), self.root, start)

    def read(self, row: int) -> dict[str, Any]:
        w, l = self._files[0][row], self._files[1][row]
        return {"caption": self.caption(row),
                "jpg_0": _read_file(self.root / "w" / w) if w else None,
                "jpg_1": _read_file(self.root / "l" / l) if l else None,
                "label_0": 1.0, "label_1": 0.0}


def is_pair_folder(path: Path) -> bool:
    return (path / "w").is_dir() and (path / "l").is_dir()


def is_pair_manifest(path: Path) -> bool:
    """A manifest file: ``.jsonl``/``.csv``, or a ``.parquet`` file without Pick-a-Pic's ``jpg_0`` column."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        return True
    if suffix == ".parquet":
        try:
            names = pq.read_schema(path).names
        except Exception:  # noqa: BLE001 - unreadable: let the Pick-a-Pic reader report it
            return False
        return "jpg_0" not in names and ("image_0" in names or "chosen" in names)
    return False


__all__ = ["ManifestSource", "FolderSource", "is_pair_folder", "is_pair_manifest", "MANIFEST_SUFFIXES"]
