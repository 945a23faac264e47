"""Prompt-set readers for the local formats evaluation sets come in.

- Pick-a-Pic test split: parquet file(s) with a ``caption`` column (one row per *pair*, so captions repeat:
  deduplicated, first-seen order kept);
- PartiPrompts: the TSV of the parti repository, with ``Prompt`` and ``Category`` columns;
- HPDv2 benchmark prompts: one JSON file per style holding a list of strings (``anime.json``, ``photo.json``...),
  or a folder of them; the style (file stem) becomes the category;
- plain text: one prompt per line, blank lines and ``#`` comments skipped.

:func:`read_prompts` picks the reader from the path (``format="auto"``) and raises ``ValueError`` naming the file
and the problem for anything malformed.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "pickapic", "parti", "hpdv2", "text")


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    category: str | None = None


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"prompt file {path}: {problem}")


def _read_utf8(path: Path) -> str:
    """The file's text as UTF-8; a leading byte-order mark (Windows editors write one) is dropped, so it cannot
    become part of the first prompt or of a TSV's first column name."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _fail(path, f"is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_text(path: str | Path) -> list[PromptItem]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    text = _read_utf8(path)
    items = [PromptItem(line.strip()) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise _fail(path, "holds no prompt (expected one prompt per line)")
    return items


def read_parti(path: str | Path) -> list[PromptItem]:
    """PartiPrompts TSV (``PartiPrompts.tsv``): columns ``Prompt`` and ``Category`` (others ignored)."""
    path = Path(path)
    # QUOTE_NONE: a tab-separated file has no quoting, and PartiPrompts has prompts that start with a quote mark
    # ('"G I G G L E" painted ...'); the csv default would read them as quoted fields and drop the marks.
    with io.StringIO(_read_utf8(path), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = reader.fieldnames or []
        missing = [c for c in ("Prompt", "Category") if c not in columns]
        if missing:
            raise _fail(path, f"missing column(s) {missing} (PartiPrompts TSV needs 'Prompt' and 'Category'; "
                              f"found {columns})")
        items = []
        for line_no, row in enumerate(reader, start=2):
            prompt = (row.get("Prompt") or "").strip()
            if not prompt:
                raise _fail(path, f"line {line_no} has an empty Prompt")
            items.append(PromptItem(prompt, (row.get("Category") or "").strip() or None))
    if not items:
        raise _fail(path, "has a header but no prompt rows")
    return items


def _read_hpdv2_file(path: Path) -> list[PromptItem]:
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as err:
        raise _fail(path, f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise _fail(path, f"expected a JSON list of prompt strings (HPDv2 benchmark format), got "
                          f"{type(data).__name__}" + ("" if not isinstance(data, list) else " with non-string items"))
    items = [PromptItem(p.strip(), path.stem) for p in data if p.strip()]
    if not items:
        raise _fail(path, "holds no prompt")
    return items


def read_hpdv2(path: str | Path) -> list[PromptItem]:
    """HPDv2 benchmark prompts: a JSON list of strings per style, or a folder of ``<style>.json`` files
    (styles sorted by name so the order does not depend on the file system)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise _fail(path, "is a folder without *.json files (expected HPDv2 <style>.json prompt lists)")
        return [item for f in files for item in _read_hpdv2_file(f)]
    return _read_hpdv2_file(path)


def read_pickapic(path: str | Path) -> list[PromptItem]:
    """Pick-a-Pic captions from a parquet file or a folder of them (sorted by name), deduplicated in first-seen
    order. Only the ``caption`` column is read, so the image bytes of the split are never loaded."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise _fail(path, "is a folder without *.parquet files (expected the Pick-a-Pic test split)")
    seen: dict[str, None] = {}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as err:  # pyarrow raises several types for a non-parquet file
            raise _fail(f, f"is not a readable parquet file ({err})") from None
        if "caption" not in schema.names:
            raise _fail(f, f"has no 'caption' column (Pick-a-Pic parquet expected; columns: {schema.names})")
        for caption in pq.read_table(f, columns=["caption"]).column("caption").to_pylist():
            if caption is not None and caption.strip():
                seen.setdefault(caption.strip(), None)
    if not seen:
        raise _fail(path, "holds no non-empty caption")
    return [PromptItem(c) for c in seen]


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.parquet")):
            return "pickapic"
        if any(path.glob("*.json")):
            return "hpdv2"
        raise _fail(path, "is a folder with neither *.parquet (Pick-a-Pic) nor *.json (HPDv2) files")
    suffix = path.suffix.lower()
    return {".parquet": "pickapic", ".tsv": "parti", ".json": "hpdv2"}.get(suffix, "text")


def read_prompts(path: str | Path, format: str = "auto") -> list[PromptItem]:
    """Read a prompt set. ``format``: ``auto`` (by extension: .parquet, .tsv, .json, anything else text; a folder
    of parquet or JSON files), ``pickapic``, ``parti``, ``hpdv2`` or ``text``."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"prompt format must be one of {FORMATS}, got {format!r}")
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    reader = {"pickapic": read_pickapic, "parti": read_parti, "hpdv2": read_hpdv2, "text": read_text}[fmt]
    if path.is_dir() and fmt in ("parti", "text"):
        raise _fail(path, f"is a folder; the {fmt} format reads a single file")
    return _unique(path, reader(path))


def _unique(path: Path, items: list[PromptItem]) -> list[PromptItem]:
    """Each prompt once, first occurrence kept. Samples are named and paired by prompt, so a repeated prompt
    would sample twice and then make ``eval`` refuse the folder; dropping the repeats up front, with a warning
    naming them, keeps the set usable."""
    seen: dict[str, PromptItem] = {}
    for item in items:
        seen.setdefault(item.prompt, item)
    if len(seen) < len(items):
        example = next(p for p, n in Counter(i.prompt for i in items).items() if n > 1)
        warnings.warn(f"prompt file {path}: {len(items) - len(seen)} repeated prompt(s) dropped (first occurrence "
                      f"kept), e.g. {example!r}", stacklevel=3)
    return list(seen.values())
