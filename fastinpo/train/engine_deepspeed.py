"""The DeepSpeed ZeRO engine (``distributed.backend = "deepspeed"``) of ``fastinpo train``, one process per GPU:
:class:`DeepSpeedEngine`, the :class:`fastinpo.train.engine.Engine` the one training loop
(:func:`fastinpo.train.loop.train`) runs over, and what it is made of (process group, DeepSpeed config, the
sharded models, gathers).

Launch with ``torchrun --nproc_per_node N -m fastinpo.cli train CONFIG`` (or the ``deepspeed`` launcher, or
``accelerate launch``); rank and world size come from the environment. What differs from the one-process engine
(:mod:`fastinpo.train.engine_plain`), and why:

- The DeepSpeed config is a preset (``configs/deepspeed/``) whose batch sizes, gradient accumulation, clipping,
  optimizer and precision are filled in from the trainer config; a preset value that contradicts it is an error,
  so the two cannot disagree.
- The policy UNet is handed to DeepSpeed on the CPU and sharded there (ZeRO-3), one parameter at a time. Frozen
  modules (reference copy, inversion copy, VAE, text encoders) are built outside any ``zero.Init`` and stay
  ordinary modules; the reference can instead be sharded by a second, inference-only ZeRO-3 engine.
- Data: rank r of W takes its own slice of every global batch (:class:`PairStream`); with all randomness per
  pair, a W-rank run with B pairs per rank is the same training as one process with W·B pairs per micro-batch.
- Gradients go through ``engine.backward`` (also for methods that back-propagate themselves, via
  ``Models.backward``, several times per micro-batch). ZeRO-3 counts micro-batches itself (``engine.step``
  after every micro-batch, an update at the accumulation boundary). ZeRO-0/1/2 run with DeepSpeed's unmanaged
  accumulation (``managed_gradient_accumulation = false``: every ``engine.backward`` accumulates, the one
  ``engine.step`` per optimizer step is the boundary): with managed accumulation, stage 2 rebuilds the reduced
  gradient partition from the *current* backward at each backward of the boundary micro-batch, so a method that
  back-propagates N times per micro-batch (Inversion-DPO's memory-light gradient) lost all but part of its
  gradient (measured on 2 ranks with 2 backward calls: max error 0.55 on a gradient of ~1; unmanaged: 1e-7).
  DeepSpeed skips a step whose gradient norm is not finite, in every precision.
- ``zero_optimization.memory_efficient_linear`` is always false: at stage 3 DeepSpeed otherwise replaces
  ``torch.nn.functional.linear`` *for the whole process* by a wrapper that computes ``x @ W.T`` and adds the
  bias in a second rounding, which in fp16/bf16 moves every frozen half-precision module (reference UNet,
  inversion copy, VAE, text encoders) by up to ~1e-2 and the step-1 DPO loss by ~4e-2.
  :func:`build_engine` also checks after ``deepspeed.initialize`` that ``torch.nn.functional.linear`` is torch's
  own and restores it if anything replaced it.
- Metrics: one all-reduce per logging step, rank 0 writes. Checkpoints: every rank writes its shards into one
  temporary folder, rank 0 adds ``state.json`` and renames it after a barrier (same atomic contract as
  :mod:`fastinpo.train.checkpoint`). Export: consolidated ``unet/`` or LoRA weights, gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from fastinpo.config import Config
from fastinpo.methods.base import Models
from fastinpo.models.export import export_policy
from fastinpo.train import checkpoint as ckpt
from fastinpo.train.engine import Engine
from fastinpo.train.models import (
    DTYPES,
    _unet_forward,
    build_lr_scheduler,
    make_inversion_copy,
    make_reference_copy,
    prepare_policy,
)

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
PRESETS = ("zero2", "zero3", "zero3_offload")
DS_TAG = "ds"  # the DeepSpeed tag folder inside a fastinpo checkpoint folder
GATHER_NUMEL = 1 << 27  # elements gathered at once when consolidating (512 MiB in fp32): bounds the GPU peak


# ----------------------------------------------------------------------------------------------- environment
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(config: Config) -> DistEnv:
    """Join the process group of the launch (torchrun / deepspeed / accelerate set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); NCCL on CUDA, gloo on the CPU."""
    import deepspeed

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"distributed.backend = 'deepspeed' but {', '.join(missing)} is not set: launch with "
                           "torchrun, the deepspeed launcher or accelerate launch")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = config.train.device
    use_cuda = torch.cuda.is_available() and want in ("auto", "cuda") or want.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist = config.distributed
    if dist.socket_ifname:
        # gloo and NCCL otherwise pick the interface the hostname resolves to: loopback on many clusters, where
        # the first node fails at once and the other waits for a peer that can never connect
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = dist.socket_ifname
    backend = "nccl" if use_cuda else "gloo"
    if not torch.distributed.is_initialized():
        # a single process started without a launcher still gets a (1-rank) group: DeepSpeed needs one
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        # torch's process group first, under a watchdog: when every node reached the store but gloo's connections
        # cannot complete (loopback), the waiting node's own timeouts add up to ~5 x timeout_s (measured 15, 50,
        # 100 s for 3, 10, 20 s); the watchdog ends it at 1 x plus a grace. DeepSpeed's own start-up (which may
        # build its CPU communication op, minutes the first time) comes after, outside the bound.
        watchdog = threading.Timer(dist.timeout_s + STARTUP_GRACE_S, _startup_expired, args=(dist.timeout_s,))
        watchdog.daemon = True
        watchdog.start()
        try:
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=dist.timeout_s))
        except Exception as err:  # noqa: BLE001 - re-raised with what a cluster user needs to know
            raise RuntimeError(startup_failure_message(err, dist.timeout_s)) from err
        finally:
            watchdog.cancel()
    # wraps the group started above (or the launcher's) in DeepSpeed's communication layer
    deepspeed.init_distributed(dist_backend=backend, verbose=False,
                               timeout=timedelta(seconds=dist.timeout_s))
    return DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


#: seconds the start-up watchdog adds to distributed.timeout_s, so that torch's own timeout error (which names the
#: store or peer it waited on) comes first whenever torch raises one
STARTUP_GRACE_S = 5.0


def _startup_expired(timeout_s: float) -> None:
    """The start-up watchdog's end: the main thread is blocked inside the process group's C++ start-up and cannot
    be interrupted, so say why on stderr and end the process (nothing is written before this point: nothing is
    lost); the launcher then stops the other local ranks."""
    err = TimeoutError(f"the process group's start-up was still blocked after {timeout_s + STARTUP_GRACE_S:g} s "
                       "(every rank reached the rendezvous store, but the connections between ranks did not "
                       "complete)")
    print(f"[fastinpo] {startup_failure_message(err, timeout_s)}", file=sys.stderr, flush=True)
    os._exit(1)


def startup_failure_message(err: BaseException, timeout_s: float) -> str:
    """Why joining the process group failed, with the likely causes on a cluster (the launcher's error alone is
    a bare store timeout)."""
    env = {k: os.environ.get(k, "unset") for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                   "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    return (f"rank {env['RANK']} of {env['WORLD_SIZE']} could not join the process group within "
            f"distributed.timeout_s = {timeout_s:g} s (MASTER_ADDR={env['MASTER_ADDR']}, "
            f"MASTER_PORT={env['MASTER_PORT']}, GLOO_SOCKET_IFNAME={env['GLOO_SOCKET_IFNAME']}, "
            f"NCCL_SOCKET_IFNAME={env['NCCL_SOCKET_IFNAME']}). Likely causes: a peer rank never started or "
            "died; the hostname resolves to 127.0.0.1 so gloo/NCCL listen on loopback (set "
            "distributed.socket_ifname to the interface the nodes share, e.g. eth0 — `ip -br addr` lists them); "
            "MASTER_ADDR is not reachable from this node or the port is firewalled. "
            f"Original error: {type(err).__name__}: {str(err)[:500]}")


def collective_timeout_message(err: BaseException, rank: int, world_size: int, waited_on: str,
                               timeout_s: float) -> str | None:
    """A clear message when ``err`` is a collective that timed out (None for any other error)."""
    text = str(err)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    return (f"rank {rank} of {world_size} waited distributed.timeout_s = {timeout_s:g} s on {waited_on} and "
            "gave up: another rank died, hangs, or the network link between the nodes is down (the first rank "
            "to fail usually names the real cause; resume with --resume latest once all ranks can run). "
            f"Original error: {type(err).__name__}: {text[:500]}")


# ----------------------------------------------------------------------------------------------- DeepSpeed config
def load_preset(spec: str) -> dict[str, Any]:
    """A preset name (``zero2``, ``zero3``, ``zero3_offload``) or a path to a DeepSpeed JSON."""
    path = PRESET_DIR / f"{spec}.json" if spec in PRESETS else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"distributed.deepspeed_config = {spec!r}: no such preset or file "
                                f"(presets: {', '.join(PRESETS)} in {PRESET_DIR})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from None


def _fill(ds: dict, keys: tuple[str, ...], value, source: str) -> None:
    """Set ``ds[k1][k2]...`` to ``value``; a preset value other than "auto" that differs is an error."""
    node = ds
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    have = node.get(keys[-1], "auto")
    if have != "auto" and have != value:
        raise ValueError(f"DeepSpeed config: {'.'.join(keys)} = {have!r} contradicts the trainer config "
                         f"({source} gives {value!r}); set it to \"auto\" or remove it — the trainer fills it in")
    node[keys[-1]] = value


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def fill_deepspeed_config(config: Config, preset: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the preset plus everything the trainer config decides."""
    ds = copy.deepcopy(preset)
    t, o = config.train, config.optim
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"DeepSpeed config: remove the {key!r} section — the trainer builds it from [optim] "
                             "so that the two cannot disagree")
    if zero_stage(ds) not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be 0..3, got {zero_stage(ds)}")
    _fill(ds, ("train_micro_batch_size_per_gpu",), t.pairs_per_batch, "train.pairs_per_batch")
    _fill(ds, ("gradient_accumulation_steps",), t.grad_accum, "train.grad_accum")
    _fill(ds, ("train_batch_size",), t.pairs_per_batch * t.grad_accum * world_size,
          f"train.pairs_per_batch x train.grad_accum x {world_size} ranks")
    # DeepSpeed's default clipping is 1.0: always written, so 0 (off) in the trainer config means off here too
    _fill(ds, ("gradient_clipping",), float(o.max_grad_norm), "optim.max_grad_norm")
    _fill(ds, ("bf16", "enabled"), t.mixed_precision == "bf16", "train.mixed_precision")
    _fill(ds, ("fp16", "enabled"), t.mixed_precision == "fp16", "train.mixed_precision")
    pairs_per_step = t.pairs_per_batch * t.grad_accum * world_size
    lr = o.lr * pairs_per_step if o.scale_lr else o.lr
    if o.optimizer == "adamw":
        params = {"lr": lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        if not offloads_optimizer(ds):
            # torch's AdamW: otherwise DeepSpeed JIT-compiles its fused Adam (minutes, and a CUDA toolchain).
            # With the optimizer offloaded DeepSpeed wants its CPU Adam, which is far faster than torch's on CPU.
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "AdamW", "params": params}
    elif o.optimizer == "adafactor":
        # a client optimizer (built in build_engine); DeepSpeed only vouches for its own under ZeRO
        ds["zero_allow_untested_optimizer"] = True
    else:
        raise ValueError(f"optim.optimizer = {o.optimizer!r} is not supported with distributed.backend = "
                         "'deepspeed'; use 'adamw' or 'adafactor'")
    # always false: at stage 3 DeepSpeed would replace torch.nn.functional.linear process-wide by a wrapper that
    # rounds twice in fp16/bf16 and moves every frozen half-precision module (see the module docstring)
    _fill(ds, ("zero_optimization", "memory_efficient_linear"), False,
          "fastinpo (frozen half-precision modules must compute exactly as in one process)")
    # ZeRO-0/1/2: the caller owns the accumulation boundary (one engine.step per optimizer step), so several
    # engine.backward calls per micro-batch accumulate; ZeRO-3 accumulates them correctly itself and keeps the
    # managed counter (see the module docstring)
    _fill(ds, ("managed_gradient_accumulation",), zero_stage(ds) == 3,
          "fastinpo (several backward calls per micro-batch need unmanaged accumulation below ZeRO-3)")
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own prints would interleave
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# ----------------------------------------------------------------------------------------------- models
def _is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def iter_gathered(named: list[tuple[str, torch.nn.Parameter]], max_numel: int = GATHER_NUMEL
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for ZeRO-3 parameters, gathering a bounded chunk at a time (every rank must
    iterate the same list: the gathers are collectives). Unpartitioned parameters pass through."""
    import deepspeed

    chunk: list[tuple[str, torch.nn.Parameter]] = []
    numel = 0
    for i, (name, p) in enumerate(named):
        chunk.append((name, p))
        numel += int(getattr(p, "ds_numel", p.numel()))
        if numel >= max_numel or i == len(named) - 1:
            parts = [q for _, q in chunk if _is_partitioned(q)]
            with deepspeed.zero.GatheredParameters(parts, modifier_rank=None, enabled=bool(parts)):
                yield from ((n, q.data) for n, q in chunk)
            chunk, numel = [], 0


class InversionLockstep:
    """InPO inverting with the ZeRO-3-sharded policy (no inversion copy): every policy call all-gathers weights, a
    collective, so every rank must make the same number of calls. A pair's inversion takes as many calls as there
    are grid levels below its timestep, so ranks holding different timesteps would call a different number of
    times and the collectives would mismatch (a hang or a gloo/NCCL size error). Timesteps are a function of
    (seed, stream position), so each rank computes every rank's timesteps itself — no communication — and makes
    up the difference with throw-away one-sample calls before its next policy or reference call."""

    def __init__(self, config: Config, schedule, env: DistEnv):
        from fastinpo.methods import build_method
        from fastinpo.ops.schedule import inpo_grid

        self.seed, self.B, self.env = config.train.seed, config.train.pairs_per_batch, env
        self.T = schedule.num_train_timesteps
        # a flow model (SD3): the method's own σ draw and Euler levels give each pair's call count
        self.flow = getattr(build_method(config.method, schedule), "inversion_calls", None)
        if self.flow is None:
            self.levels = inpo_grid(schedule, config.method.inversion_levels).source_levels.tolist()
        self.calls = 0
        self.expected = 0

    def begin(self, positions: list[int]) -> None:
        """Before a micro-batch: the most inversion calls any rank will make for it."""
        from fastinpo.methods.base import PairRandomness

        first = positions[0] - self.env.rank * self.B  # the global batch's first stream position
        everyone = list(range(first, first + self.env.world_size * self.B))
        rng = PairRandomness.for_positions(self.seed, everyone, "cpu")
        if self.flow is not None:
            self.expected = int(self.flow(rng).max())
        else:
            t = rng.timesteps(self.T).tolist()
            self.expected = max(sum(1 for s in self.levels if s < ti) for ti in t)
        self.calls = 0

    def pad(self, forward, x, t, cond) -> None:
        from fastinpo.ops.inversion import slice_cond

        with torch.no_grad():
            while self.calls < self.expected:
                forward(x[:1], t[:1] if torch.is_tensor(t) and t.dim() > 0 else t, slice_cond(cond, 1))
                self.calls += 1


@dataclass
class DistributedModels:
    engine: Any  # the DeepSpeed engine of the policy
    unet: Any  # engine.module
    lora: bool
    callables: Models
    reference_engine: Any | None  # distributed.reference = "sharded"
    inversion_unet: Any | None  # distributed.inversion_copy
    trainable_names: list[str]
    lockstep: InversionLockstep | None = None
    reference_unet: Any | None = None  # the frozen reference copy (None with LoRA and for SFT)

    def refresh_inversion_copy(self) -> None:
        """Copy the policy's current weights into the inversion copy. The weights change only at optimizer steps,
        so refreshing after each step keeps the copy never stale. Only the trainable parameters change."""
        if self.inversion_unet is None:
            return
        target = dict(self.inversion_unet.named_parameters())
        named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        with torch.no_grad():
            for name, full in iter_gathered(named):
                target[name].copy_(full)


def ensure_torch_linear() -> bool:
    """Make ``torch.nn.functional.linear`` torch's own again if DeepSpeed's ZeRO-3 memory-efficient wrapper (or
    anything else DeepSpeed installed) replaced it process-wide; True when something had to be restored. The
    wrapper rounds ``x @ W.T`` and the bias addition separately, which changes fp16/bf16 frozen modules."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    current = torch.nn.functional.linear
    if current is zero3_linear_wrap or getattr(current, "__module__", "").startswith("deepspeed"):
        torch.nn.functional.linear = torch._C._nn.linear  # what torch.nn.functional defines linear as
        return True
    return False


def _ds_forward_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def build_engine(config: Config, unet, env: DistEnv, ds: dict, schedule=None) -> DistributedModels:
    """The policy as a DeepSpeed engine, the reference (replicated copy, sharded inference engine, or the policy
    with LoRA adapters disabled) and the optional replicated inversion copy."""
    import deepspeed

    device = env.device
    unet, lora = prepare_policy(config, unet, device, move=False)
    ref_dtype = DTYPES[config.model.reference_dtype]
    dist = config.distributed
    stage = zero_stage(ds)
    # Copies of frozen modules are made now, from the full float32 weights on the CPU, before ZeRO-3 replaces
    # every parameter of the policy by its shard (a deepcopy afterwards would copy empty shards).
    reference_unet = reference_engine = None
    # SFT trains without a reference; its preference validation (DPO metrics against it) needs one
    if not lora and (config.method.name != "sft" or config.train.validate_every > 0):
        reference_unet = make_reference_copy(unet, ref_dtype)  # train mode: see its docstring
        if dist.reference == "sharded":
            if stage != 3:
                raise ValueError("distributed.reference = 'sharded' needs ZeRO stage 3 (the preset has stage "
                                 f"{stage}); use 'replicated' or a zero3 preset")
            zero = {k: v for k, v in ds["zero_optimization"].items() if k.startswith("stage3_") or k == "offload_param"}
            ref_ds = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                      "gradient_accumulation_steps": ds["gradient_accumulation_steps"],
                      "train_batch_size": ds["train_batch_size"],
                      "zero_optimization": {"stage": 3, **zero, "memory_efficient_linear": False},
                      "bf16": {"enabled": ref_dtype == torch.bfloat16},
                      "fp16": {"enabled": ref_dtype == torch.float16, "auto_cast": False},
                      "steps_per_print": 10**9}
            # no optimizer: an inference-only engine; ZeRO-3 shards it like the policy, with no optimizer state
            reference_engine = deepspeed.initialize(model=reference_unet, config=ref_ds)[0]
            reference_engine.train()  # the reference's mode, as make_reference_copy sets it
            reference_unet = reference_engine.module
        else:
            reference_unet = reference_unet.to(device)
    inversion_unet = None
    copy_dtype = DTYPES.get(dist.inversion_copy) if dist.inversion_copy != "none" else None
    if copy_dtype is not None:
        if stage != 3:
            raise ValueError(f"distributed.inversion_copy is for ZeRO-3 (with stage {stage} every rank already "
                             "holds the whole policy): set it to 'none'")
        inversion_unet = make_inversion_copy(unet, copy_dtype).to(device)

    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    client_optimizer = None
    if config.optim.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        o, t = config.optim, config.train
        lr = o.lr * t.pairs_per_batch * t.grad_accum * env.world_size if o.scale_lr else o.lr
        client_optimizer = Adafactor([p for _, p in trainable], lr=lr, scale_parameter=False, relative_step=False,
                                     warmup_init=False, weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=unet, model_parameters=[p for _, p in trainable], optimizer=client_optimizer, config=ds,
        lr_scheduler=lambda opt: build_lr_scheduler(config, opt))
    # memory_efficient_linear is false in every config built here; a preset path, a DeepSpeed version that
    # ignores the key, or an earlier engine in this process must not leave the frozen modules on DeepSpeed's
    # twice-rounding linear either
    if ensure_torch_linear() and env.is_main:
        print("fastinpo: DeepSpeed had replaced torch.nn.functional.linear process-wide (ZeRO-3 "
              "memory_efficient_linear); restored torch's own so that frozen fp16/bf16 modules compute as in one "
              "process", flush=True)
    module = engine.module
    fwd_dtype = _ds_forward_dtype(ds)
    lockstep = None
    if config.method.name == "inpo" and stage == 3 and copy_dtype is None:
        if schedule is None:
            raise ValueError("build_engine needs the noise schedule for InPO under ZeRO-3 without an inversion copy")
        lockstep = InversionLockstep(config, schedule, env)

    def sharded_no_grad(x, t, cond):
        with torch.no_grad():
            return _unet_forward(module, x, t, cond, fwd_dtype)

    def catch_up(x, t, cond):
        if lockstep is not None:
            lockstep.pad(sharded_no_grad, x, t, cond)

    def policy(x, t, cond):
        catch_up(x, t, cond)
        return _unet_forward(engine, x, t, cond, fwd_dtype)

    if lora:
        def reference(x, t, cond):
            catch_up(x, t, cond)
            module.disable_adapters()
            try:
                with torch.no_grad():
                    return _unet_forward(module, x, t, cond, fwd_dtype).float()
            finally:
                module.enable_adapters()
    else:
        def reference(x, t, cond):
            if reference_unet is None:
                raise RuntimeError("this method has no reference model")
            with torch.no_grad():
                return _unet_forward(reference_unet, x, t, cond, ref_dtype).float()

    inversion = None
    if inversion_unet is not None:
        def inversion(x, t, cond):
            with torch.no_grad():
                return _unet_forward(inversion_unet, x, t, cond, copy_dtype)
    elif lockstep is not None:
        def inversion(x, t, cond):
            lockstep.calls += 1
            return sharded_no_grad(x, t, cond)

    callables = Models(policy, reference, inversion=inversion,
                       backward=lambda loss: engine.backward(loss, scale_wrt_gas=False))
    return DistributedModels(engine, module, lora, callables, reference_engine, inversion_unet,
                             [n for n, _ in trainable], lockstep, reference_unet)


