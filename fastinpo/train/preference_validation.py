"""Preference validation during training: the method's loss, implicit accuracy, reward margin and the
policy-reference gap on held-out preference pairs, every ``train.validate_every`` optimizer steps; the best
checkpoint (``train.keep_best``) and early stopping (``train.early_stopping_patience``).

(Not to be confused with :mod:`fastinpo.train.validation`, which renders sample *image grids*.)

The validation pairs are ``data.validation_fraction`` of the source, held out by row hash
(:mod:`fastinpo.data.validation_split`), or ``data.validation_path``; they are encoded once (posterior mean, no
caption dropout, no random crop or flip) at the first validation. Validation pair ``k`` draws its timestep, noise
and inversion noise from streams seeded by its own stream position (:data:`fastinpo.train.data_source.
VALIDATION_POSITION` ``+ k``), fresh generators each time: two validations see exactly the same inputs and differ
only by the weights, and no training random stream is touched — a run validates or not with bit-identical
training. Everything runs under ``torch.no_grad``.

Metrics (means over the validation pairs; reduced over ranks under DeepSpeed):

- ``val_loss``: the method's loss (DPO methods: the DPO loss; SFT: the winners' denoising MSE);
- ``val_implicit_acc``: fraction of pairs whose DPO logit is > 0 (ties ½) — for SFT too, as the DPO logit of the
  SFT policy against the reference at Diffusion-DPO's noising of the pair (``val_dpo_loss`` is then its DPO loss);
- ``val_reward_margin``: the mean DPO logit (the implicit reward margin, β included);
- ``val_model_ref_gap``: ``mean |mse_θ - mse_ref| / mean mse_ref`` over both images of every pair — how far the
  policy's denoising errors have moved from the reference's, relative to their size (Inversion-DPO, whose
  reference error is 0 by construction: the mean distance D of the policy from the reference trajectory). See
  docs/VALIDATION.md for what a jump in it signals;
- ``val_seconds``: the wall-clock of the validation.

Per validation the host reads the device once (the reduced sums); between validations nothing is read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from fastinpo.config import Config
from fastinpo.methods import build_method
from fastinpo.ops.reference import preference_loss

#: for each ``train.keep_best`` metric: True when larger is better
HIGHER_IS_BETTER = {"val_implicit_acc": True, "val_loss": False}


class PreferenceValidator:
    """Runs the validations of a run and keeps their bookkeeping (best value, validations since the best).

    ``make_inputs(batch, empty, config, device)`` is the loop's :func:`fastinpo.train.loop.make_step_inputs`;
    ``reduce`` the engine's :meth:`~fastinpo.train.engine.Engine.reduce_metrics`."""

    def __init__(self, config: Config, stream, method, schedule, device: torch.device,
                 make_inputs: Callable, reduce: Callable[[torch.Tensor], torch.Tensor],
                 begin_micro_batch: Callable | None = None, saved: dict | None = None):
        t = config.train
        self.every = t.validate_every if stream.has_validation else 0
        self.max_steps = t.max_steps
        self.stream, self.method, self.device = stream, method, device
        self.make_inputs, self.reduce = make_inputs, reduce
        self.begin_micro_batch = begin_micro_batch or (lambda batch: None)
        # validation inputs: the posterior mean, the real caption (no dropout)
        self.config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, caption_dropout=0.0, latent_sample=False))
        # SFT has no DPO logits of its own: the DPO view of its policy against the reference
        # (built for the model family of the schedule: Flow-DPO for a flow model)
        self.dpo_view = (build_method(dataclasses.replace(config.method, name="diffusion-dpo"), schedule)
                         if config.method.name == "sft" else None)
        self.keep_best = t.keep_best if t.keep_best != "none" else None
        self.metric = self.keep_best or "val_implicit_acc"
        self.patience = t.early_stopping_patience
        self.batches = None
        saved = saved or {}
        self.best_value: float | None = saved.get("best_value")
        self.best_step: int | None = saved.get("best_step")
        self.since_best: int = int(saved.get("since_best", 0))
        self.improved = False

    def due(self, step: int) -> bool:
        """Every ``train.validate_every`` steps, and at the run's last step (its final weights are validated)."""
        return bool(self.every) and (step % self.every == 0 or step == self.max_steps)

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``train.early_stopping_patience`` validations in a row without improvement."""
        return bool(self.patience) and self.since_best >= self.patience

    def checkpoint_state(self) -> dict:
        """What a checkpoint records of the bookkeeping (a resume continues it exactly)."""
        return {"validation": {"metric": self.metric, "best_value": self.best_value, "best_step": self.best_step,
                               "since_best": self.since_best}}

    @torch.no_grad()
    def __call__(self, step: int, models) -> dict[str, float]:
        """Validate the current weights; returns the metrics (every rank gets the same) and updates the
        bookkeeping (:attr:`improved`, :attr:`should_stop`)."""
        t0 = time.perf_counter()
        if self.batches is None:  # encoded once, kept on the host
            self.batches = self.stream.validation_batches()
        sums = torch.zeros(7, device=self.device, dtype=torch.float64)
        beta = self.config.method.beta
        for batch, weight in self.batches:
            batch = batch.to(self.device)
            w = weight.to(self.device, torch.float64)
            self.begin_micro_batch(batch)
            inputs = self._inputs(batch)
            out = self.method(inputs, models.callables)
            if self.dpo_view is not None:
                dpo = self.dpo_view(self._inputs(batch), models.callables).dpo
                B = w.shape[0]
                pair_loss = dpo.model_mse[:B].double()  # SFT's loss: the winners' MSE, at the same noise and t
                dpo_loss = preference_loss(dpo.logits.double(), beta, "sigmoid")
            else:
                dpo = out.dpo
                pair_loss = preference_loss(dpo.logits.double(), beta, "sigmoid")
                dpo_loss = pair_loss
            logits = dpo.logits.double()
            acc = (logits > 0).double() + 0.5 * (logits == 0).double()
            m, r = dpo.model_mse.double(), dpo.ref_mse.double()
            w2 = w.repeat(2)
            sums += torch.stack([(w * pair_loss).sum(), (w * acc).sum(), (w * logits).sum(), (w * dpo_loss).sum(),
                                 (w2 * (m - r).abs()).sum(), (w2 * r).sum(), w.sum()])
        sums = self.reduce(sums)  # one collective per validation (DeepSpeed)
        loss, acc, margin, dpo_loss, gap, ref, n = sums.tolist()  # the one host read of a validation
        row = {"val_loss": loss / n, "val_implicit_acc": acc / n, "val_reward_margin": margin / n,
               # Inversion-DPO's reference error is 0: the gap is then the mean distance D itself
               "val_model_ref_gap": gap / ref if ref > 0 else gap / (2 * n)}
        if self.dpo_view is not None:
            row["val_dpo_loss"] = dpo_loss / n
        # (n itself was averaged over ranks with the sums — their ratios are what count — so the count is the stream's)
        row["val_pairs"] = len(self.stream.validation_indices)
        row["val_seconds"] = time.perf_counter() - t0
        self._update(step, row[self.metric])
        return row

    def _inputs(self, batch):
        inputs = self.make_inputs(batch, self.stream.empty, self.config, self.device)
        inputs.rows = None  # validation pairs never touch per-pair caches (the Inversion-DPO trajectory cache)
        return inputs

    def _update(self, step: int, value: float) -> None:
        better = (self.best_value is None and math.isfinite(value)) or (
            self.best_value is not None and math.isfinite(value)
            and (value > self.best_value if HIGHER_IS_BETTER[self.metric] else value < self.best_value))
        self.improved = better
        if better:
            self.best_value, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows of a validation."""
        return {"val_acc": f"{row['val_implicit_acc']:.3f}", "val_loss": f"{row['val_loss']:.4g}"}
