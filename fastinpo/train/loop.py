"""``fastinpo train``: the training loop, written once for every configuration.

One optimizer step = ``grad_accum`` micro-batches of ``pairs_per_batch`` pairs (per rank). Per micro-batch: a fresh
VAE posterior sample ``z0``, caption dropout per pair, the method's loss (SPEC §2–5), backward. Per optimizer step:
the engine's step (gradient clipping, the optimizer — a non-finite loss or gradient skips the update on the
device — and the LR schedule). What depends on one process or DeepSpeed ZeRO lives behind the
:class:`~fastinpo.train.engine.Engine` chosen once from ``distributed.backend`` (:func:`make_engine`). Between
logging steps nothing reads a device value on the host: metrics accumulate on the device and are read once per
``log_every`` steps, and once per preference validation (``train.validate_every``:
:mod:`fastinpo.train.preference_validation`, which has its own random streams, so it never changes the training).
Randomness is a function of (seed, micro-step), data order of (seed, position), so ``--resume latest`` continues
exactly.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastinpo.config import Config, check_before_loading, save_config
from fastinpo.data.batch import EncodedBatch
from fastinpo.methods import build_method
from fastinpo.methods.base import PairRandomness, StepInputs
from fastinpo.models.family import FAMILIES, ModelFamily, family_for_folder
from fastinpo.train import checkpoint as ckpt
from fastinpo.train import run_folder
from fastinpo.train.data_source import PairStream
from fastinpo.train.engine import Engine
from fastinpo.train.models import DTYPES, base_weight_dtype
from fastinpo.train.preference_validation import PreferenceValidator
from fastinpo.train.validation import ValidationGrids


def make_engine(config: Config) -> Engine:
    """The engine of ``distributed.backend``: one process, or DeepSpeed ZeRO (imported only then)."""
    if config.distributed.backend == "deepspeed":
        from fastinpo.train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(config)
    from fastinpo.train.engine_plain import PlainEngine

    return PlainEngine(config)


def make_step_inputs(batch: EncodedBatch, empty, config: Config, device: torch.device,
                     family: ModelFamily | None = None) -> StepInputs:
    """z0 (a fresh posterior sample), caption dropout per pair, the denoiser's conditioning of [winners; losers]
    (``family.conditioning``; default: the UNet family's); all randomness per pair, from its position in the data
    stream (see :class:`PairRandomness`)."""
    rng = PairRandomness.for_positions(config.train.seed, batch.positions.tolist(), device)
    z0 = batch.latent_mean
    if config.data.latent_sample and batch.latent_std is not None:
        eps = rng.randn((2, *z0.shape[1:]), device, z0.dtype)  # (B, 2, ...): one draw per pair for both images
        z0 = z0 + batch.latent_std * torch.cat([eps[:, 0], eps[:, 1]], 0)
    prompt, pooled = batch.prompt_embeds, batch.pooled_embeds
    p = config.data.caption_dropout
    if p > 0:  # one draw per pair: both images of a pair see the same (possibly empty) caption
        drop = rng.rand(device) < p
        prompt = torch.where(drop.view(-1, 1, 1), empty.prompt_embeds.to(prompt.dtype), prompt)
        if pooled is not None:
            pooled = torch.where(drop.view(-1, 1), empty.pooled.to(pooled.dtype), pooled)
    family = family or FAMILIES["unet"]
    cond = family.conditioning(prompt.repeat(2, 1, 1), None if pooled is None else pooled.repeat(2, 1),
                               batch.time_ids)
    return StepInputs(z0.float(), cond, rng, batch.rows)


class MetricsLog:
    """Device-side metric sums between logging steps; one host read per log; metrics.jsonl + TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, *, is_main: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.is_main, self.reduce = is_main, reduce
        self.path = out_dir / "metrics.jsonl"
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # per key: per-micro-batch metrics and per-step ones mix
        self.writer = None
        if not is_main:  # under DeepSpeed only rank 0 writes; the others only take part in the reduction
            return
        if self.path.exists():  # a resumed run rewrites what came after its checkpoint
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency; a broken install only loses the TensorBoard copy
            self.writer = None

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) if keys else None
        if self.reduce is not None and stacked is not None:
            stacked = self.reduce(stacked)  # the one collective of a log step (Engine.reduce_metrics)
        values = stacked.tolist() if stacked is not None else []  # the one host read
        row = {"step": step, **{k: v / self.counts[k] for k, v in zip(keys, values, strict=True)}, **extra}
        self.sums, self.counts = {}, {}
        if not self.is_main:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        return row

    def write_row(self, step: int, row: dict[str, float]) -> None:
        """A row of host values (a validation's metrics) to metrics.jsonl and TensorBoard (rank 0)."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _validate(validator: PreferenceValidator, counter, models, log: MetricsLog, bar, save, out_dir: Path,
              config: Config, is_main: bool) -> bool:
    """A validation step: the metrics to the log and the bar, and the best checkpoint kept (``train.keep_best``).
    Returns whether it wrote this step's checkpoint."""
    row = validator(counter.step, models)
    log.write_row(counter.step, row)
    counter.postfix = validator.postfix(row)
    bar.set_postfix(**counter.postfix)
    if not (validator.keep_best and validator.improved):
        return False
    save(counter.step)
    if is_main:
        ckpt.mark_best(out_dir, counter.step, {"metric": validator.metric, "value": validator.best_value},
                       config.train.keep_last)
    return True


