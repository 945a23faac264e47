"""The records that flow from the data side (Pick-a-Pic reader, cache) to the training side (methods, loop).

A dataset yields one record per preference pair; ``collate_*`` stacks them into a batch with the project's
layout (winners first, then losers, along dim 0). Two kinds of records:

- :class:`RawPair` — decoded, preprocessed pixels and the caption (no model has run yet);
- :class:`EncodedPair` — the VAE posterior and the text embeddings (from the cache, or from
  :class:`fastinpo.models.sd.Encoder` on the fly).

The trainer turns an :class:`EncodedBatch` into ``z0`` (a fresh posterior sample per step, SPEC §1) and the
UNet conditioning, applying caption dropout per pair with the encoded empty caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RawPair:
    """One usable preference pair, preprocessed.

    Attributes:
        pixels: ``(2, 3, R, R)`` float32 in [-1, 1]: ``[winner, loser]`` after resize / crop / joint flip.
        caption: the prompt (may be "" only if the dataset really had an empty caption and the option allows it).
        time_ids: ``(2, 6)`` float32 SDXL micro-conditioning per image: ``(R, R, 0, 0, R, R)`` by default,
            ``(orig_h, orig_w, crop_top, crop_left, R, R)`` with the per-sample option.
        row: the row's index in the source dataset (stable across runs; used for hashing and resume checks).
        skipped_rows: ``(row, reason)`` of the rows found unusable (images missing or undecodable) while this pair
            was fetched in their place: the skip accounting travels with the data, so it is counted in the
            trainer's process even when DataLoader workers did the decoding.
    """

    pixels: torch.Tensor
    caption: str
    time_ids: torch.Tensor
    row: int
    skipped_rows: tuple[tuple[int, str], ...] = ()


@dataclass
class EncodedPair:
    """One preference pair after the VAE and the text encoders.

    Attributes:
        latent_mean: ``(2, C, h, w)`` float32, VAE posterior mean times ``scaling_factor``.
        latent_std: ``(2, C, h, w)`` float32 posterior std times ``scaling_factor``, or ``None`` when only the
            mean is used.
        prompt_embeds: ``(L, D)`` text encoder hidden states (SDXL: both encoders' penultimate layers
            concatenated, SPEC §1).
        pooled_embeds: ``(P,)`` SDXL pooled text embedding of encoder 2, else ``None``.
        time_ids: ``(2, 6)`` float32 (SDXL) or ``None`` (SD1.5).
        row: source row index.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None
    time_ids: torch.Tensor | None
    row: int


@dataclass
class RawBatch:
    """B raw pairs: ``pixels`` ``(2B, 3, R, R)`` winners first, ``captions`` (B), ``time_ids`` ``(2B, 6)``,
    ``rows`` ``(B,)`` int64."""

    pixels: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor | None = None  # (B,) the pairs' positions in the run's data stream (set by the trainer)
    skipped_rows: tuple[tuple[int, str], ...] = ()  # rows skipped while fetching these pairs (RawPair)


@dataclass
class EncodedBatch:
    """B encoded pairs: ``latent_mean``/``latent_std`` ``(2B, C, h, w)`` winners first, ``prompt_embeds``
    ``(B, L, D)`` and ``pooled_embeds`` ``(B, P)`` per pair, ``time_ids`` ``(2B, 6)``, ``rows`` ``(B,)``."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None
    time_ids: torch.Tensor | None
    rows: torch.Tensor
    positions: torch.Tensor | None = None  # (B,) the pairs' positions in the run's data stream (set by the trainer)

    def to(self, device: torch.device | str) -> EncodedBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return EncodedBatch(move(self.latent_mean), move(self.latent_std), move(self.prompt_embeds),
                            move(self.pooled_embeds), move(self.time_ids), self.rows, self.positions)


def _pairs_first(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[(2, ...)] * B`` -> ``(2B, ...)`` with all winners, then all losers."""
    stacked = torch.stack(tensors)  # (B, 2, ...)
    return torch.cat([stacked[:, 0], stacked[:, 1]], 0)


def collate_raw(items: list[RawPair]) -> RawBatch:
    return RawBatch(
        pixels=_pairs_first([i.pixels for i in items]),
        captions=[i.caption for i in items],
        time_ids=_pairs_first([i.time_ids for i in items]),
        rows=torch.tensor([i.row for i in items], dtype=torch.int64),
        skipped_rows=tuple(r for i in items for r in i.skipped_rows),
    )


def collate_encoded(items: list[EncodedPair]) -> EncodedBatch:
    first = items[0]
    return EncodedBatch(
        latent_mean=_pairs_first([i.latent_mean for i in items]),
        latent_std=None if first.latent_std is None else _pairs_first([i.latent_std for i in items]),
        prompt_embeds=torch.stack([i.prompt_embeds for i in items]),
        pooled_embeds=None if first.pooled_embeds is None else torch.stack([i.pooled_embeds for i in items]),
        time_ids=None if first.time_ids is None else _pairs_first([i.time_ids for i in items]),
        rows=torch.tensor([i.row for i in items], dtype=torch.int64),
    )