# ----------------------------------------------------------------------------------------------- state dicts
def gathered_state_dict(models: DistributedModels, env: DistEnv, *, trainable_only: bool = False
                        ) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict on rank 0 (None elsewhere; every rank must call). Trainable weights come from
    the optimizer's fp32 master copy when DeepSpeed trains in bf16/fp16, so an export loses no precision."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = models.unet
    low_precision = any(p.dtype != torch.float32 for p in module.parameters() if p.requires_grad)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    out: dict[str, torch.Tensor] = {}
    if low_precision:
        for name, p in named:
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # frozen (no fp32 master): the module's own weights; the list exhausts the gather
                full = [t.float().clone() for _, t in iter_gathered([(name, p)])][0]
            if env.is_main:
                out[name] = full.detach().float().cpu().clone()
    else:
        for name, full in iter_gathered(named):
            if env.is_main:
                out[name] = full.detach().cpu().clone()
    if not trainable_only:
        for name, b in module.named_buffers():
            if env.is_main:
                out[name] = b.detach().cpu().clone()
    return out if env.is_main else None


# ----------------------------------------------------------------------------------------------- the engine
class DeepSpeedEngine(Engine):
    """:class:`fastinpo.train.engine.Engine` under DeepSpeed ZeRO (see the module docstring)."""

    backend = "deepspeed"

    def __init__(self, config: Config):
        if config.train.sample_every:
            raise ValueError("train.sample_every (validation grids) is not supported with distributed.backend = "
                             "'deepspeed' yet: sample from the exported weights or a checkpoint instead")
        super().__init__(config)
        self.env = init_distributed(config)
        self.device, self.rank, self.world_size = self.env.device, self.env.rank, self.env.world_size
        self.ds = fill_deepspeed_config(config, load_preset(config.distributed.deepspeed_config), self.world_size)
        #: the ranks that wrote the checkpoint being resumed, when not this run's (set by check_resume_point)
        self.resume_ranks: int | None = None

    @property
    def label(self) -> str:
        return f" x{self.world_size}"

    @contextlib.contextmanager
    def waiting_on(self, what: str):
        """Collectives inside fail after distributed.timeout_s with the rank and ``what`` it waited on."""
        try:
            yield
        except RuntimeError as err:
            message = collective_timeout_message(err, self.rank, self.world_size, what,
                                                 self.config.distributed.timeout_s)
            if message is None:
                raise
            raise RuntimeError(message) from err

    def barrier(self) -> None:
        with self.waiting_on("a barrier (the other ranks' checkpoint, export or start-up)"):
            self.env.barrier()

    def wrap(self, unet, schedule, pairs_per_step: int) -> None:
        # the optimizer and its learning rate (scaled by pairs_per_step with optim.scale_lr) are in self.ds
        self.models = build_engine(self.config, unet, self.env, self.ds, schedule)
        self.engine = self.models.engine

    def check_output_dir(self, out_dir: Path) -> None:
        """Every rank must see the same output folder (checkpoint shards of all ranks go there): rank 0 writes a
        token file, every rank reads it. A folder on each node's own disk would otherwise hold only some ranks'
        shards, and a resume would desynchronise the ranks."""
        if self.world_size == 1:
            return
        import secrets
        import socket

        with self.waiting_on("the shared-output-folder check at start-up"):
            token = [secrets.token_hex(8) if self.is_main else None]
            torch.distributed.broadcast_object_list(token, src=0)
            path = out_dir / f".fastinpo-shared-check-{token[0]}"
            if self.is_main:
                path.write_text(token[0])
            self.env.barrier()
            seen = path.is_file() and path.read_text() == token[0]
            everyone: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, (seen, socket.gethostname()))
            self.env.barrier()
            if self.is_main:
                path.unlink(missing_ok=True)
        blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(everyone) if not ok]
        if blind:
            raise RuntimeError(
                f"train.output_dir = {str(out_dir)!r} is not the same folder on every rank: {', '.join(blind)} "
                "cannot see the file rank 0 wrote there. Checkpoints hold one shard per rank, so every node must "
                "write to one shared file system (NFS, Lustre, ...): point train.output_dir at a shared path.")

    def check_resume_point(self, resume_from: Path | None) -> None:
        """Before loading: every rank found the same complete checkpoint (the same ``state.json``, and its own
        shard files — all of them when it was written on another world size), or none of them did — otherwise
        loading would desynchronise the ranks into a timeout. A checkpoint of another world size is accepted when
        the pairs per optimizer step stay the same (:meth:`_plan_world_size_change`)."""
        saved_ranks = self._plan_world_size_change(resume_from)
        if self.world_size == 1:
            return
        import hashlib

        mine: tuple[Any, ...] = (None, None, True)
        if resume_from is not None:
            state = resume_from / "state.json"
            digest = hashlib.sha256(state.read_bytes()).hexdigest()[:16] if state.is_file() else "no state.json"
            shards = resume_from / DS_TAG
            names = [f.name for f in shards.glob("*")] if shards.is_dir() else []
            ranks = [self.rank] if saved_ranks is None else range(saved_ranks)
            own = all(any(f"zero_pp_rank_{r}_" in n for n in names) for r in ranks)
            mine = (resume_from.name, digest, own)
        everyone: list[Any] = [None] * self.world_size
        with self.waiting_on("the resume-point check (every rank's checkpoint)"):
            torch.distributed.all_gather_object(everyone, mine)
        found = {(name, digest) for name, digest, _ in everyone}
        missing = [r for r, (_, _, own) in enumerate(everyone) if not own]
        if len(found) > 1 or missing:
            per_rank = "; ".join(f"rank {r}: {name or 'no checkpoint'}"
                                 f"{'' if own else ' (its shard files are missing)'}"
                                 for r, (name, _, own) in enumerate(everyone))
            raise RuntimeError(
                f"the ranks did not find the same complete checkpoint to resume from ({per_rank}). Every rank "
                "must see one shared train.output_dir holding every rank's shards; resume from a checkpoint that "
                "all ranks can read (--resume PATH).")

    def write_settings(self, out_dir: Path) -> None:
        (out_dir / "deepspeed_config.json").write_text(json.dumps(self.ds, indent=2))

    def begin_micro_batch(self, batch) -> None:
        if self.models.lockstep is not None:
            self.models.lockstep.begin(batch.positions.tolist())

    @property
    def managed_accumulation(self) -> bool:
        """ZeRO-3: DeepSpeed counts micro-batches (``engine.step`` after each); below: one ``engine.step`` per
        optimizer step is the boundary (see the module docstring)."""
        return bool(self.ds.get("managed_gradient_accumulation", True))

    def backward(self, out, scale: float) -> None:
        with self.waiting_on("the gradient reduction of a backward pass"):
            if not out.backward_done:
                # the loop scales by 1/grad_accum itself (as the methods that back-propagate themselves do), so
                # DeepSpeed must not scale again
                self.engine.backward(out.loss * scale, scale_wrt_gas=False)
            if self.managed_accumulation:
                self.engine.step()  # updates only at the accumulation boundary (the last micro-batch of the step)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.managed_accumulation:
            with self.waiting_on("the optimizer step (gradient norm and parameter all-gather)"):
                self.engine.step()  # the boundary: reduces what every backward of the step accumulated, updates
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=self.device)
        # DeepSpeed skipped the update iff the global gradient norm is not finite; a non-finite loss on any rank
        # makes it so. It is the same on every rank, so are the loop's counters: no collective needed.
        return ~torch.isfinite(grad_norm), grad_norm

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def reduce_metrics(self, stacked: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return stacked
        # every rank logs the same keys the same number of times, so the mean over ranks of per-rank means is
        # the mean over the global batch
        with self.waiting_on("the all-reduce of the logged metrics"):
            torch.distributed.all_reduce(stacked)
        return stacked / self.world_size

    def checkpoint_state(self) -> dict[str, Any]:
        return {"backend": "deepspeed", "world_size": self.world_size, "zero_stage": zero_stage(self.ds)}

    def summary(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "zero_stage": zero_stage(self.ds)}

    def save_checkpoint(self, out_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        """Every rank writes its shards into one temporary folder; after a barrier rank 0 writes ``state.json``
        and renames it into place (the atomic contract of :mod:`fastinpo.train.checkpoint`)."""
        env = self.env
        d = ckpt.checkpoint_dir(out_dir)
        tmp = d / f".tmp-step-{step:08d}-ds"  # one name for all ranks (a pid would differ per rank)
        if env.is_main:
            d.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        env.barrier()
        # LoRA: the frozen base weights come from model.path on resume; saving them would multiply the size by
        # ~100
        self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.models.lora)
        env.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        final = d / f"step-{step:08d}"
        if env.is_main:
            final = ckpt.commit_checkpoint(out_dir, tmp, step, state=state, keep_last=keep_last)
        env.barrier()
        return final

    #: the longest the other ranks wait for rank 0's universal conversion (it reads and writes the optimizer state
    #: about twice, 12 bytes per trained parameter: minutes for a full SDXL UNet); torchrun stops them sooner if rank 0
    #: fails. Not distributed.timeout_s: that bounds a lost peer, not this one-off work.
    UNIVERSAL_WAIT_S = 4 * 3600

    def _plan_world_size_change(self, resume_from: Path | None) -> int | None:
        """For a DeepSpeed checkpoint written on another number of ranks: refuse (naming the settings that would
        work) unless this run keeps its pairs per optimizer step; else plan its universal load (DeepSpeed's
        ``checkpoint.load_universal``, set before the engine is built) and return the ranks that wrote it. None
        for a checkpoint of this world size (or none)."""
        self.resume_ranks = None
        if resume_from is None or not (resume_from / "state.json").is_file():
            return None
        saved = json.loads((resume_from / "state.json").read_text())
        ranks = ckpt.saved_world_size(saved)
        if saved.get("backend", "none") != "deepspeed" or ranks == self.world_size:
            return None
        t = self.config.train
        if "config" not in saved:
            raise ValueError(f"checkpoint {resume_from} was written by {ranks} ranks and records no config, so its "
                             f"pairs per step are unknown: resume it on {ranks} ranks")
        old = saved["config"]["train"]
        found = ckpt.list_checkpoints(resume_from.parent.parent)
        resume = "latest" if found and found[-1][1] == resume_from else str(resume_from)
        problem = ckpt.world_size_change_problem(resume_from, (ranks, old["pairs_per_batch"], old["grad_accum"]),
                                                 (self.world_size, t.pairs_per_batch, t.grad_accum), resume=resume)
        if problem is not None:
            raise ValueError(problem)
        if self.config.optim.optimizer != "adamw":
            raise ValueError(f"checkpoint {resume_from} was written by {ranks} ranks; resuming on {self.world_size} "
                             "converts it to DeepSpeed's universal checkpoint, which knows Adam's state only "
                             f"(optim.optimizer = {self.config.optim.optimizer!r}): resume it on {ranks} ranks")
        self.resume_ranks = ranks
        self.ds.setdefault("checkpoint", {})["load_universal"] = True
        return ranks

    def _wait_for_rank0(self, what: str, seconds: float) -> None:
        """A barrier bounded by ``seconds`` rather than distributed.timeout_s (a gloo group of its own)."""
        if self.world_size == 1:
            return
        group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        try:
            with self.waiting_on(what):
                torch.distributed.barrier(group=group)
        finally:
            torch.distributed.destroy_process_group(group)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        saved = json.loads((path / "state.json").read_text())
        if saved.get("backend", "none") != "deepspeed":
            raise ValueError(f"checkpoint {path} was written by a one-process run (distributed.backend = 'none'); "
                             "resume it with that backend")
        ranks = ckpt.saved_world_size(saved)
        if ranks != self.world_size and self.resume_ranks != ranks:
            raise ValueError(f"checkpoint {path} was written by {ranks} ranks, this run has {self.world_size}, and "
                             "its resume was not planned (Engine.check_resume_point runs before the engine is built)")
        for key, want in (("method", self.config.method.name), ("lora", self.models.lora)):
            if saved.get(key) != want:
                raise ValueError(f"checkpoint {path} has {key} = {saved.get(key)!r}, this run {want!r}")
        load_dir = path
        if ranks != self.world_size:
            # every parameter's fp32 master weights, Adam moments and step, whole, re-sharded by DeepSpeed at load;
            # the LR schedule and step counters come from the (copied) model-states file
            if self.is_main:
                started = time.perf_counter()
                load_dir = ckpt.universal_copy(path, DS_TAG)
                print(f"fastinpo train: checkpoint {path.name} ({ranks} ranks) as a universal checkpoint for "
                      f"{self.world_size} ranks: {load_dir} ({time.perf_counter() - started:.1f} s; the "
                      f"original shards in {path / DS_TAG} are kept)", flush=True)
            self._wait_for_rank0("rank 0's universal-checkpoint conversion", self.UNIVERSAL_WAIT_S)
            load_dir = path / ckpt.UNIVERSAL
        load_path, _ = self.engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_module_strict=not self.models.lora,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {load_dir / DS_TAG}")
        self.models.refresh_inversion_copy()
        return saved

    def export(self, out: Path, arch: str) -> Path:
        """A consolidated diffusers ``unet/`` (full) or LoRA safetensors, gathered and written on rank 0."""
        state = gathered_state_dict(self.models, self.env, trainable_only=self.models.lora)
        if self.env.is_main:
            export_policy(out, self.models.unet, lora=self.models.lora, arch=arch, state=state)
        self.env.barrier()
        return out
