"""Benchmark of the fused kernels against the reference (issue 3).

Providers:
  - ``reference``: the plain-PyTorch reference (``fastinpo.ops.reference``), eager;
  - ``compile``: ``torch.compile`` of the same reference functions (skipped, with the reason printed, if it fails);
  - ``triton``: the fused Triton kernels (CUDA only: the interpreter is never timed);
  - ``ext``: the compiled extension ``fastinpo._C`` (the flow step only; where it is built).

Cases:
  - ``dpo_loss`` ``fwd`` and ``fwd+bwd``: SDXL latents ``2B × 4 × 128 × 128`` (B ∈ {1, 4, 16, 64}) and SD1.5
    ``2B × 4 × 64 × 64``;
  - ``ddim_step_cfg``: one DDIM inversion step with the classifier-free-guidance combine of ``[uncond; cond]``;
  - ``flow_step``: one Euler step ``x + Δσ v`` of a flow model with per-sample ``Δσ`` (SPEC §7), SD3.5 latents
    ``2B × 16 × 128 × 128``; also timed on the compiled extension (provider ``ext``, CPU and CUDA).

Per row: median time and spread (p10/p90 and IQR) over many repeats after warm-up (CUDA events on a GPU,
``perf_counter`` on CPU), rotating among several input sets so that the cache is not what is measured; GB/s on
the bytes the design must move (loss forward: the three inputs read once; forward+backward adds ``model_pred``
and ``target`` read and the gradient written; the absolute floor, inputs read once plus the gradient written
once, is in ``floor_bytes``; the step: ``x`` and both ε halves read, ``x_next`` written); the device's copy
bandwidth measured in the same run (``2 × bytes / time`` of a large clone) and the fraction; the peak extra
memory (CUDA: peak allocated during one call minus what was allocated before; not measured on CPU); device,
versions, commit, command line.

Usage::

    python benchmarks/bench_kernels.py                 # full set (on a GPU)
    python benchmarks/bench_kernels.py --smoke         # tiny shapes, few repeats, CPU, < 1 minute
    python benchmarks/bench_kernels.py --out DIR       # where the CSV and PNG go (default benchmarks/results)
    python benchmarks/bench_kernels.py --smoke --ops flow_step   # only some ops
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys
import time

import torch
import torch._dynamo

from fastinpo.ops import reference
from fastinpo.ops.schedule import NoiseSchedule, gather_alphas

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script: `benchmarks.*` resolves from the repository root
    sys.path.insert(0, REPO)

from benchmarks.common import device_name as _device_name  # noqa: E402
from benchmarks.common import run_metadata  # noqa: E402

COLUMNS = [
    "timestamp", "device", "torch", "triton", "commit", "command", "op", "mode", "model", "B", "shape", "dtype",
    "provider", "status", "median_ms", "p10_ms", "p90_ms", "iqr_ms", "repeats", "bytes", "floor_bytes", "gbps",
    "copy_gbps", "frac_of_copy", "peak_extra_mib", "speedup_vs_reference",
]


# ----------------------------------------------------------------------------------------------------- helpers
def triton_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("triton")
    except Exception:
        return "absent"


def device_name(dev: torch.device) -> str:
    """The shared device name; on CPU also torch's thread count, which these kernel timings depend on."""
    name = _device_name(dev)
    return name if dev.type == "cuda" else f"{name}, {torch.get_num_threads()} torch threads"

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, input_sets, dev, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call, one sample per call, inputs rotating through ``input_sets``."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    sync(dev)
    times = []
    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            args = input_sets[i % len(input_sets)]
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for i in range(repeats):
            args = input_sets[i % len(input_sets)]
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(xs, q):
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q))