class NonFiniteLossError(RuntimeError):
    pass


class StepCounter:
    """Where a run is and its non-finite-step bookkeeping, whatever the engine: the
    step counts on the host, the non-finite counts on the device (read on the host only at logging steps and
    checkpoints, so the hot loop has no sync)."""

    def __init__(self, saved: dict, start_step: int, last_step: int, device: torch.device):
        self.step = self.start_step = start_step
        self.last_step = last_step
        self.consecutive = torch.tensor(float(saved["consecutive_nan"]), device=device)
        self.nan_total = torch.tensor(float(saved["nan_steps"]), device=device)
        self.t_log = time.perf_counter()
        self.steps_since_log = 0
        self.postfix: dict[str, str] = {}  # the last validation's, kept on the progress bar

    def checkpoint_state(self) -> dict[str, int]:
        """What a checkpoint stores of the counters (host reads: at checkpoints only)."""
        return {"nan_steps": int(self.nan_total.item()), "consecutive_nan": int(self.consecutive.item())}

    def end_step(self, bad: torch.Tensor, grad_norm: torch.Tensor, log: MetricsLog, bar) -> None:
        """After an optimizer step (``bad``: a device bool, the step was skipped as non-finite)."""
        self.consecutive = torch.where(bad, self.consecutive + 1, torch.zeros_like(self.consecutive))
        self.nan_total = self.nan_total + bad.float()
        log.add({"grad_norm": grad_norm.detach()})
        self.step += 1
        self.steps_since_log += 1
        bar.update(1)

    def report_if_due(self, log: MetricsLog, bar, config: Config, *, lr, pairs_per_step: int, skipped_rows,
                      save) -> None:
        """At a logging step (the first of this invocation, every ``log_every``, the last) — the only host reads
        of the loop: flush the metrics, update the bar, and stop the run — with a checkpoint — after
        ``train.max_nan_steps`` consecutive non-finite steps. ``lr`` and ``skipped_rows`` are called only then."""
        step = self.step
        if not (step == self.start_step + 1 or step % config.train.log_every == 0 or step == self.last_step):
            return
        now = time.perf_counter()
        row = log.flush(step, {"lr": lr(), "pairs_per_s": self.steps_since_log * pairs_per_step /
                               max(now - self.t_log, 1e-9),
                               "nan_steps": float(self.nan_total.item()), "skipped_rows": float(skipped_rows())})
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", pairs_s=f"{row['pairs_per_s']:.2f}",
                        **self.postfix)
        if self.consecutive.item() >= config.train.max_nan_steps:
            path = save(step)
            raise NonFiniteLossError(
                f"{int(self.consecutive.item())} consecutive optimizer steps had a non-finite loss or gradient "
                f"(train.max_nan_steps = {config.train.max_nan_steps}); stopped at step {step} with a "
                f"checkpoint in {path}. Lower the learning rate or check the data.")
        self.t_log, self.steps_since_log = now, 0

    def checkpoint_due(self, config: Config) -> bool:
        """A periodic checkpoint (the final one is written after the loop)."""
        every = config.train.checkpoint_every
        return bool(every) and self.step % every == 0 and self.step < self.last_step


