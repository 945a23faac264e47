"""The ``fastinpo`` command line.

Subcommands: ``env`` (what runs here), ``quickstart`` (the API end to end on a tiny UNet), ``make-tiny-pipeline``,
``make-tiny-data``, ``data inspect``, ``cache``, ``train``, ``export``, ``sample``, ``eval``, ``demo`` and ``bench``.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from fastinpo.env import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from fastinpo.quickstart import run

    run(pairs=args.pairs, seed=args.seed, backend=args.backend)
    return 0


def _load(args: argparse.Namespace):
    from fastinpo.config import load_config

    return load_config(args.config, args.set or [])


def _cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        from fastinpo.config import help_text

        print(help_text())
        return 0
    if args.config is None and not args.set:
        raise ValueError("give a config file (TOML/YAML) and/or --set section.key=value overrides")
    from fastinpo.train import train

    summary = train(_load(args), resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _dataset(config):
    """The config's pair source (any kind of docs/DATA.md) as the one dataset."""
    from fastinpo.data.pickapic import PickAPicDataset

    d = config.data
    return PickAPicDataset(d.path, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip,
                           keep_ties=d.keep_ties, per_sample_time_ids=d.per_sample_time_ids, max_rows=d.max_rows,
                           seed=config.train.seed, keep_empty_captions=d.keep_empty_captions)


