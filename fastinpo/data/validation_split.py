"""Which source rows are held out as preference-validation pairs (``data.validation_fraction``).

A row is held out when a hash of its source row index (its position in the source data: the Pick-a-Pic files in
name order, or the ``save_to_disk`` split) falls below the fraction. The split is therefore a fixed partition of
the source: it does not depend on the seed, the batch size, ``data.max_rows``, the rows skipped or whether the
pairs come from the cache, and a held-out row is never trained on. The validation pairs are taken in hash order, so
``data.validation_max_pairs`` keeps the same pairs whatever the source's size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_SPACE = 2**64


def row_key(source_row: int) -> int:
    """A 64-bit hash of a source row index (the same on every machine and Python)."""
    digest = hashlib.sha256(f"fastinpo-validation-split:{int(source_row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def is_held_out(source_row: int, fraction: float) -> bool:
    """Whether ``source_row`` belongs to the validation split of ``fraction``."""
    return row_key(source_row) < fraction * _SPACE


def split(source_rows: Sequence[int], fraction: float) -> tuple[list[int], list[int]]:
    """``(training, validation)`` positions into ``source_rows`` (the source row of each usable pair):
    training in their original order, validation in hash order. ``fraction == 0``: everything trains."""
    if fraction <= 0:
        return list(range(len(source_rows))), []
    keys = [row_key(r) for r in source_rows]
    limit = fraction * _SPACE
    train = [i for i, k in enumerate(keys) if k >= limit]
    held = sorted((i for i, k in enumerate(keys) if k < limit), key=lambda i: keys[i])
    return train, held