def peak_extra_mib(fn, args, dev) -> str:
    if dev.type != "cuda":
        return ""
    sync(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn(*args)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del out
    return f"{peak / 2**20:.1f}"


def copy_bandwidth(dev, nbytes: int, repeats: int) -> float:
    """GB/s of a large device-to-device copy: 2 × bytes / time (read + write), median over repeats.

    ``dst.copy_(src)`` into a preallocated buffer (on CUDA the same as a clone through the caching allocator;
    on CPU a fresh clone would time the page faults of a new allocation, not the memory bandwidth).
    """
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    ts = time_fn(lambda s, d: d.copy_(s), [(src, dst)], dev, warmup=3, repeats=repeats)
    return 2 * src.numel() * 4 / (quantile(ts, 0.5) * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------- cases
def dpo_inputs(shape, dtype, dev, n_sets, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        t = torch.randn(shape, generator=g)
        m = (t + 0.5 * torch.randn(shape, generator=g)).to(dev, dtype).requires_grad_(True)
        r = (t + 0.5 * torch.randn(shape, generator=g)).to(dev, dtype)
        sets.append((m, r, t.to(dev, dtype)))
    return sets


def step_inputs(shape, dtype, dev, n_sets, seed):
    sch = NoiseSchedule.stable_diffusion()
    n = shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    table = sch.alphas_cumprod.to(dev)
    sets = []
    for _ in range(n_sets):
        src = (torch.randint(-1, 9, (n,), generator=g) * 100 + 1).to(dev)
        dst = src + 100
        x = torch.randn(shape, generator=g).to(dev, dtype)
        eps = torch.randn((2 * n, *shape[1:]), generator=g).to(dev, dtype)
        sets.append((x, eps, table, src, dst))
    return sets, sch.alpha_init


def flow_inputs(shape, dtype, dev, n_sets, seed):
    """``(x, v, Δσ)``: unit-variance state and velocity, Δσ from the InPO-for-flows level gaps (SD3, K = 10)."""
    from fastinpo.ops.flow import FlowSchedule, flow_inpo_levels

    gaps = flow_inpo_levels(FlowSchedule.sd3(), 10).sigmas.diff()
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(shape, generator=g).to(dev, dtype)
        v = torch.randn(shape, generator=g).to(dev, dtype)
        d = gaps[torch.randint(0, gaps.numel(), (shape[0],), generator=g)].to(dev)
        sets.append((x, v, d))
    return sets


def flow_providers(dev):
    """The fast paths of the flow step: the backend functions themselves (what the inversion loop calls after one
    dispatch), without the public function's input checks."""
    out = {}
    from fastinpo.ops import extension

    reason = extension.available_reason([torch.empty(1, device=dev)])
    if reason is None and not extension._has_op("flow_euler_step"):
        reason = "fastinpo._C was built before flow_euler_step was added"
    out["ext"] = extension.flow_euler_step_ext if reason is None else f"unavailable: {reason}"
    if dev.type == "cuda":
        try:
            from fastinpo.kernels.flow_step import flow_euler_step

            out["triton"] = flow_euler_step
        except Exception as err:
            out["triton"] = f"unavailable: {type(err).__name__}: {err}"
    else:
        out["triton"] = "CUDA only (the Triton interpreter is never timed)"
    return out


def ref_dpo_fwd(m, r, t):
    return reference.diffusion_dpo_loss(m.detach(), r, t, 5000.0).loss


def ref_dpo_fwd_bwd(m, r, t):
    loss = reference.diffusion_dpo_loss(m, r, t, 5000.0).loss
    return torch.autograd.grad(loss, m)[0]


def make_ref_step(alpha_init):
    def ref_step(x, eps, table, src, dst):
        n = x.shape[0]
        a_from = gather_alphas(table, src, alpha_init)
        a_to = gather_alphas(table, dst, alpha_init)
        e = reference.cfg_combine(eps[:n], eps[n:], 2.0)
        return reference.ddim_inversion_step(x, e, a_from, a_to)

    return ref_step


def providers_for(op, mode, shape, dtype, dev, alpha_init, compiled_cache):
    """``{provider: fn or reason-string}`` for one case."""
    out = {}
    if op == "dpo_loss":
        base = ref_dpo_fwd if mode == "fwd" else ref_dpo_fwd_bwd
    elif op == "flow_step":
        base = reference.flow_euler_step
    else:
        base = make_ref_step(alpha_init)
    out["reference"] = base
    # one compiled function per case, static shapes: what a training loop with fixed shapes gets
    key = (op, mode, tuple(shape), dtype)
    if key not in compiled_cache:
        if op == "dpo_loss" and mode == "fwd+bwd":
            cl = torch.compile(lambda m, r, t: reference.diffusion_dpo_loss(m, r, t, 5000.0).loss, dynamic=False)

            def fn(m, r, t, cl=cl):
                return torch.autograd.grad(cl(m, r, t), m)[0]
        else:
            fn = torch.compile(base, dynamic=False)
        compiled_cache[key] = fn
    out["compile"] = compiled_cache[key]
    if op == "flow_step":
        out.update(flow_providers(dev))
        return out
    if dev.type == "cuda":
        try:
            import triton  # noqa: F401

            import fastinpo
            from fastinpo.kernels.ddim_step import ddim_inversion_step_fused

            if op == "dpo_loss" and mode == "fwd":
                out["triton"] = lambda m, r, t: fastinpo.diffusion_dpo_loss(m.detach(), r, t, 5000.0,
                                                                            backend="triton").loss
            elif op == "dpo_loss":
                def tri(m, r, t):
                    loss = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0, backend="triton").loss
                    return torch.autograd.grad(loss, m)[0]

                out["triton"] = tri
            else:
                out["triton"] = lambda x, eps, table, src, dst: ddim_inversion_step_fused(
                    x, eps, table, src, dst, alpha_init, cfg_scale=2.0)
        except Exception as err:
            out["triton"] = f"unavailable: {type(err).__name__}: {err}"
    else:
        out["triton"] = "CUDA only (the Triton interpreter is never timed)"
    return out


# ----------------------------------------------------------------------------------------------------- main
def build_cases(smoke: bool, dev):
    cases = []  # (op, mode, model, B, shape)
    if smoke:
        sdxl = [("sdxl-like 4x32x32", b, (2 * b, 4, 32, 32)) for b in (1, 4)]
        sd15 = [("sd15-like 4x16x16", 4, (8, 4, 16, 16))]
    else:
        sdxl = [("sdxl 4x128x128", b, (2 * b, 4, 128, 128)) for b in (1, 4, 16, 64)]
        sd15 = [("sd15 4x64x64", b, (2 * b, 4, 64, 64)) for b in (1, 16)]
    for model, B, shape in sdxl + sd15:
        for mode in ("fwd", "fwd+bwd"):
            cases.append(("dpo_loss", mode, model, B, shape))
        cases.append(("ddim_step_cfg", "fwd", model, B, shape))
    sd35 = ([("sd35-like 16x32x32", b, (2 * b, 16, 32, 32)) for b in (1, 4)] if smoke else
            [("sd35 16x128x128", b, (2 * b, 16, 128, 128)) for b in (1, 4, 16)])
    for model, B, shape in sd35:
        cases.append(("flow_step", "fwd", model, B, shape))
    return cases


def case_bytes(op, mode, shape, dtype):
    numel = 1
    for s in shape:
        numel *= s
    es = torch.empty((), dtype=dtype).element_size()
    if op == "dpo_loss":
        if mode == "fwd":
            return 3 * numel * es, 3 * numel * es
        # forward: 3 inputs read; backward: model_pred and target read, gradient written
        return 6 * numel * es, 4 * numel * es
    if op == "flow_step":  # x and v read, x_next written
        return 3 * numel * es, 3 * numel * es
    # step: x read, [uncond; cond] read (2 × x), x_next written
    return 4 * numel * es, 4 * numel * es


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats, CPU (< 1 minute)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; cpu with --smoke)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp32,fp16,bf16")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ops", default=None, help="comma-separated subset of: dpo_loss,ddim_step_cfg,flow_step")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    dev = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.smoke and dev.type == "cpu":
        # The eager ops and inductor's generated C++ each bring a spinning OpenMP pool; on a 2-core machine the
        # two pools preempt each other and single calls take 8-16 ms scheduler slices. One thread keeps the
        # smoke numbers about the code, not the scheduler.
        torch.set_num_threads(1)
    dtypes_map = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype_names = (args.dtypes or ("fp32" if args.smoke or dev.type == "cpu" else "fp32,bf16")).split(",")
    repeats = args.repeats or (10 if args.smoke else (100 if dev.type == "cuda" else 20))
    warmup = 3 if args.smoke else 10
    n_sets = 2 if args.smoke else 4

    os.makedirs(args.out, exist_ok=True)
    date = _dt.date.today().isoformat()
    tag = "cpu-smoke" if args.smoke else (dev.type if dev.type == "cpu" else
                                          torch.cuda.get_device_name(dev).replace(" ", "_"))
    csv_path = os.path.join(args.out, f"kernels-{tag}-{date}.csv")
    png_path = os.path.join(args.out, f"kernels-{tag}-{date}.png")
    meta = {**run_metadata(dev), "device": device_name(dev), "triton": triton_version()}
    copy_gbps = copy_bandwidth(dev, (64 if args.smoke else 1024) * 2**20, repeats=10 if args.smoke else 50)
    print(f"# device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    print(f"# copy bandwidth {copy_gbps:.1f} GB/s (2 x bytes / time of a large copy)")

    rows = []
    compiled_cache = {}
    # one recompile per case (static shapes) would otherwise hit dynamo's default limit of 8 per function
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if dev.type == "cpu":
        # inductor's pool of compile worker processes keeps the (few) CPU cores busy in the background and
        # inflates every CPU timing that follows a compile (seen as 8/16/32 ms steps on 2 cores)
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    for dname in dtype_names:
        dtype = dtypes_map[dname]
        for op, mode, model, B, shape in build_cases(args.smoke, dev):
            if args.ops and op not in args.ops.split(","):
                continue
            if op == "dpo_loss":
                sets = dpo_inputs(shape, dtype, dev, n_sets, seed=B)
                alpha_init = None
            elif op == "flow_step":
                sets, alpha_init = flow_inputs(shape, dtype, dev, n_sets, seed=B), None
            else:
                sets, alpha_init = step_inputs(shape, dtype, dev, n_sets, seed=B)
            nbytes, floor = case_bytes(op, mode, shape, dtype)
            ref_median = None
            for prov, fn in providers_for(op, mode, shape, dtype, dev, alpha_init, compiled_cache).items():
                row = dict(meta, op=op, mode=mode, model=model, B=B, shape="x".join(map(str, shape)), dtype=dname,
                           provider=prov, bytes=nbytes, floor_bytes=floor, copy_gbps=f"{copy_gbps:.1f}")
                if isinstance(fn, str):
                    row["status"] = f"skipped: {fn}"
                else:
                    try:
                        ts = time_fn(fn, sets, dev, warmup, repeats)
                        med = quantile(ts, 0.5)
                        gbps = nbytes / (med * 1e-3) / 1e9
                        if prov == "reference":
                            ref_median = med
                        row.update(
                            status="ok", median_ms=f"{med:.4f}", p10_ms=f"{quantile(ts, 0.1):.4f}",
                            p90_ms=f"{quantile(ts, 0.9):.4f}", iqr_ms=f"{quantile(ts, 0.75) - quantile(ts, 0.25):.4f}",
                            repeats=repeats, gbps=f"{gbps:.2f}", frac_of_copy=f"{gbps / copy_gbps:.3f}",
                            peak_extra_mib=peak_extra_mib(fn, sets[0], dev),
                            speedup_vs_reference=f"{ref_median / med:.2f}" if ref_median else "",
                        )
                    except Exception as err:  # e.g. torch.compile without a working toolchain
                        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                        row["status"] = f"skipped: {type(err).__name__}: {msg}"[:300]
                        print(f"# {prov} {op} {mode} {row['shape']} {dname}: {row['status']}")
                rows.append(row)
                print(f"{op:14s} {mode:8s} {row['shape']:>16s} {dname:5s} {prov:10s} "
                      f"{row.get('median_ms', '-'):>10s} ms  p10 {row.get('p10_ms', '-'):>9s} "
                      f"p90 {row.get('p90_ms', '-'):>9s}  {row.get('gbps', '-'):>8s} GB/s "
                      f"({row.get('frac_of_copy', '-')} of copy)  {row['status'] if row['status'] != 'ok' else ''}",
                      flush=True)
            del sets

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    print(f"# wrote {csv_path}")
    if not args.no_plot:
        plot(rows, copy_gbps, png_path, meta)
        print(f"# wrote {png_path}")
    return 0


def plot(rows, copy_gbps, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in ok})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (op, mode, dtype) in zip(axes[0], panels, strict=True):
        sub = [r for r in ok if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        labels = list(dict.fromkeys(r["shape"] for r in sub))
        for prov in dict.fromkeys(r["provider"] for r in sub):
            pts = {r["shape"]: float(r["gbps"]) for r in sub if r["provider"] == prov}
            xs = [i for i, lab in enumerate(labels) if lab in pts]
            ax.plot(xs, [pts[labels[i]] for i in xs], marker="o", label=prov)
        ax.axhline(copy_gbps, color="gray", linestyle="--", label="copy bandwidth")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("GB/s (design bytes)")
        ax.set_title(f"{op} {mode} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