def train(config: Config, *, resume: str | None = None, stop_after: int | None = None,
          overwrite: bool = False) -> dict:
    """Run (or resume) a training run, in one process or as one rank of a DeepSpeed launch; returns a summary.

    ``stop_after`` ends the run after that many optimizer steps of this invocation (with a checkpoint), as an
    interruption would. A ``train.output_dir`` that holds a run is refused unless resuming, or with ``overwrite``
    moved aside first; a resume may change only the run's length and cadence (:mod:`fastinpo.train.run_folder`).
    A start that fails before training begins removes the output folder if this call created it."""
    config.validate()
    check_before_loading(config)  # everything the config alone can reveal, before any weight loads
    out_dir = Path(config.train.output_dir)
    created = not out_dir.exists()
    engine = make_engine(config)
    try:
        run = _start(config, out_dir, engine, resume=resume, overwrite=overwrite, stop_after=stop_after)
    except BaseException:
        if created and engine.is_main and out_dir.is_dir():
            shutil.rmtree(out_dir)  # only what this failed start wrote: the folder did not exist before it
        raise
    return _loop(config, out_dir, engine, run)


def _start(config: Config, out_dir: Path, engine: Engine, *, resume: str | None, overwrite: bool,
           stop_after: int | None) -> dict:
    """Everything before the first step: the output folder, the resume point and its config check, the models,
    the data, the checkpoint's state; prints the start report. Returns what the loop needs."""
    device = engine.device
    run_folder.claim_output_dir(out_dir, resume=resume, overwrite=overwrite, is_main=engine.is_main)
    engine.barrier()  # a run moved aside by rank 0 is gone for every rank
    removed: list[Path] = []
    if engine.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_partial(out_dir)
    engine.barrier()  # no rank looks for checkpoints while rank 0 removes partial ones
    engine.check_output_dir(out_dir)
    resume_from = ckpt.resolve_resume(out_dir, resume)
    engine.check_resume_point(resume_from)
    if resume_from is None and resume is not None and resume != "latest":
        raise FileNotFoundError(f"no checkpoint at {resume}")
    if resume_from is None and resume == "latest" and engine.is_main:
        print(f"fastinpo train: --resume latest: no checkpoint in {ckpt.checkpoint_dir(out_dir)}; starting at "
              "step 0")
    if resume_from is not None:
        run_folder.check_resume_config(config, resume_from, out_dir, world_size=engine.world_size)

    use_cache = bool(config.data.cache_dir)
    family = family_for_folder(config.model.path)
    encode = not use_cache or bool(config.data.validation_path)  # a validation source is encoded when read
    # a half-precision LoRA base loads in its dtype: a float32 load first would double the base's peak memory
    components = family.load_components(config.model.path, load_vae=encode, load_text=encode,
                                        dtype=DTYPES[config.model.encoder_dtype],
                                        unet_dtype=base_weight_dtype(config, device))
    schedule = family.build_schedule(components.scheduler_config)
    method = build_method(config.method, schedule)
    encoder = None if not encode else family.make_encoder(components, device, vae_slicing=config.data.vae_slicing,
                                                          vae_tiling=config.data.vae_tiling)
    stream = PairStream(config, model_folder=config.model.path, device=device, encoder=encoder,
                        rank=engine.rank, world_size=engine.world_size)
    pairs_per_step = config.train.pairs_per_batch * config.train.grad_accum * engine.world_size
    engine.wrap(components.unet, schedule, pairs_per_step)
    if config.method.trajectory_cache_dir:  # one process only (Config.validate)
        from fastinpo.data.trajectory_cache import open_for_run

        method.trajectory_cache = open_for_run(config, stream, engine.models, schedule, device)

    state = {"nan_steps": 0, "consecutive_nan": 0, "validation": None}
    start_step = 0
    if resume_from is not None:
        saved = engine.load_checkpoint(resume_from)
        start_step = int(saved["step"])
        state.update({k: saved.get(k) for k in state})
        stream.restore_skips(saved.get("late_skipped_rows", {}))
    if engine.is_main:
        for line in run_folder.start_report(config, device=device, label=engine.label, stream=stream,
                                            pairs_per_step=pairs_per_step, start_step=start_step,
                                            resumed_from=resume_from):
            print(f"fastinpo train: {line}")
        save_config(config, out_dir / "config.yaml")
        engine.write_settings(out_dir)
    last_step = min(config.train.max_steps, start_step + stop_after) if stop_after else config.train.max_steps
    return {"components": components, "family": family, "method": method, "schedule": schedule, "stream": stream,
            "pairs_per_step": pairs_per_step, "state": state, "start_step": start_step,
            "last_step": last_step, "removed": removed}


