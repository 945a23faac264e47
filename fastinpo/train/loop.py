"""``fastinpo train``: the training loop.

One optimizer step = ``grad_accum`` micro-batches of ``pairs_per_batch`` pairs. Per micro-batch: a fresh VAE
posterior sample ``z0``, caption dropout per pair, the method's loss (SPEC §2–5), backward. Per optimizer step:
gradient clipping, the optimizer (a non-finite loss or gradient skips the update on the device), the LR
schedule. Between logging steps nothing reads a device value on the host: metrics accumulate on the device and
are read once per ``log_every`` steps. Randomness is a function of (seed, micro-step), data order of (seed,
position), so ``--resume latest`` continues exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastinpo.config import Config, save_config
from fastinpo.data.batch import EncodedBatch
from fastinpo.methods import build_method
from fastinpo.methods.base import PairRandomness, StepInputs
from fastinpo.ops.schedule import NoiseSchedule
from fastinpo.train import checkpoint as ckpt
from fastinpo.train.data_source import PairStream
from fastinpo.train.models import DTYPES, build_lr_scheduler, build_models, build_optimizer
from fastinpo.train.validation import ValidationGrids


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available")
    return device


def make_step_inputs(batch: EncodedBatch, empty, config: Config, device: torch.device) -> StepInputs:
    """z0 (a fresh posterior sample), caption dropout per pair, the UNet conditioning of [winners; losers]; all
    randomness per pair, from its position in the data stream (see :class:`PairRandomness`)."""
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
    cond = {"encoder_hidden_states": prompt.repeat(2, 1, 1)}
    if pooled is not None:
        cond["text_embeds"] = pooled.repeat(2, 1)
        cond["time_ids"] = batch.time_ids
    return StepInputs(z0.float(), cond, rng, batch.rows)


class MetricsLog:
    """Device-side metric sums between logging steps; one host read per log; metrics.jsonl + TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, *, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.path = out_dir / "metrics.jsonl"
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # per key: per-micro-batch metrics and per-step ones mix
        self.writer = None
        if rank != 0:  # under DeepSpeed only rank 0 writes; the others only take part in the reduction
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
        if self.world_size > 1 and stacked is not None:
            # the one collective of a log step: every rank logs the same keys the same number of times, so the
            # mean over ranks of per-rank means is the mean over the global batch
            torch.distributed.all_reduce(stacked)
            stacked = stacked / self.world_size
        values = stacked.tolist() if stacked is not None else []  # the one host read
        row = {"step": step, **{k: v / self.counts[k] for k, v in zip(keys, values, strict=True)}, **extra}
        self.sums, self.counts = {}, {}
        if self.rank != 0:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        return row

    def close(self):
        if self.writer is not None:
            self.writer.close()


class NonFiniteLossError(RuntimeError):
    pass


class StepCounter:
    """Where a run is and its non-finite-step bookkeeping, shared by the single-process and DeepSpeed loops: the
    step counts on the host, the non-finite counts on the device (read on the host only at logging steps and
    checkpoints, so the hot loop has no sync)."""

    def __init__(self, saved: dict, start_step: int, last_step: int, device: torch.device):
        self.step = self.start_step = start_step
        self.last_step = last_step
        self.consecutive = torch.tensor(float(saved["consecutive_nan"]), device=device)
        self.nan_total = torch.tensor(float(saved["nan_steps"]), device=device)
        self.t_log = time.perf_counter()
        self.steps_since_log = 0

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
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", pairs_s=f"{row['pairs_per_s']:.2f}")
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


