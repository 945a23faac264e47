"""Training-step throughput: fastinpo against the public-script reference (issue 8), and each optimization on / off.

One *step* is what an optimizer step costs with one micro-batch of B pairs: the inputs (encoders, or the cache),
the method's loss, backward, gradient clipping, the optimizer. Every case of a group uses the same model (shared
weights), the same data and the same per-pair randomness (the k-th timed step of every case sees the same pairs,
the same t and noise), so the work is identical and only the implementation differs.

Models: the tiny SDXL-shaped pipeline (CPU default), ``tiny-sd15``, ``tiny-sd3`` (the tiny SD3.5-structured MM-DiT of
``make-tiny-pipeline --arch sd3``: Flow-DPO against its public-structure reference, and InPO for flows — fastinpo's own
extension, no public implementation, so no reference row), and on a GPU the real-size ``sd15`` / ``sdxl`` / ``sd3``
(SD3.5-medium, no T5) structures with random weights. Inversion-DPO is not defined for flow models: SD3 has no such
group.

Cases of a group (method × full/LoRA):
  - ``reference``: benchmarks/reference/ — the public scripts' structure (encoders every step, eager unfused
    losses, InPO inversion over the whole batch at every grid step, Inversion-DPO with winners and losers inverted
    separately and all N policy evaluations in one graph), plain AdamW;
  - ``fastinpo``: the trainer's step (``make_step_inputs`` → method → backward → clip → optimizer) from cached
    latents / text embeddings, with its defaults;
  - one row per optimization turned off (the rest as in ``fastinpo``): ``encoders-in-step`` (no cache),
    ``split-calls`` (winners and losers — and CFG halves — in separate UNet calls), ``whole-batch-inversion``
    (InPO: every inversion call padded to all 2B samples: prefix batching off), ``all-in-graph`` (Inversion-DPO:
    memory-light two-pass gradient off), and ``eager-step`` (the eager DDIM step instead of the fused one the
    dispatcher picks: the extension on CPU where it is built, Triton on CUDA), ``nograd-steps-1`` (Inversion-DPO:
    one policy call per trajectory step in the no-grad pass); fused Triton losses run on CUDA only (a CPU row
    says so); optimizations of the issue that fastinpo lacks get a ``not-implemented`` row;
  - one row per option fastinpo has but does not use by default ("on"): ``bf16-inversion-copy`` (InPO,
    ``method.inversion_copy``), ``grad-steps-4`` (Inversion-DPO, ``method.grad_steps_per_call = 4``),
    ``trajectory-cache`` (Inversion-DPO, ``method.trajectory_cache_dir``, warm) and the cache with 4 grad steps
    per call;
  - with ``--compile``: ``reference+compile`` (the reference with its UNets under ``torch.compile``) and
    ``fastinpo+compile`` (``model.compile = true``), compiled untimed before the warm-up; every row then also
    has its ratio to ``reference+compile``.

On CPU the cases of a group run interleaved (each repeat runs every case once, in rotating order) so that a burst of
load on this shared machine hits all of them alike; the speedup is reported both as the ratio of median step
times and as the median (and IQR) of the per-repeat ratios of the same work. On CUDA the cases run one after the
other (SDXL-size models cannot be held several times), timed with CUDA events, with MFU: FLOPs from
``torch.utils.flop_counter`` over the measured time, against a bf16 matmul rate measured in the same run.
Peak memory: CUDA ``max_memory_allocated`` above the resident models; CPU peak RSS above the resident set, read from
/proc (VmHWM after ``clear_refs``, freed heap trimmed first) — both over one step after the timed ones.

Outputs (``--out``, default benchmarks/results/): ``train-step-<device>-<date>[-smoke].csv`` (one row per case,
with command, device, versions, commit), the same name ``.md`` (summary, targets) and ``.png`` (chart).
``--readme-table`` prints the README performance table rendered from the newest results files;
``--update-readme`` writes it into README.md (tests/test_readme.py checks the two agree).

The code is split by job: the cases (models, data, every case's step) in ``train_step_cases.py``, the runner
(timing, memory, call counts, FLOPs, rows) in ``train_step_runner.py``, the writers (CSV, markdown, chart, README
table) in ``train_step_report.py``; this file is the command line.

Usage::

    python benchmarks/bench_train_step.py --smoke        # CI: tiny SDXL-shaped pipeline, fastinpo vs reference
    python benchmarks/bench_train_step.py                # full CPU rows (tiny pipeline, every optimization)
    python benchmarks/bench_train_step.py --model sdxl   # on a GPU: SDXL-size UNet, random weights
    python benchmarks/bench_train_step.py --model tiny-sd3 --methods diffusion-dpo inpo   # SD3 flow rows (CPU)
    python benchmarks/bench_train_step.py --readme-table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script: `benchmarks.*` resolves from the repository root
    sys.path.insert(0, REPO)

from benchmarks.common import Timer, device_slug, loadavg, run_metadata  # noqa: E402
from benchmarks.train_step_cases import Group, is_flow_model, make_data, make_pipeline  # noqa: E402
from benchmarks.train_step_report import (  # noqa: E402
    _num,
    fmt,
    read_rows,
    readme_table,
    render_report,
    target_lines,
    update_readme,
    write_csv,
)
from benchmarks.train_step_runner import (  # noqa: E402
    PeakMemory,
    matmul_tflops,
    measure_group,
    policy_mfu_row,
    rows_for,
    synchronized_timer,
    unit_cost_rows,
)

__all__ = ["Group", "build_group", "main", "readme_table", "run", "synchronized_timer"]


# ----------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--smoke", action="store_true",
                   help="CI: tiny SDXL and tiny SD3 pipelines, fastinpo vs reference only (SD3: Flow-DPO), < 2 min")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", nargs="+", default=None,
                   choices=["tiny-sdxl", "tiny-sd15", "tiny-sd3", "sd15", "sdxl", "sd3"],
                   help="tiny-sdxl (CPU default) / tiny-sd3 (flow) / sd15 / sdxl / sd3 (SD3.5-medium): real configs, "
                        "random weights (GPU default: sd15 sdxl)")
    p.add_argument("--methods", nargs="+", default=["diffusion-dpo", "inpo", "inversion-dpo"],
                   choices=["diffusion-dpo", "inpo", "inversion-dpo"])
    p.add_argument("--modes", nargs="+", default=None, choices=["full", "lora"], help="default: full lora")
    p.add_argument("--pairs", type=int, nargs="+", default=None,
                   help="pairs per micro-batch B (default: 1 2 tiny, 1 GPU; 1 pair per GPU is what the official "
                        "scripts train with). Inversion-DPO runs at the first B only: its released code supports "
                        "one pair")
    p.add_argument("--num-steps", type=int, nargs="+", default=None,
                   help="Inversion-DPO N (default 20 10 on CPU; 20 40 80 on GPU)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default 32 tiny, 512/1024)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per case (default 10, a third for a second N; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: this machine's 2 cores are shared; 2 threads oversubscribe them)")
    p.add_argument("--ref-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the frozen reference UNet for both implementations (default: float16 on CUDA as "
                        "the scripts; float32 on CPU, where fp16 convolutions are slower than fp32; Inversion-DPO "
                        "full: bfloat16, the released code's symmetry breaking)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-variants", action="store_true", help="fastinpo vs reference only (no on/off rows)")
    p.add_argument("--compile", action="store_true", help="add the reference under torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline-dir", default=None,
                   help="folder for the made pipelines, kept and reused (default: a temporary folder)")
    p.add_argument("--tag", default="", help="suffix of the output names (tagged files never feed the README table)")
    p.add_argument("--readme-table", action="store_true", help="print the README table from the results and exit")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite README.md's table (between its perf-table markers) from the results and exit")
    p.add_argument("--report", metavar="CSV", default=None,
                   help="re-render the .md summary and .png chart of a results CSV (from its rows) and exit")
    return p


def run(args) -> int:
    if args.update_readme:
        update_readme(readme_table(args.out))
        print(f"README.md performance table rewritten from {args.out}")
        return 0
    if args.readme_table:
        print(readme_table(args.out))
        return 0
    if args.report:
        render_report(args.report)
        return 0
    import diffusers

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.smoke:
        args.model = args.model or ["tiny-sdxl", "tiny-sd3"]
        args.modes = args.modes or ["full"]
        args.repeats = args.repeats or 3
        args.warmup = args.warmup if args.warmup is not None else 1
        args.num_steps = args.num_steps or [10]
        args.no_variants = True
    args.model = args.model or (["sd15", "sdxl"] if cuda else ["tiny-sdxl"])
    args.modes = args.modes or ["full", "lora"]
    args.repeats = args.repeats or 10
    args.warmup = args.warmup if args.warmup is not None else 2
    args.num_steps = args.num_steps or ([20, 40, 80] if cuda else [20, 10])
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    timer, memory = Timer(dev), PeakMemory(dev)
    args._mem_kind = memory.kind
    today = _dt.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-step-{device_slug(dev)}-{today}{'-smoke' if args.smoke else ''}"
                                  f"{'-' + args.tag if args.tag else ''}")
    base = {**run_metadata(dev), "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads() if not cuda else ""}
    print(f"{base['device']}  torch {base['torch']}  diffusers {base['diffusers']}  commit {base['commit']}  "
          f"threads {base['threads']}  load {loadavg()}", flush=True)
    peak = matmul_tflops(dev, timer)
    if peak:
        print(f"bf16 matmul rate (8192^3): {peak:.1f} TFLOP/s")
    from fastinpo.models.family import family_for_folder

    all_rows: list[dict] = []
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # --pipeline-dir keeps (and reuses) the made pipeline folders, e.g. for the GPU kit's later stages
        work = args.pipeline_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fastinpo-bench-"))
        for model in args.model:
            tiny = model.startswith("tiny")
            resolution = args.resolution or (32 if tiny else 1024 if model in ("sdxl", "sd3") else 512)
            args.resolution = resolution
            pairs_list = args.pairs or ([1, 2] if tiny and not args.smoke else [1])
            pipeline = make_pipeline(model, work, resolution)
            family = family_for_folder(pipeline)
            comps = family.load_components(pipeline, dtype=torch.float16 if cuda else torch.float32)
            encoder = family.make_encoder(comps, dev)
            datas = {b: make_data(encoder, b, resolution, dev, seed=args.seed) for b in pairs_list}
            methods = args.methods
            if is_flow_model(model):  # Inversion-DPO is not defined for flows; the smoke runs Flow-DPO only
                methods = [m for m in methods if m != "inversion-dpo" and (m == "diffusion-dpo" or not args.smoke)]
                if len(methods) < len(args.methods):
                    print(f"-- {model}: {', '.join(sorted(set(args.methods) - set(methods)))} not run "
                          f"({'smoke: Flow-DPO only; ' if args.smoke else ''}"
                          "inversion-dpo is not defined for flow models)", flush=True)
            plan = [(m, mode == "lora", n, b) for m in methods for b in pairs_list for mode in args.modes
                    for n in (args.num_steps if m == "inversion-dpo" else [0])
                    if m != "inversion-dpo" or b == pairs_list[0]]
            units_done = False
            for method, lora, n, b in plan:
                data = datas[b]
                label = f"{model} {method} {'lora' if lora else 'full'} B={b}" + (f" N={n}" if n else "")
                print(f"-- {label}", flush=True)
                if args.compile:  # a fresh compile cache per group: the groups' many graphs of the one UNet forward
                    torch._dynamo.reset()  # would otherwise exhaust the recompile limit and fall back to eager
                group = Group(args, dev, pipeline, comps, encoder, data, method, lora, n or 20,
                              secondary=bool(n) and n != args.num_steps[0])
                cases = measure_group(group, args, timer, memory, flops_on=cuda)
                rows = rows_for(group, cases, base, model, peak)
                if not units_done and not cuda and not args.smoke and method == "inversion-dpo" and not lora:
                    rows += unit_cost_rows(group, base, model, timer)
                    units_done = True
                if cuda and group.method == "diffusion-dpo" and peak:
                    rows.append(policy_mfu_row(group, base, model, timer, peak, args.repeats))
                for r in rows:
                    sp = _num(r.get("paired_speedup_median")) or _num(r.get("speedup_vs_reference"))
                    print(f"   {r['case']:<22} {r['status']:<8} step s {fmt(_num(r.get('median_step_s'))):>7}  "
                          f"pairs/s {fmt(_num(r.get('pairs_per_s'))):>8}  "
                          f"speedup {fmt(sp):>6}  gain {fmt(_num(r.get('gain_of_optimization'))):>6}  "
                          f"peak MB {fmt(_num(r.get('peak_mem_mb'))):>7}  calls "
                          f"{r.get('unet_calls', '')}/{r.get('unet_samples', '')}  {r.get('note', '')[:70]}",
                          flush=True)
                all_rows += rows
                write_csv(stem + ".csv", all_rows)  # after every group: a run cut short keeps what it measured
                del group, cases
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    write_csv(stem + ".csv", all_rows)
    rows = read_rows(stem + ".csv")
    extra = [f"- wall time {time.perf_counter() - t_start:.0f} s; peak memory: {memory.kind}"]
    if peak:
        extra.append(f"- bf16 matmul rate measured in this run: {peak:.1f} TFLOP/s (MFU denominator)")
    render_report(stem + ".csv", extra)
    for line in target_lines(rows):
        print(line)
    print(f"rows written to {os.path.relpath(stem + '.csv', REPO)} (+ .md, .png) in "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


def build_group(method: str, work_dir: str, *, lora: bool = False, pairs: int = 1, num_steps: int = 4,
                model: str = "tiny-sdxl", device: str | None = None, resolution: int | None = None,
                seed: int = 0) -> Group:
    """One group's models, data and step functions outside :func:`run` (the pytest-benchmark suite uses it):
    ``group.fastinpo_step()`` and ``group.reference_step()`` return ``step(r)`` callables."""
    from fastinpo.models.family import family_for_folder

    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    dev = torch.device(device or args.device)
    args.resolution = resolution or (32 if model.startswith("tiny") else 1024 if model in ("sdxl", "sd3") else 512)
    args.seed = seed
    pipeline = make_pipeline(model, work_dir, args.resolution)
    family = family_for_folder(pipeline)
    comps = family.load_components(pipeline, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    encoder = family.make_encoder(comps, dev)
    data = make_data(encoder, pairs, args.resolution, dev, seed=seed)
    return Group(args, dev, pipeline, comps, encoder, data, method, lora, num_steps)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``fastinpo`` argparse subparsers object."""
    p = subparsers.add_parser("bench", help="training-step throughput: fastinpo vs the public-script reference")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
