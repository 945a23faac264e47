"""``fastinpo export RUN --checkpoint best|latest|step-N``: write any checkpoint of a run for a stock diffusers
pipeline — the best one that ``train.keep_best`` kept, the newest, or a given step — in the same format as the
run's own ``export/`` (``unet/`` or ``lora/``, :func:`fastinpo.models.export.export_policy`).

The policy is rebuilt from the configuration the checkpoint records (``model.path``, ``model.unet_init``, the LoRA
settings) and its trainable weights are loaded from the checkpoint. The export goes to ``RUN/export-<checkpoint>``
unless ``--out`` says otherwise; an existing export is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastinpo.config import from_dict
from fastinpo.train import checkpoint as ckpt


def export_checkpoint(run_dir: str | Path, which: str = "best", out: str | Path | None = None, *,
                      overwrite: bool = False) -> Path:
    """Export checkpoint ``which`` (``best``, ``latest`` or ``step-N``) of the run in ``run_dir``; returns the
    export folder."""
    from safetensors.torch import load_file

    from fastinpo.models.export import export_policy
    from fastinpo.models.sd import load_components
    from fastinpo.train.models import prepare_policy

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    path = ckpt.resolve_checkpoint(run, which)
    state = json.loads((path / "state.json").read_text())
    if state.get("backend", "none") != "none":
        raise ValueError(f"checkpoint {path} holds DeepSpeed ZeRO shards; exporting one is not supported yet "
                         "(the run's own export/ is gathered at its end)")
    if "config" not in state:
        raise ValueError(f"checkpoint {path} records no config (written by an older fastinpo): export it by "
                         "resuming the run")
    config = from_dict(state["config"])
    target = Path(out) if out is not None else run / f"export-{path.name}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: pass --overwrite to replace it, or --out elsewhere")
    components = load_components(config.model.path, load_vae=False, load_text=False)
    unet, lora = prepare_policy(config, components.unet, torch.device("cpu"))
    weights = load_file(path / ckpt.WEIGHTS)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if set(weights) != set(trainable):
        raise ValueError(f"checkpoint {path} does not match the policy its config builds "
                         f"({len(weights)} tensors saved, {len(trainable)} trainable)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    return export_policy(target, unet, lora=lora, arch=components.arch)


def add_cli(subparsers):
    p = subparsers.add_parser("export", help="export a checkpoint of a run (best, latest or step-N) for a stock "
                              "diffusers pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run folder (train.output_dir)")
    p.add_argument("--checkpoint", default="best",
                   help="best (kept by train.keep_best; default), latest, or step-N")
    p.add_argument("--out", default=None, help="export folder (default: RUN/export-<checkpoint folder name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")

    def run(args) -> int:
        out = export_checkpoint(args.run, args.checkpoint, args.out, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} checkpoint of {args.run} to {out}")
        return 0

    p.set_defaults(func=run)
    return p
