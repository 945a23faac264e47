"""The stream of encoded micro-batches: data order, the cache or on-the-fly encoding, the empty caption.

Data order is a function of (seed, position): epoch ``e`` visits the usable rows in the permutation drawn from
``seed`` and ``e``, and micro-batch ``m`` of rank ``r`` (of ``W``) takes positions
``[(m·W + r)·B, (m·W + r + 1)·B)`` of the endless concatenation of epochs. So every pair is seen once per epoch
over all ranks whatever their number, the global batch does not depend on W, and a resumed run starts at
micro-batch ``m`` without replaying anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastinpo.config import Config
from fastinpo.data.batch import EncodedBatch, collate_encoded, collate_raw

#: stream position of validation pair 0 (pair k: ``VALIDATION_POSITION + k``): far below any training position
VALIDATION_POSITION = -(2**62)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class PairOrderSampler(torch.utils.data.Sampler):
    """Yields the index lists of micro-batches ``start, start+1, ...`` (see the module docstring)."""

    def __init__(self, n: int, pairs_per_batch: int, seed: int, *, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if n == 0:
            raise ValueError("the dataset has no usable pairs")
        self.n, self.B, self.seed, self.start, self.rank, self.W = n, pairs_per_batch, seed, start, rank, world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            self._perms = {epoch: epoch_permutation(self.n, self.seed, epoch)}  # keep one epoch in memory
            perm = self._perms[epoch]
        return int(perm[offset])

    def epoch_of(self, micro_batch: int) -> int:
        """The epoch of a micro-batch's first pair."""
        return (micro_batch * self.W + self.rank) * self.B // self.n

    def positions(self, micro_batch: int) -> list[int]:
        """The stream positions of a micro-batch's pairs (this rank's slice of the global batch)."""
        first = (micro_batch * self.W + self.rank) * self.B
        return list(range(first, first + self.B))

    def batch_indices(self, micro_batch: int) -> list[int]:
        return [self._at(p) for p in self.positions(micro_batch)]

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.batch_indices(m)
            m += 1


