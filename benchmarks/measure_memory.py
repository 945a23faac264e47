"""Peak memory of one training step per model, method, LoRA/full and precision: the rows of docs/MEMORY.md.

Every measurement is one fresh process (``one``) running ``fastinpo.train.train`` for one optimizer step of one pair
at a reduced resolution, with gradient checkpointing as the shipped configs use it, on a real-size pipeline with
random weights (``fastinpo make-tiny-pipeline --size full``) and synthetic Pick-a-Pic pairs
cached first by ``fastinpo cache`` (so, as in the shipped configs' ``data.cache_dir`` runs, no VAE or text
encoder is loaded during training). It reports the process's peak RSS
(``resource.getrusage``: CPU), the peak of its anonymous memory (resident + swapped) and, on CUDA,
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``.
``table`` runs the listed cases one after another (never two at once: each can take many GiB) and prints a
Markdown table; ``--need-gib`` skips a case when the machine's available memory is below the
case's stated need plus a margin, instead of crashing a shared machine.

    python benchmarks/measure_memory.py table --pipeline sd15=/tmp/sd15 --pipeline sdxl=/tmp/sdxl \\
        --cases sd15:diffusion-dpo:lora:no sdxl:diffusion-dpo:lora:bf16:bfloat16 --resolution 128 --device cpu

``--out DIR`` also writes the rows to ``DIR/memory-<device>-<date>.md`` (the table) and ``.jsonl`` (one JSON row per
case with the run's metadata: device, torch, commit, command, resolution), appending, so several ``table`` calls
(e.g. SD1.5 at 512² and SDXL at 1024², as the GPU kit's ``memory`` stage runs them) make one file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # run as a script: `benchmarks.*` resolves from the repository root
    sys.path.insert(0, REPO)


def pairs_and_cache(work: Path, arch: str, pipeline: str, resolution: int) -> tuple[Path, Path]:
    """Two synthetic pairs (one usable, one tie) and their latent/text cache (``fastinpo cache``, its own process):
    training then loads no VAE or text encoder, as the shipped configs' ``data.cache_dir`` runs do."""
    from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

    pairs, cache = work / f"pairs-{resolution}", work / f"cache-{arch}-{resolution}"
    if not pairs.is_dir():
        write_pickapic_parquet(pairs / "train-00000.parquet", synthetic_rows(4, resolution, seed=0))
    if not cache.is_dir():
        done = subprocess.run([sys.executable, "-m", "fastinpo", "cache", "--set", f"model.path={pipeline}",
                               "--set", f"data.path={pairs}", "--set", f"data.cache_dir={cache}", "--set",
                               f"data.resolution={resolution}", "--set", "data.caption_dropout=0"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fastinpo cache failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return pairs, cache


def measure_one(pipeline: str, method: str, mode: str, precision: str, base_dtype: str, resolution: int,
                device: str, optimizer: str, reference_dtype: str, pairs: Path, cache: Path) -> dict:
    """One training step in this process; returns the peaks."""
    import warnings

    import torch

    from fastinpo.config import load_config
    from fastinpo.train import train

    # the run's own scratch folder (its export is a full UNet for full fine-tuning: GBs), removed after the step
    work = Path(tempfile.mkdtemp(prefix="fastinpo-mem-"))
    over = [f"model.path={pipeline}", f"data.path={pairs}", f"data.cache_dir={cache}",
            f"data.resolution={resolution}",
            f"method.name={method}", "train.max_steps=1", "train.pairs_per_batch=1", "train.grad_accum=1",
            f"train.output_dir={work / 'run'}", "train.progress=false", f"train.device={device}",
            "train.checkpoint_every=0", f"train.mixed_precision={precision}", "model.gradient_checkpointing=true",
            f"model.reference_dtype={reference_dtype}", f"optim.optimizer={optimizer}", "data.caption_dropout=0"]
    if mode == "lora":
        over += ["lora.rank=8", f"model.base_dtype={base_dtype}"]
    if method == "inversion-dpo":
        over += (["method.symmetry_breaking=lora-init", "lora.init=gaussian"] if mode == "lora"
                 else ["method.symmetry_breaking=reference-dtype"])
    if method == "inpo":
        over += ["method.inversion_levels=10"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # peak RSS counts the pages of the mmap'd safetensors files read while loading (clean page cache the kernel
    # can drop); the peak of anonymous memory (sampled every 20 ms) is what the run itself allocated. On a machine
    # with swap, anonymous pages swapped out still belong to the run: the peak is of resident + swapped anon.
    peak_anon, peak_swap = [0], [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                          if line.startswith(("RssAnon:", "VmSwap:")))
            anon, swap = (int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "VmSwap"))
            if anon + swap > peak_anon[0] + peak_swap[0]:
                peak_anon[0], peak_swap[0] = anon, swap

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU warns that it is slow: measured on purpose
        try:
            train(load_config(None, over))
            seconds = round(time.perf_counter() - start, 1)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    stop.set()
    sampler.join()
    row = {"seconds": seconds,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
           "peak_anon_gib": (peak_anon[0] + peak_swap[0]) / 2**20, "swap_at_peak_gib": peak_swap[0] / 2**20}
    if device == "cuda":
        row["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return row


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def parse_case(text: str) -> dict:
    """``arch:method:lora|full:no|bf16|fp16[:base_dtype]``."""
    parts = text.split(":")
    if len(parts) not in (4, 5) or parts[2] not in ("lora", "full") or parts[3] not in ("no", "bf16", "fp16"):
        raise ValueError(f"case {text!r}: want arch:method:lora|full:no|bf16|fp16[:base_dtype]")
    return {"arch": parts[0], "method": parts[1], "mode": parts[2], "precision": parts[3],
            "base_dtype": parts[4] if len(parts) == 5 else "auto"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("one", "table"):
        s = sub.add_parser(name)
        s.add_argument("--resolution", type=int, default=128)
        s.add_argument("--device", default="cpu")
        s.add_argument("--optimizer", default="adafactor", help="the shipped SDXL configs' optimizer")
        s.add_argument("--reference-dtype", default="float16", help="the shipped configs' reference dtype")
    sub.choices["table"].add_argument("--work", required=True, help="folder for the pairs and their caches")
    one = sub.choices["one"]
    one.add_argument("--pipeline", required=True)
    one.add_argument("--pairs", required=True)
    one.add_argument("--cache", required=True)
    one.add_argument("--case", required=True, help="arch:method:lora|full:no|bf16|fp16[:base_dtype]")
    table = sub.choices["table"]
    table.add_argument("--pipeline", action="append", required=True, help="arch=folder (sd15=..., sdxl=...)")
    table.add_argument("--cases", nargs="+", required=True)
    table.add_argument("--need-gib", action="append", default=[],
                       help="arch:mode=GiB, a case's expected peak: skipped when MemAvailable < need + 4 GiB")
    table.add_argument("--json-out", default=None, help="also append each row as a JSON line here")
    table.add_argument("--out", default=None,
                       help="results folder: append the rows to memory-<device>-<date>.md and .jsonl there")
    args = p.parse_args(argv)

    if args.cmd == "one":
        case = parse_case(args.case)
        row = measure_one(args.pipeline, case["method"], case["mode"], case["precision"], case["base_dtype"],
                          args.resolution, args.device, args.optimizer, args.reference_dtype, Path(args.pairs),
                          Path(args.cache))
        print("MEASURED " + json.dumps({**case, **row}), flush=True)
        return 0

    folders = dict(item.split("=", 1) for item in args.pipeline)
    needs = dict(item.split("=", 1) for item in args.need_gib)
    cuda = args.device.startswith("cuda")
    header = ("| model | method | mode | precision | frozen base | resolution | peak RSS (GiB) | peak anon (GiB) "
              "| time (s) |" + (" CUDA max allocated (GiB) | CUDA max reserved (GiB) |" if cuda else ""))
    rule = "|---" * (9 + 2 * cuda) + "|"
    md_path, json_paths, meta = None, [args.json_out] if args.json_out else [], {}
    if args.out:
        import datetime as _dt

        import torch

        from benchmarks.common import device_slug, run_metadata

        dev = torch.device(args.device)
        stem = Path(args.out) / f"memory-{device_slug(dev)}-{_dt.date.today().isoformat()}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        md_path, meta = stem.with_suffix(".md"), run_metadata(dev)
        json_paths.append(str(stem.with_suffix(".jsonl")))
        if not md_path.exists():
            md_path.write_text(header + "\n" + rule + "\n")

    def emit(line: str) -> None:
        print(line, flush=True)
        if md_path is not None:
            with open(md_path, "a") as f:
                f.write(line + "\n")

    print(header)
    print(rule)
    failed = 0
    for text in args.cases:
        case = parse_case(text)
        base = "-" if case["mode"] == "full" else case["base_dtype"]
        head = (f"| {case['arch']} | {case['method']} | {case['mode']} | {case['precision']} | {base} | "
                f"{args.resolution} |")
        need = float(needs.get(f"{case['arch']}:{case['mode']}", 0))
        if need and available_gib() < need + 4:
            emit(f"{head} skipped: {available_gib():.1f} GiB available < {need} + 4 | | |")
            continue
        pairs, cache = pairs_and_cache(Path(args.work), case["arch"], folders[case["arch"]], args.resolution)
        cmd = [sys.executable, __file__, "one", "--pipeline", folders[case["arch"]], "--case", text,
               "--pairs", str(pairs), "--cache", str(cache),
               "--resolution", str(args.resolution), "--device", args.device, "--optimizer", args.optimizer,
               "--reference-dtype", args.reference_dtype]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            emit(f"{head} failed (rc {done.returncode}): {tail[0][:120]} | | |")
            sys.stderr.write(done.stderr[-4000:])
            failed += 1
            continue
        row = json.loads(lines[-1][len("MEASURED "):])
        gpu = (f" {row['cuda_max_allocated_gib']:.2f} | {row['cuda_max_reserved_gib']:.2f} |"
               if "cuda_max_allocated_gib" in row else "")
        swapped = f" ({row['swap_at_peak_gib']:.2f} of it swapped)" if row.get("swap_at_peak_gib") else ""
        emit(f"{head} {row['peak_rss_gib']:.2f} | {row.get('peak_anon_gib', float('nan')):.2f}{swapped} | "
             f"{row['seconds']} |{gpu}")
        for path in json_paths:
            with open(path, "a") as f:
                f.write(json.dumps({"device": args.device, **meta, **row, **case, "resolution": args.resolution,
                                    "optimizer": args.optimizer, "reference_dtype": args.reference_dtype}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