def train(config: Config, *, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) a training run; returns a summary. ``stop_after`` ends the run after that many optimizer
    steps of this invocation (with a checkpoint), as an interruption would."""
    from tqdm.auto import tqdm

    from fastinpo.models.sd import Encoder, load_components

    config.validate()
    if config.distributed.backend == "deepspeed":
        from fastinpo.train.engine_deepspeed import train_deepspeed

        return train_deepspeed(config, resume=resume, stop_after=stop_after)
    out_dir = Path(config.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.train.device)
    removed = ckpt.remove_partial(out_dir)
    resume_from = ckpt.resolve_resume(out_dir, resume)

    use_cache = bool(config.data.cache_dir)
    components = load_components(config.model.path, load_vae=not use_cache, load_text=not use_cache,
                                 dtype=DTYPES[config.model.encoder_dtype])
    schedule = NoiseSchedule.from_config(components.scheduler_config)
    method = build_method(config.method, schedule)
    encoder = None if use_cache else Encoder(components, device)
    stream = PairStream(config, model_folder=config.model.path, device=device, encoder=encoder)
    models = build_models(config, components.unet, device)
    if config.method.trajectory_cache_dir:
        from fastinpo.data.trajectory_cache import open_for_run

        method.trajectory_cache = open_for_run(config, stream, models, schedule, device)
    pairs_per_step = config.train.pairs_per_batch * config.train.grad_accum
    optimizer = build_optimizer(config, models.trainable, device, pairs_per_step)
    lr_scheduler = build_lr_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.type) if config.train.mixed_precision == "fp16" else None
    trainable = dict(zip(models.trainable_names, models.trainable, strict=True))

    state = {"nan_steps": 0, "consecutive_nan": 0}
    start_step = 0
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, trainable=trainable, optimizer=optimizer,
                                     lr_scheduler=lr_scheduler, scaler=scaler)
        start_step = int(saved["step"])
        state.update({k: saved[k] for k in state})
        models.refresh_inversion_copy()
    elif resume is not None and resume != "latest":
        raise FileNotFoundError(f"no checkpoint at {resume}")
    save_config(config, out_dir / "config.yaml")

    log = MetricsLog(out_dir, start_step)
    grids = ValidationGrids(config, out_dir, device)
    fused_skip = getattr(optimizer, "_step_supports_amp_scaling", False) and scaler is None
    batches = stream.batches(start_step * config.train.grad_accum)
    last_step = min(config.train.max_steps, start_step + stop_after) if stop_after else config.train.max_steps
    counter = StepCounter(state, start_step, last_step, device)
    bar = tqdm(total=config.train.max_steps, initial=start_step, unit="step", disable=not config.train.progress,
               desc=f"{config.method.name} {'lora' if models.lora else 'full'}")

    def save(step_now: int) -> Path:
        return ckpt.save_checkpoint(
            out_dir, step_now, trainable=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
            state={**counter.checkpoint_state(), "method": config.method.name, "lora": models.lora},
            keep_last=config.train.keep_last)

    try:
        while counter.step < last_step:
            optimizer.zero_grad(set_to_none=True)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            for _ in range(config.train.grad_accum):
                inputs = make_step_inputs(next(batches), stream.empty, config, device)
                scale = 1.0 / config.train.grad_accum
                out = method(inputs, models.callables, loss_scale=scale)
                if not out.backward_done:
                    loss = out.loss * scale
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                bad |= ~torch.isfinite(out.loss)
                log.add(out.metrics)
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = config.optim.max_grad_norm
            grad_norm = (torch.nn.utils.clip_grad_norm_(models.trainable, max_norm) if max_norm > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in models.trainable if p.grad is not None]))
            bad |= ~torch.isfinite(grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif fused_skip:  # the fused optimizer skips the whole update on the device when bad is set
                optimizer.grad_scale, optimizer.found_inf = None, bad.float()
                optimizer.step()
            elif not bool(bad):  # optimizers without device-side skipping: one host read per step
                optimizer.step()
            lr_scheduler.step()
            models.refresh_inversion_copy()
            counter.end_step(bad, grad_norm, log, bar)
            counter.report_if_due(log, bar, config, lr=lambda: lr_scheduler.get_last_lr()[0],
                                  pairs_per_step=pairs_per_step, skipped_rows=lambda: sum(stream.skipped.values()),
                                  save=save)
            if config.train.sample_every and counter.step % config.train.sample_every == 0:
                grids(counter.step, models.unet)
            if counter.checkpoint_due(config):
                save(counter.step)
        step = counter.step
        final = save(step)
    finally:
        bar.close()
        log.close()

    summary = {"step": step, "checkpoint": str(final), "skipped_rows": stream.skipped,
               "removed_partial_checkpoints": [str(p) for p in removed], "pairs": len(stream)}
    if getattr(method, "trajectory_cache", None) is not None:
        summary["trajectory_cache"] = method.trajectory_cache.stats()
    if step >= config.train.max_steps:
        summary["export"] = str(export(config, models, components, out_dir / "export"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export(config: Config, models, components, out: Path) -> Path:
    """Write the trained policy for a stock diffusers pipeline: ``unet/`` (full) or LoRA safetensors."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if models.lora:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet))
        pipe_cls = StableDiffusionXLPipeline if components.arch == "sdxl" else StableDiffusionPipeline
        pipe_cls.save_lora_weights(tmp / "lora", unet_lora_layers=layers, safe_serialization=True)
    else:
        models.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