@dataclass
class EmptyCaption:
    """The encoded "" used by caption dropout: ``prompt_embeds`` ``(L, D)``, ``pooled`` ``(P,)`` or None."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None


class PairStream:
    """Encoded micro-batches for the loop, from the cache when it matches the config, else encoded on the fly."""

    def __init__(self, config: Config, *, model_folder, device: torch.device, encoder=None,
                 rank: int = 0, world_size: int = 1):
        from fastinpo.data.cache import (
            REBUILD_HINT,
            CachedPairDataset,
            StaleCacheError,
            cache_matches,
            expected_cache_signature,
            what_to_do,
        )
        from fastinpo.data.pickapic import PickAPicDataset
        from fastinpo.models.family import encoder_signature

        d = config.data
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.encoder = encoder
        self.dataset = None
        self.cached = False
        raw = PickAPicDataset(d.path, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip,
                              keep_ties=d.keep_ties, keep_empty_captions=d.keep_empty_captions,
                              per_sample_time_ids=d.per_sample_time_ids,
                              max_rows=d.max_rows, seed=config.train.seed) if d.path else None
        self.raw_dataset = raw
        # skips found when the data was indexed (before any pair is read), and rows found unusable later
        self._index_skipped: dict[str, int] = dict(raw.skipped) if raw is not None else {}
        self._late: dict[int, str] = {}
        if d.cache_dir:
            if raw is None:
                raise ValueError("data.path is required with data.cache_dir: the cache is checked against the data")
            expect = expected_cache_signature(raw, encoder_signature(model_folder), d.cache_embed_dtype,
                                              d.cache_dtype)
            ok, reasons = cache_matches(d.cache_dir, expect)
            if not ok:
                raise StaleCacheError(f"the cache in {d.cache_dir} does not match this config:\n  "
                                      + "\n  ".join(reasons) + "\n" + what_to_do(d.cache_dir, expect))
            self.dataset = CachedPairDataset(d.cache_dir, expect=expect)
            if d.latent_sample and not self.dataset.has_std:
                # without the std the run would train on the posterior mean while its config says "sample"
                raise StaleCacheError(f"the cache in {d.cache_dir} holds no posterior std (built with "
                                      "data.latent_sample = false), but this run draws latent samples "
                                      "(data.latent_sample = true). " + REBUILD_HINT)
            self.cached = True
            self.data_signature = {**expect, "encoded_by": "cache"}
            prompt, pooled = self.dataset.empty_caption()
            self.empty = EmptyCaption(prompt.to(device), None if pooled is None else pooled.to(device))
        else:
            if raw is None:
                raise ValueError("data.path is required when no data.cache_dir is given")
            if encoder is None:
                raise ValueError("on-the-fly encoding needs the VAE and text encoders (no cache configured)")
            self.dataset = raw
            # what an encoded pair depends on (the same fields a cache records; per-pair caches key on it)
            self.data_signature = {**expected_cache_signature(raw, encoder_signature(model_folder),
                                                              config.model.encoder_dtype),
                                   "encoded_by": "encoder"}
            prompt, pooled = encoder.encode_text([""])
            self.empty = EmptyCaption(prompt[0].to(device), None if pooled is None else pooled[0].to(device))
        self._validation_source, self.validation_indices = None, []
        self._validation_encoded = False  # the validation pairs come from the cache (else: encoded when read)
        if d.validation_fraction > 0:  # the held-out rows leave the training set (data/validation_split.py)
            from fastinpo.data import validation_split

            full = self.dataset
            rows = (full.rows().tolist() if self.cached else [raw.source_row(i) for i in range(len(raw))])
            train_idx, held = validation_split.split(rows, d.validation_fraction)
            if not held or not train_idx:
                raise ValueError(f"data.validation_fraction = {d.validation_fraction} holds out {len(held)} of the "
                                 f"{len(rows)} usable pairs: choose a fraction that leaves pairs on both sides")
            self.validation_indices = held[:d.validation_max_pairs]
            self.dataset = _Subset(full, train_idx)
            self._validation_encoded = self.cached
            # a random crop/flip would give a held-out pair another look at every validation: read them fixed
            self._validation_source = full if self.cached or not raw.random_augmentation else \
                _fixed_view(d.path, d, config.train.seed)
        elif d.validation_path:
            from fastinpo.data import validation_split

            self._validation_source = _fixed_view(d.validation_path, d, config.train.seed)
            rows = [self._validation_source.source_row(i) for i in range(len(self._validation_source))]
            self.validation_indices = validation_split.split(rows, 1.0)[1][:d.validation_max_pairs]

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped, by reason — one accounting for ``cache`` output, the manifest, metrics and the summary.

        From a cache: the manifest's counts (the rows its build skipped, undecodable images included). Encoded on
        the fly: the rows skipped when the data was indexed, plus those found unusable as the run reached them
        (carried in the batches, so DataLoader workers count too, and through checkpoints by
        :meth:`late_skips` / :meth:`restore_skips`)."""
        if self.cached:
            return dict(sorted(self.dataset.skipped.items()))
        counts = Counter(self._index_skipped)
        counts.update(self._late.values())
        return dict(sorted(counts.items()))

    def late_skips(self) -> dict[str, str]:
        """``{row: reason}`` of the rows found unusable during the run (what a checkpoint stores)."""
        return {str(row): reason for row, reason in sorted(self._late.items())}

    def restore_skips(self, saved: dict[str, str]) -> None:
        """Resume: the rows the run had found unusable before its checkpoint."""
        self._late.update({int(row): reason for row, reason in saved.items()})

    def __len__(self) -> int:
        """Training pairs (the validation pairs of ``data.validation_fraction`` excluded)."""
        return len(self.dataset)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_indices)

    def validation_batches(self) -> list[tuple[EncodedBatch, torch.Tensor]]:
        """This rank's share of the validation pairs, encoded (posterior mean), on the CPU: ``(batch, weight)`` in
        batches of ``train.pairs_per_batch``. Validation pair ``k`` has the stream position
        ``VALIDATION_POSITION + k``, a negative number training never reaches, so its timestep, noise and
        inversion draws are fixed, its own, and the same whatever the number of ranks. Global validation batch
        ``g`` holds pairs ``[g·W·B, (g+1)·W·B)``, rank ``r`` the ``r``-th ``B`` of them (contiguous positions, as a
        training batch: what ZeRO-3's InPO lockstep expects); the last is padded with weight-0 repeats so that
        every rank makes the same number of calls (ZeRO-3's forward is a collective)."""
        n, B, W = len(self.validation_indices), self.config.train.pairs_per_batch, self.world_size
        per_global = W * B
        out = []
        for g in range(0, -(-n // per_global) * per_global, per_global):
            ks = list(range(g + self.rank * B, g + (self.rank + 1) * B))
            items = [self._validation_source[self.validation_indices[k % n]] for k in ks]
            if self._validation_encoded:
                batch = collate_encoded(items)
                batch.latent_std = None
            else:
                if self.encoder is None:
                    raise ValueError("validation pairs read from a Pick-a-Pic source need the VAE and text "
                                     "encoders")
                with torch.no_grad():
                    batch = self.encoder.encode_batch(collate_raw(items), use_std=False)
            batch.positions = torch.tensor([VALIDATION_POSITION + k for k in ks], dtype=torch.int64)
            out.append((batch.to("cpu"), torch.tensor([1.0 if k < n else 0.0 for k in ks])))
        return out

    def batches(self, start_micro_batch: int) -> Iterator[EncodedBatch]:
        sampler = PairOrderSampler(len(self.dataset), self.config.train.pairs_per_batch, self.config.train.seed,
                                   start=start_micro_batch, rank=self.rank, world_size=self.world_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.config.data.num_workers,
            collate_fn=collate_encoded if self.cached else collate_raw,
            pin_memory=self.device.type == "cuda")
        # random crop / flip are seeded by (seed, epoch, row): the dataset must know the epoch. It is set in this
        # process, so it reaches the data only without worker processes (which keep the epoch they started with).
        set_epoch = getattr(self.dataset, "set_epoch", None) if self.config.data.num_workers == 0 else None
        for batch in _with_epochs(loader, set_epoch, sampler, start_micro_batch):
            if not self.cached:
                for row, reason in batch.skipped_rows:
                    self._late.setdefault(row, reason)
                positions = batch.positions
                batch = self.encoder.encode_batch(batch, use_std=self.config.data.latent_sample)
                batch.positions = positions
            yield batch.to(self.device)


class _Subset(torch.utils.data.Dataset):
    """The training pairs of a dataset whose validation rows are held out; the dataset's other attributes
    (``skipped``, ``set_epoch``, ...) pass through."""

    def __init__(self, base, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def __getattr__(self, name):
        if name in ("base", "indices"):  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.base, name)


def _fixed_view(path, d, seed: int):
    """A Pick-a-Pic source read the way validation needs it: centre crop, no flip (the same pixels every time)."""
    from fastinpo.data.pickapic import PickAPicDataset

    return PickAPicDataset(path, d.resolution, center_crop=True, random_flip=False, keep_ties=d.keep_ties,
                           keep_empty_captions=d.keep_empty_captions, per_sample_time_ids=d.per_sample_time_ids,
                           max_rows=d.max_rows if path == d.path else None, seed=seed)


def _with_epochs(loader, set_epoch, sampler: PairOrderSampler, micro_batch: int):
    """The loader's batches, each tagged with its pairs' stream positions (the seeds of their randomness)."""
    it = iter(loader)
    while True:
        if set_epoch is not None:
            set_epoch(sampler.epoch_of(micro_batch))
        try:
            batch = next(it)
        except StopIteration:
            return
        batch.positions = torch.tensor(sampler.positions(micro_batch), dtype=torch.int64)
        yield batch
        micro_batch += 1