def _launch_ranks():
    """``(rank, world_size, barrier, device index)`` of a ``torchrun`` launch (gloo on the CPU, NCCL on GPUs), or
    the one-process form when no launcher set ``WORLD_SIZE``."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None, None
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier, local


def _cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from fastinpo.config import local_path_problems
    from fastinpo.data.cache import build_cache
    from fastinpo.data.pickapic import describe_skipped
    from fastinpo.models.family import family_for_folder
    from fastinpo.train.engine import pick_device
    from fastinpo.train.models import DTYPES

    config = _load(args)
    d = config.data
    if not d.cache_dir:
        raise ValueError("data.cache_dir must say where the cache goes")
    problems = local_path_problems(config)
    if problems:
        raise ValueError("the cache cannot be built:\n  " + "\n  ".join(problems))
    rank, world, barrier, local = _launch_ranks()
    try:
        dataset = _dataset(config)
        device = pick_device(config.train.device)
        if device.type == "cuda" and local is not None:
            device = torch.device("cuda", local)
        family = family_for_folder(config.model.path)
        components = family.load_components(config.model.path, load_unet=False,
                                            dtype=DTYPES[config.model.encoder_dtype])
        encoder = family.make_encoder(components, device, vae_slicing=d.vae_slicing, vae_tiling=d.vae_tiling)
        # the std is stored only for runs that draw latent samples: with data.latent_sample = false it is never read
        manifest = build_cache(dataset, encoder, d.cache_dir, embed_dtype=getattr(torch, d.cache_embed_dtype),
                               cache_dtype=getattr(torch, d.cache_dtype), batch_size=d.cache_batch_pairs,
                               shard_size=d.cache_shard_size,
                               store_std=d.latent_sample, overwrite=args.overwrite,
                               allow_frozen_augmentation=args.allow_frozen_augmentation, rank=rank,
                               world_size=world, barrier=barrier)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        # the counts of the manifest, after decoding: pairs whose images turned out undecodable are not in the cache
        print(f"cache ready in {d.cache_dir}: {manifest['num_pairs']} pairs cached ({manifest['num_captions']} "
              f"distinct captions, {manifest['num_images']} distinct images, {manifest['bytes_per_pair']} bytes per "
              f"pair); rows skipped: {describe_skipped(manifest['skipped'])}")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastinpo.config import load_config
    from fastinpo.data.inspection import format_report, inspect

    target = Path(args.target)
    if target.is_file() and target.suffix in (".toml", ".yaml", ".yml", ".json"):
        config = load_config(target, args.set or [])
    else:  # a data path: the config's defaults, the path and any --set
        config = load_config(None, [f"data.path={target}", *(args.set or [])], validate=False)
    d = config.data
    report = inspect(_dataset(config), model_path=config.model.path or None, cache_dtype=d.cache_dtype,
                     embed_dtype=d.cache_embed_dtype, store_std=d.latent_sample,
                     sheet=None if args.no_sheet else args.sheet, sheet_pairs=args.pairs, progress=not args.json)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    if args.size == "full" and args.arch == "sd3":  # SD3.5-medium, random weights, no T5
        import torch

        from fastinpo.models.full_size import make_full_sd3_pipeline

        out = make_full_sd3_pipeline(args.out, dtype=getattr(torch, args.dtype), resolution=args.resolution or 1024,
                                     seed=args.seed, device=args.device, overwrite=args.overwrite)
        print(f"real-size SD3.5-medium pipeline (random weights, {args.dtype}, no T5) written to {out}")
        return 0
    if args.size == "full":  # the real SD1.5 / SDXL architectures, random weights
        import torch

        from fastinpo.models.full_size import make_full_pipeline

        out = make_full_pipeline(args.out, args.arch, dtype=getattr(torch, args.dtype), resolution=args.resolution,
                                 seed=args.seed, device=args.device, overwrite=args.overwrite)
        print(f"real-size {args.arch} pipeline (random weights, {args.dtype}) written to {out}")
        return 0
    if args.dtype != "float32" or args.device != "cpu" or args.overwrite:
        raise ValueError("--dtype, --device and --overwrite apply to --size full (the tiny pipeline is float32, "
                         "built on the CPU)")
    if args.arch == "sd3":
        from fastinpo.models.sd3 import make_tiny_sd3_pipeline

        out = make_tiny_sd3_pipeline(args.out, seed=args.seed, sample_size=args.resolution or 32)
    else:
        from fastinpo.models.sd import make_tiny_pipeline

        out = make_tiny_pipeline(args.out, args.arch, seed=args.seed, sample_size=args.resolution or 32)
    print(f"tiny {args.arch} pipeline written to {out}")
    return 0


def _cmd_make_tiny_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_pickapic_parquet(out / "train-00000.parquet", synthetic_rows(args.rows, args.resolution, args.seed))
    print(f"{args.rows} synthetic Pick-a-Pic-format rows (with ties) written to {path}")
    return 0


def _run_bench(argv: list[str]) -> int:
    """Run benchmarks/bench_train_step.py (it lives in the source tree, beside the package, not inside it)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: `fastinpo bench` runs from a source checkout "
                                "(pip install -e .)")
    spec = importlib.util.spec_from_file_location("fastinpo_bench_train_step", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinpo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="print versions, devices and which backends can run here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("quickstart", help="InPO inversion + DPO losses + backward on a tiny SDXL-shaped UNet")
    p.add_argument("--pairs", type=int, default=3, help="preference pairs in the batch (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backend", default=None, help="backend of the loss and the inversion step (default: automatic)")
    p.set_defaults(func=_cmd_quickstart)

    for name, func, helptext in (
        ("train", _cmd_train, "train with a config (SFT, Diffusion-DPO, DDIM-InPO, Inversion-DPO)"),
        ("cache", _cmd_cache, "precompute VAE latents and text embeddings for a config (on N processes: "
                              "torchrun --nproc_per_node N -m fastinpo.cli cache CONFIG)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", nargs="?", help="TOML or YAML config file")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
        if name == "train":
            p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
            p.add_argument("--help-config", action="store_true", help="list every config key with its doc")
            p.add_argument("--overwrite", action="store_true",
                           help="train.output_dir holds a run: move it aside (renamed, never deleted) and start anew")
        else:
            p.add_argument("--overwrite", action="store_true",
                           help="replace a cache that data.cache_dir holds for other settings (deletes it)")
            p.add_argument("--allow-frozen-augmentation", action="store_true",
                           help="cache a dataset with random crop/flip anyway (one draw per pair, frozen)")
        p.set_defaults(func=func)

    p = sub.add_parser("data", help="look at preference data: `fastinpo data inspect CONFIG|PATH`")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("inspect", help="rows, usable pairs, skips by reason, distinct captions/images, projected "
                            "cache size, and a contact sheet PNG (winner left, loser right, caption under)")
    p.add_argument("target", help="a config file (TOML/YAML/JSON) or a data path (any kind of docs/DATA.md)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. data.resolution=1024 or model.path=...")
    p.add_argument("--sheet", default="contact_sheet.png", help="where the contact sheet PNG goes")
    p.add_argument("--pairs", type=int, default=8, help="pairs on the contact sheet (default 8)")
    p.add_argument("--no-sheet", action="store_true", help="no contact sheet")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_data_inspect)

    p = sub.add_parser("make-tiny-pipeline", help="write a random SD1.5/SDXL/SD3 pipeline (diffusers layout): tiny, "
                       "or the real architectures with --size full")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=("sd15", "sdxl", "sd3"), default="sdxl",
                   help="sd15, sdxl, or sd3 (an SD3.5-structured MM-DiT, flow matching, no T5; --size full: the "
                        "SD3.5-medium configs)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny (~0.3M-parameter UNet) or full (the real SD1.5 / SDXL configs: SDXL needs ~11 GiB in "
                        "float32, build it with --device cuda and --dtype bfloat16 where possible)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image resolution the VAE is built for (default 32 tiny; 512 / 1024 full)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="stored weight dtype (--size full)")
    p.add_argument("--device", default="cpu", help="where the parts are built before writing (--size full)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder (--size full)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("make-tiny-data", help="write synthetic preference pairs as a Pick-a-Pic parquet folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--resolution", type=int, default=40, help="smallest side of the synthetic images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny_data)

    from fastinpo import demo
    from fastinpo.eval import evaluate, sampling
    from fastinpo.train import export_checkpoint

    sampling.add_cli(sub)  # fastinpo sample
    evaluate.add_cli(sub)  # fastinpo eval
    demo.add_cli(sub)  # fastinpo demo
    export_checkpoint.add_cli(sub)  # fastinpo export

    # the benchmark script parses its own options (`fastinpo bench --help` shows them)
    p = sub.add_parser("bench", add_help=False, help="training-step throughput: fastinpo vs the public-script "
                       "reference (benchmarks/bench_train_step.py)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _run_bench(args.args))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # all options belong to the benchmark script's own parser
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"fastinpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
