"""Benchmark of `fastinpo cache` (issue 20): images/s and bytes/s of a cache build, bytes per pair, and the
reconstruction error of each ``data.cache_dtype``.

A Pick-a-Pic-shaped synthetic set (``--captions`` captions, ``--images-per-caption`` images each, every pair of
images of a caption a pair: images recur across pairs, captions across many pairs) is written as parquet, then
cached ``--repeats`` times into fresh folders through :func:`fastinpo.data.cache.build_cache` with the pipeline's
real VAE and text encoders (the tiny random pipeline unless ``--pipeline`` names one, e.g. a ``make-tiny-pipeline
--size full`` folder on a GPU). Rows:

- ``op=build``: median and spread (p10/p90) of the build's wall time; distinct images encoded per second, pairs per
  second, bytes written per second, bytes per pair (from the manifest);
- ``op=dtype_error``: for ``cache_dtype`` bfloat16 and float16, the error of the stored posterior mean / std
  against the float32 cache of the same build: relative RMS (‖x̂ − x‖ / ‖x‖) and the largest absolute error.

Rows go to ``benchmarks/results/cache-build-<device>-<date>.csv`` (``-smoke`` with ``--smoke``), with the
command, device, versions and commit.

Usage::

    python benchmarks/bench_cache_build.py            # 8 captions x 6 images (120 pairs), 5 repeats
    python benchmarks/bench_cache_build.py --smoke    # 3 captions x 4 images, 2 repeats, < 1 minute on a CPU
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import device_slug, loadavg, quantile, run_metadata  # noqa: E402

from fastinpo.data.cache import CachedPairDataset, build_cache  # noqa: E402
from fastinpo.data.pickapic import (  # noqa: E402
    PickAPicDataset,
    _synthetic_image,
    encode_image,
    write_pickapic_parquet,
)
from fastinpo.models.sd import Encoder, load_components, make_tiny_pipeline  # noqa: E402

FIELDS = ["timestamp", "device", "torch", "commit", "command", "op", "arch", "resolution", "pairs", "images",
          "captions", "cache_dtype", "median_s", "p10_s", "p90_s", "repeats", "images_per_s", "pairs_per_s",
          "bytes_written", "bytes_per_s", "bytes_per_pair", "rel_rms_err_mean", "max_abs_err_mean",
          "rel_rms_err_std", "max_abs_err_std", "threads", "loadavg_1m", "note"]


def pickapic_shaped(folder: Path, captions: int, per_caption: int, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(captions):
        imgs = [encode_image(_synthetic_image(rng, size + k, size, warm=k % 2 == 0)) for k in range(per_caption)]
        for a, b in itertools.combinations(range(per_caption), 2):
            l0 = float(len(rows) % 2)
            rows.append({"caption": f"a photograph of subject {c}, study {c * 7 % 5}", "jpg_0": imgs[a],
                         "jpg_1": imgs[b], "label_0": l0, "label_1": 1.0 - l0})
    write_pickapic_parquet(folder / "train-00000.parquet", rows)
    return len(rows)


def stored(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ds = CachedPairDataset(cache, expect={})
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x.latent_mean for x in items]), torch.stack([x.latent_std for x in items])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default=None, help="diffusers pipeline folder (default: a tiny random one)")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default="sdxl", help="arch of the tiny pipeline")
    p.add_argument("--resolution", type=int, default=None, help="R (default: 32 tiny, 1024 with --pipeline)")
    p.add_argument("--captions", type=int, default=8)
    p.add_argument("--images-per-caption", type=int, default=6)
    p.add_argument("--batch-pairs", type=int, default=2, help="data.cache_batch_pairs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="3 captions x 4 images, 2 repeats")
    p.add_argument("--out", default=None, help="results CSV (default benchmarks/results/cache-build-...)")
    args = p.parse_args(argv)
    if args.smoke:
        args.captions, args.images_per_caption, args.repeats = 3, 4, 2
    dev = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        pipe = Path(args.pipeline) if args.pipeline else make_tiny_pipeline(work / "pipe", args.arch, seed=0,
                                                                           sample_size=32)
        res = args.resolution or (1024 if args.pipeline else 32)
        n_pairs = pickapic_shaped(work / "data", args.captions, args.images_per_caption, res + res // 4)
        dataset = PickAPicDataset(work / "data", res)
        comps = load_components(pipe, load_unet=False, dtype=torch.bfloat16 if dev.type == "cuda" and
                                args.pipeline else torch.float32)
        encoder = Encoder(comps, dev)
        meta = run_metadata(dev)
        common = {**meta, "arch": encoder.arch, "resolution": res, "pairs": n_pairs,
                  "threads": torch.get_num_threads(), "loadavg_1m": loadavg()}
        rows = []
        times, manifest = [], None
        build_cache(dataset, encoder, work / "warmup", batch_size=args.batch_pairs, progress=False)  # warm-up
        for r in range(args.repeats + 1 if args.repeats else 1):
            folder = work / f"c{r}"
            t0 = time.perf_counter()
            manifest = build_cache(dataset, encoder, folder, batch_size=args.batch_pairs, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            if r < args.repeats:
                shutil.rmtree(folder)
        float32_cache = work / f"c{len(times) - 1}"
        times = times[:max(1, args.repeats)]
        med = quantile(times, 0.5)
        written = manifest["bytes_total"]
        rows.append({**common, "op": "build", "images": manifest["num_images"], "captions": manifest["num_captions"],
                     "cache_dtype": "float32", "median_s": f"{med:.4g}", "p10_s": f"{quantile(times, 0.1):.4g}",
                     "p90_s": f"{quantile(times, 0.9):.4g}", "repeats": len(times),
                     "images_per_s": f"{manifest['num_images'] / med:.4g}", "pairs_per_s": f"{n_pairs / med:.4g}",
                     "bytes_written": written, "bytes_per_s": f"{written / med:.4g}",
                     "bytes_per_pair": manifest["bytes_per_pair"],
                     "note": "Pick-a-Pic-shaped synthetic set; whole build (plan + VAE + text + pairs table)"})
        ref_mean, ref_std = stored(float32_cache)
        for dtype in ("bfloat16", "float16"):
            m = build_cache(dataset, encoder, work / dtype, batch_size=args.batch_pairs, cache_dtype=dtype,
                            progress=False)
            mean, std = stored(work / dtype)
            rows.append({**common, "op": "dtype_error", "images": m["num_images"], "captions": m["num_captions"],
                         "cache_dtype": dtype, "bytes_written": m["bytes_total"],
                         "bytes_per_pair": m["bytes_per_pair"],
                         "rel_rms_err_mean": f"{((mean - ref_mean).norm() / ref_mean.norm()).item():.3g}",
                         "max_abs_err_mean": f"{(mean - ref_mean).abs().max().item():.3g}",
                         "rel_rms_err_std": f"{((std - ref_std).norm() / ref_std.norm()).item():.3g}",
                         "max_abs_err_std": f"{(std - ref_std).abs().max().item():.3g}",
                         "note": f"vs the float32 cache; |mean| max {ref_mean.abs().max().item():.3g}, "
                                 f"std max {ref_std.max().item():.3g}"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    date = _dt.date.today().isoformat()
    out = Path(args.out) if args.out else HERE / "results" / (
        f"cache-build-{device_slug(dev)}-{date}{'-smoke' if args.smoke else ''}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.is_file()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    for row in rows:
        print({k: row.get(k) for k in ("op", "cache_dtype", "median_s", "images_per_s", "bytes_per_s",
                                       "bytes_per_pair", "rel_rms_err_mean", "rel_rms_err_std")})
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