def _loop(config: Config, out_dir: Path, engine: Engine, run: dict) -> dict:
    """The optimizer steps, the final checkpoint, the export and the summary."""
    from tqdm.auto import tqdm

    device, models, stream, method = engine.device, engine.models, run["stream"], run["method"]
    start_step, last_step, pairs_per_step = run["start_step"], run["last_step"], run["pairs_per_step"]
    log = MetricsLog(out_dir, start_step, is_main=engine.is_main, reduce=engine.reduce_metrics)
    grids = ValidationGrids(config, out_dir, device)
    # validation builds its inputs exactly as training does, for the run's model family
    validator = PreferenceValidator(config, stream, method, run["schedule"], device,
                                    functools.partial(make_step_inputs, family=run["family"]),
                                    engine.reduce_metrics, engine.begin_micro_batch, run["state"]["validation"])
    batches = stream.batches(start_step * config.train.grad_accum)
    counter = StepCounter(run["state"], start_step, last_step, device)
    bar = tqdm(total=config.train.max_steps, initial=start_step, unit="step",
               disable=not (config.train.progress and engine.is_main),
               desc=f"{config.method.name} {'lora' if models.lora else 'full'}{engine.label}")
    scale = 1.0 / config.train.grad_accum

    last_saved: list = [None, None]  # (step, path): a step is checkpointed once, however many reasons it has

    def save(step_now: int) -> Path:
        if last_saved[0] == step_now:
            return last_saved[1]
        last_saved[:] = [step_now, _save(step_now)]
        return last_saved[1]

    def _save(step_now: int) -> Path:
        return engine.save_checkpoint(out_dir, step_now, {
            **counter.checkpoint_state(), **validator.checkpoint_state(), "method": config.method.name,
            "lora": models.lora,
            "config": config.to_dict(), "late_skipped_rows": stream.late_skips(),
            **engine.checkpoint_state()}, config.train.keep_last)

    stopped_early = None
    try:
        while counter.step < last_step:
            engine.begin_step()
            for _ in range(config.train.grad_accum):
                batch = next(batches)
                engine.begin_micro_batch(batch)
                inputs = make_step_inputs(batch, stream.empty, config, device, run["family"])
                out = method(inputs, models.callables, loss_scale=scale)
                log.add(out.metrics)
                engine.backward(out, scale)
            bad, grad_norm = engine.step()
            models.refresh_inversion_copy()
            counter.end_step(bad, grad_norm, log, bar)
            counter.report_if_due(log, bar, config, lr=engine.lr, pairs_per_step=pairs_per_step,
                                  skipped_rows=lambda: sum(stream.skipped.values()), save=save)
            if config.train.sample_every and counter.step % config.train.sample_every == 0:
                grids(counter.step, models.unet)
            saved_now = validator.due(counter.step) and _validate(validator, counter, models, log, bar, save,
                                                                  out_dir, config, engine.is_main)
            if counter.checkpoint_due(config) and not saved_now:
                save(counter.step)
            if validator.should_stop:
                stopped_early = {"step": counter.step, "best_step": validator.best_step, "metric": validator.metric,
                                 "best_value": validator.best_value}
                if engine.is_main:
                    print(f"fastinpo train: early stopping at step {counter.step}: {validator.metric} has not "
                          f"improved for {validator.since_best} validations (train.early_stopping_patience = "
                          f"{validator.patience}); best {validator.best_value} at step {validator.best_step}")
                break
        step = counter.step
        final = save(step)
    finally:
        bar.close()
        log.close()

    summary = {"step": step, "checkpoint": str(final), "skipped_rows": stream.skipped,
               "removed_partial_checkpoints": [str(p) for p in run["removed"]], "pairs": len(stream),
               **engine.summary()}
    if getattr(method, "trajectory_cache", None) is not None:
        summary["trajectory_cache"] = method.trajectory_cache.stats()
    if validator.every:
        best = ckpt.best_checkpoint(out_dir)
        summary["validation"] = {**validator.checkpoint_state()["validation"],
                                 "best_checkpoint": str(best[1]) if best else None}
    if stopped_early is not None:
        summary["stopped_early"] = stopped_early
    if step >= config.train.max_steps or stopped_early is not None:
        summary["export"] = str(engine.export(out_dir / "export", run["components"].arch))
    if engine.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
