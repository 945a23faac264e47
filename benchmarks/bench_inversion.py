"""Benchmark of the DDIM inversion step on the compiled extension, and of the batched InPO inversion (issue 4).

Part (a), ``op=ddim_step``: one inversion step on SDXL-shaped latents ``2B × 4 × 128 × 128`` (B ∈ {1, 4, 16}),
per-sample ᾱ, providers
  - ``reference``: :func:`fastinpo.ops.reference.ddim_inversion_step`, eager;
  - ``compile``: ``torch.compile`` of the same function (skipped, with the reason printed, if it fails);
  - ``ext``: :func:`fastinpo.ops.extension.ddim_inversion_step_ext` (``torch.ops.fastinpo.ddim_inversion_step_alphas``).
Median and spread (p10/p90, IQR) over many repeats after warm-up, providers interleaved repeat by repeat so that
a noisy machine slows all of them alike, rotating among several random input sets (never zeros); CUDA events on a
GPU, ``perf_counter`` on CPU. GB/s on the bytes the step must move (``x`` and ``eps`` read, ``x_next`` written),
the copy bandwidth of a large tensor copy measured in the same run and the fraction of it; the ext's speedup over the
eager reference and over the compiled one, from the same run.

Part (b), ``op=inpo_invert``: a full K = 10 InPO inversion of B SDXL-shaped pairs, each pair at its own random
``t``, with a small stand-in model (1×1 conv + tanh). ``prefix``: :func:`fastinpo.inpo_invert` (each model call
sees only the active pairs, a prefix of the batch); ``whole-batch``: every step runs the model on all 2B samples
and masks the update. Both use the same step backend (``ext`` when built, else ``reference``), η = 0 (so the two
results are checked equal). Reported: model-call samples and time.

Rows go to ``benchmarks/results/inversion-<device>-<date>.csv`` (``-smoke`` added with ``--smoke``) with the
command, device, torch version and commit.

Usage::

    python benchmarks/bench_inversion.py            # full set
    python benchmarks/bench_inversion.py --smoke    # B = 1 only, few repeats, < 1 minute
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys

import torch

from fastinpo import inpo_invert
from fastinpo.ops import extension, reference
from fastinpo.ops.schedule import NoiseSchedule, inpo_grid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script: `benchmarks.*` resolves from the repository root
    sys.path.insert(0, REPO)

from benchmarks.common import Timer, device_slug, loadavg, quantile, run_metadata  # noqa: E402

COLUMNS = [
    "timestamp", "device", "torch", "commit", "command", "op", "B", "shape", "dtype", "provider", "status",
    "median_ms", "p10_ms", "p90_ms", "iqr_ms", "repeats", "bytes", "gbps", "copy_gbps", "frac_of_copy",
    "speedup_vs_reference", "speedup_vs_compile", "model_samples", "model_calls", "threads", "loadavg_1m", "note",
]


# ----------------------------------------------------------------------------------------------------- helpers
def stats(times: list[float]) -> dict:
    def q(p):
        return quantile(times, p)

    return {"median_ms": q(0.5) * 1e3, "p10_ms": q(0.1) * 1e3, "p90_ms": q(0.9) * 1e3,
            "iqr_ms": (q(0.75) - q(0.25)) * 1e3, "repeats": len(times)}


def copy_bandwidth(dev: torch.device, timer: Timer, repeats: int, nbytes: int) -> float:
    """GB/s of a large tensor copy (read + write), the practical ceiling for a streaming kernel.

    Into a preallocated tensor: on CPU a fresh 64 MiB ``clone`` is an mmap whose page faults, not memory
    bandwidth, dominate (5 GB/s instead of ~20 here); on CUDA the caching allocator makes the two the same.
    """
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * nbytes / stats(times)["median_ms"] / 1e6


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------- part (a)
def bench_step(args, dev, timer, base, writer):
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    copy_gbps = copy_bandwidth(dev, timer, args.repeats, 256 << 20 if dev.type == "cuda" else 64 << 20)
    print(f"copy bandwidth (64-256 MiB tensor copy): {copy_gbps:.1f} GB/s")
    compiled = None
    compile_error = None
    if not args.no_compile:
        try:
            compiled = torch.compile(reference.ddim_inversion_step)
        except Exception as err:  # noqa: BLE001 - any failure means "no compile provider here"
            compile_error = f"{type(err).__name__}: {err}"
    ext_reason = extension.available_reason([torch.empty(1, device=dev)])
    if ext_reason:
        print(f"ext skipped: {ext_reason}")
    for dname in args.dtypes:
        dt = dtype[dname]
        for B in args.batches:
            n = 2 * B
            shape = (n, 4, 128, 128)
            gen = torch.Generator(device=dev).manual_seed(B)
            sets = []
            for _ in range(args.rotate):
                x = torch.randn(shape, generator=gen, device=dev).to(dt)
                eps = torch.randn(shape, generator=gen, device=dev).to(dt)
                a_from = torch.rand(n, generator=gen, device=dev) * 0.5 + 0.5
                a_to = a_from * (torch.rand(n, generator=gen, device=dev) * 0.9 + 0.05)
                sets.append((x, eps, a_from, a_to))
            providers = {"reference": reference.ddim_inversion_step}
            status = {"reference": "ok"}
            if compiled is not None:
                providers["compile"] = compiled
            if ext_reason is None:
                providers["ext"] = extension.ddim_inversion_step_ext
            # warm-up (compiles on the first call) and a correctness check against the reference
            for name in list(providers):
                try:
                    for s in sets:
                        providers[name](*s)
                    if name != "reference":
                        got = providers[name](*sets[0]).float()
                        want = reference.ddim_inversion_step(*sets[0]).float()
                        tol = 1e-4 if dt == torch.float32 else 3e-2
                        assert torch.allclose(got, want, rtol=tol, atol=tol), f"{name} disagrees with the reference"
                    status[name] = "ok"
                except Exception as err:  # noqa: BLE001
                    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    print(f"{name} skipped for B={B} {dname}: {msg}")
                    if name == "compile":
                        compile_error = msg
                    providers.pop(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times = {name: [] for name in providers}
            for r in range(args.repeats):  # interleaved: a burst of machine noise hits every provider
                s = sets[r % len(sets)]
                for name, fn in providers.items():
                    times[name].append(timer(lambda fn=fn, s=s: fn(*s)))
            med = {name: stats(ts)["median_ms"] for name, ts in times.items()}
            nbytes = 3 * sets[0][0].numel() * sets[0][0].element_size()
            load = loadavg()
            for name in ("reference", "compile", "ext"):
                row = dict(base, loadavg_1m=load, op="ddim_step", B=B, shape="x".join(map(str, shape)), dtype=dname,
                           provider=name)
                if name not in providers:
                    row.update(status="skipped", note=(compile_error if name == "compile" else ext_reason) or "")
                    writer.writerow(row)
                    continue
                st = stats(times[name])
                gbps = nbytes / st["median_ms"] / 1e6
                row.update(status="ok", bytes=nbytes, gbps=gbps, copy_gbps=copy_gbps, frac_of_copy=gbps / copy_gbps,
                           speedup_vs_reference=med["reference"] / st["median_ms"],
                           speedup_vs_compile=(med["compile"] / st["median_ms"]) if "compile" in med else "", **st)
                writer.writerow({k: fmt(v) for k, v in row.items()})
                print(f"step {dname} B={B:<3} {name:<9} median {st['median_ms']:8.3f} ms "
                      f"(p10 {st['p10_ms']:.3f}, p90 {st['p90_ms']:.3f})  {gbps:7.1f} GB/s "
                      f"({100 * gbps / copy_gbps:5.1f}% of copy)  x{med['reference'] / st['median_ms']:.2f} vs eager"
                      + (f", x{med['compile'] / st['median_ms']:.2f} vs compile" if "compile" in med else ""))


# ----------------------------------------------------------------------------------------------- part (b)
class StandIn(torch.nn.Module):
    """A cheap ε-model with the InPO call signature: 1×1 conv + a per-sample timestep / condition shift + tanh.

    The 1×1 conv is written as a channel matmul: CPU mkldnn convolutions with 4 channels carry a large fixed
    cost per call (tens of ms here) that would hide how the model's work scales with the samples it sees.
    """

    def __init__(self, channels: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(channels, 1, generator=g))

    def forward(self, x, t, cond):
        shift = (1e-3 * t.to(x.dtype) + cond.to(x.dtype)).view(-1, 1, 1)
        y = torch.matmul(self.weight, x.flatten(2)) + self.bias + shift  # == conv2d(x, weight[..., None, None])
        return torch.tanh(y).view_as(x)


def whole_batch_invert(model, z0, t, cond, schedule, step_fn, num_levels=10):
    """The baseline: every step calls the model on all 2B samples and keeps the update only where active."""
    grid = inpo_grid(schedule, num_levels)
    B = t.shape[0]
    x = z0.detach().float().clone()
    t2 = torch.cat([t, t])
    table = schedule.table(z0.device)
    samples = 0
    with torch.no_grad():
        for k in range(num_levels):
            src, dst = int(grid.source_levels[k]), int(grid.levels[k])
            active = src < t2
            n = 2 * B
            eps = model(x, torch.full((n,), src, dtype=torch.int64, device=x.device), cond).float()
            samples += n
            a_from = torch.full((n,), schedule.alpha_init if src < 0 else float(table[src]), device=x.device)
            a_to = torch.full((n,), float(table[dst]), device=x.device)
            x = torch.where(active.view(-1, 1, 1, 1), step_fn(x, eps, a_from, a_to), x)
    return x, samples


def bench_inversion(args, dev, timer, base, writer):
    sched = NoiseSchedule.stable_diffusion()
    backend = "ext" if extension.available_reason([torch.empty(1, device=dev)]) is None else "reference"
    extension.register()
    step_fn = extension.ddim_inversion_step_ext if backend == "ext" else reference.ddim_inversion_step
    model = StandIn().to(dev).eval()
    for B in args.batches:
        gen = torch.Generator(device=dev).manual_seed(1000 + B)
        z0 = torch.randn(2 * B, 4, 128, 128, generator=gen, device=dev)
        t = torch.randint(0, 1000, (B,), generator=gen, device=dev)
        cond = torch.rand(2 * B, generator=gen, device=dev)
        prefix = inpo_invert(model, z0, t, cond, sched, backend=backend)
        whole, whole_samples = whole_batch_invert(model, z0, t, cond, sched, step_fn)
        torch.testing.assert_close(prefix.latents, whole, rtol=1e-5, atol=1e-5)  # same result, less work
        runs = {
            "prefix": lambda z0=z0, t=t, cond=cond: inpo_invert(model, z0, t, cond, sched, backend=backend),
            "whole-batch": lambda z0=z0, t=t, cond=cond: whole_batch_invert(model, z0, t, cond, sched, step_fn),
        }
        times = {k: [] for k in runs}
        for _ in range(args.inv_repeats):
            for name, fn in runs.items():
                times[name].append(timer(fn))
        samples = {"prefix": sum(prefix.samples_per_call), "whole-batch": whole_samples}
        calls = {"prefix": prefix.num_model_calls, "whole-batch": 10}
        med_whole = stats(times["whole-batch"])["median_ms"]
        for name in runs:
            st = stats(times[name])
            row = dict(base, loadavg_1m=loadavg(), op="inpo_invert", B=B, shape=f"{2 * B}x4x128x128", dtype="fp32",
                       provider=name, status="ok", model_samples=samples[name], model_calls=calls[name],
                       speedup_vs_reference=med_whole / st["median_ms"],
                       note=f"K=10 eta=0 step backend={backend}; t={t.tolist()}; speedup is vs whole-batch", **st)
            writer.writerow({k: fmt(v) for k, v in row.items()})
            print(f"inpo_invert B={B:<3} {name:<11} median {st['median_ms']:9.2f} ms  model samples "
                  f"{samples[name]:4d} in {calls[name]} calls  x{med_whole / st['median_ms']:.2f} vs whole-batch")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="B = 1, few repeats, no torch.compile: < 1 minute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="B values (default 1 4 16)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per step case (default 50 / 10 smoke)")
    p.add_argument("--inv-repeats", type=int, default=None, help="timed repeats per inversion (default 5 / 2)")
    p.add_argument("--rotate", type=int, default=4, help="input sets rotated through")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--skip-inversion", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.batches = args.batches or [1]
        args.repeats = args.repeats or 10
        args.inv_repeats = args.inv_repeats or 2
        args.no_compile = True
    args.batches = args.batches or [1, 4, 16]
    args.repeats = args.repeats or 50
    args.inv_repeats = args.inv_repeats or 5

    dev = torch.device(args.device)
    timer = Timer(dev)
    today = _dt.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"inversion-{device_slug(dev)}-{today}{'-smoke' if args.smoke else ''}.csv")
    base = {**run_metadata(dev), "threads": torch.get_num_threads() if dev.type == "cpu" else ""}
    print(f"{base['device']}  torch {base['torch']}  commit {base['commit']}  threads {torch.get_num_threads()}  "
          f"load {loadavg()}")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        bench_step(args, dev, timer, base, writer)
        if not args.skip_inversion:
            bench_inversion(args, dev, timer, base, writer)
    print(f"rows written to {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
