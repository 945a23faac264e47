"""Evaluation: score folders written by ``fastinpo sample`` and compare models as the papers do.

:func:`run_eval` reads each folder's ``metadata.jsonl``, checks that all folders hold the same (prompt, seed) set
(so each comparison is between images that started from the same noise), scores every image with every scorer,
and writes into ``out_dir``:

- ``scores.jsonl``: one line per (image, scorer): folder, model, file, prompt, seed, scorer, score;
- ``summary.json``: per model and scorer mean, std (ddof 1), standard error and n; per pair of models and scorer
  the win rate of A over B with a bootstrap CI; which scorers did not run and why;
- ``report.md``: the same as markdown tables;
- ``scores.png``: a bar chart of the means (error bars: standard error).

Win rate of A over B: each (prompt, seed) counts 1 if A's image scores higher, 0.5 on a tie, 0 otherwise; the
outcomes are averaged per prompt, and the win rate is the mean over prompts (equal to the mean over images when
every prompt has the same seeds). The 95% CI is a percentile bootstrap that resamples prompts (the unit that is
drawn from a prompt set; seeds of one prompt are not independent), with a fixed seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastinpo.eval.scorers import SCORER_NAMES, Scorer


# ----------------------------------------------------------------------------------------------- statistics
def win_outcomes(a_scores: Sequence[float], b_scores: Sequence[float]) -> np.ndarray:
    """1.0 where ``a > b``, 0.5 where equal, 0.0 where ``a < b`` (elementwise, paired)."""
    a = np.asarray(a_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(b_scores, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores: {a.size} for A, {b.size} for B")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("win rate of non-finite scores")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float]) -> float:
    """Fraction of pairs where A scores higher than B, ties counted as half."""
    out = win_outcomes(a_scores, b_scores)
    if out.size == 0:
        raise ValueError("win rate of no pairs")
    return float(out.mean())


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values``: ``n`` resamples with replacement drawn from
    ``numpy.random.default_rng(seed)`` (so a report is reproducible). One value gives ``(v, v)``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap of no values")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1; 0 for one value), standard error ``std / sqrt(n)`` and n."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("statistics of no values")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "sem": std / math.sqrt(v.size), "n": int(v.size)}


def per_prompt_outcomes(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> dict[str, float]:
    """``{prompt: mean win outcome of A over B across that prompt's seeds}`` (first-seen prompt order)."""
    if set(a) != set(b):
        raise ValueError("per-prompt win rates need the same (prompt, seed) pairs on both sides")
    grouped: dict[str, list[float]] = {}
    keys = list(a)
    outcomes = win_outcomes([a[k] for k in keys], [b[k] for k in keys])
    for (prompt, _), o in zip(keys, outcomes, strict=True):
        grouped.setdefault(prompt, []).append(float(o))
    return {p: float(np.mean(o)) for p, o in grouped.items()}


# ----------------------------------------------------------------------------------------------- folders
@dataclass
class SampleFolder:
    path: Path
    name: str
    records: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> list[tuple[str, int]]:
        return [(r["prompt"], int(r["seed"])) for r in self.records]


def read_folder(path: str | Path, name: str | None = None) -> SampleFolder:
    """A ``fastinpo sample`` output folder: its metadata (every line needs ``file``, ``prompt``, ``seed``) with
    every listed image present; one error naming what is wrong."""
    path = Path(path)
    meta = path / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a `fastinpo sample` folder: {meta} is missing")
    records = []
    for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta} line {line_no}: not JSON ({err.msg})") from None
        missing = [k for k in ("file", "prompt", "seed") if k not in rec]
        if missing:
            raise ValueError(f"{meta} line {line_no}: missing {missing} (expected file, prompt, seed)")
        records.append(rec)
    if not records:
        raise ValueError(f"{meta} lists no image")
    absent = [r["file"] for r in records if not (path / r["file"]).is_file()]
    if absent:
        raise FileNotFoundError(f"{path}: {len(absent)} image(s) listed in metadata.jsonl are missing: "
                                f"{absent[:5]}{' ...' if len(absent) > 5 else ''}")
    keys = [(r["prompt"], int(r["seed"])) for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{meta}: (prompt, seed) {dup} appears more than once")
    settings_path = path / "settings.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    return SampleFolder(path, name or path.name, records, settings)


def check_same_pairs(folders: Sequence[SampleFolder]) -> None:
    """All folders must hold the same (prompt, seed) set: otherwise an error listing what differs."""
    ref = folders[0]
    ref_keys = set(ref.keys())
    problems = []
    for f in folders[1:]:
        keys = set(f.keys())
        if keys != ref_keys:
            only_ref = sorted(ref_keys - keys)
            only_f = sorted(keys - ref_keys)
            problems.append(f"{f.path} vs {ref.path}: {len(only_ref)} (prompt, seed) pair(s) only in {ref.name} "
                            f"{only_ref[:3]}{' ...' if len(only_ref) > 3 else ''}, {len(only_f)} only in {f.name} "
                            f"{only_f[:3]}{' ...' if len(only_f) > 3 else ''}")
    if problems:
        raise ValueError("the folders do not hold the same (prompt, seed) set, so their images cannot be compared "
                         "pair by pair (sample every model with the same prompts and seeds): " + "; ".join(problems))


# The sampling settings that change the images of a (prompt, seed): folders compared pair by pair must agree on them.
COMPARED_SETTINGS = ("steps", "guidance_scale", "height", "width", "scheduler", "scheduler_class",
                     "negative_prompt")


def sampling_settings(folder: SampleFolder) -> dict[str, Any]:
    """The folder's :data:`COMPARED_SETTINGS`, from ``settings.json`` or else its first metadata line (``None``
    where neither says)."""
    first = folder.records[0]
    return {k: folder.settings.get(k, first.get(k)) for k in COMPARED_SETTINGS}


def settings_differences(folders: Sequence[SampleFolder]) -> list[str]:
    """One line per sampling setting in which a folder differs from the first."""
    ref = sampling_settings(folders[0])
    diffs = []
    for f in folders[1:]:
        other = sampling_settings(f)
        diffs += [f"{k}: {ref[k]!r} in {folders[0].name} vs {other[k]!r} in {f.name}"
                  for k in COMPARED_SETTINGS if other[k] != ref[k]]
    return diffs


def check_same_settings(folders: Sequence[SampleFolder], allow_different: bool = False) -> list[str]:
    """Folders sampled with different settings (steps, CFG, resolution, scheduler, negative prompt) do not compare
    like with like: an error naming each difference, or with ``allow_different`` the same lines as a loud
    warning. Returns the differences."""
    import warnings

    diffs = settings_differences(folders)
    if diffs and not allow_different:
        raise ValueError("the folders were sampled with different settings, so a win rate would measure the "
                         "settings, not the models: " + "; ".join(diffs) + ". Sample them again with the same "
                         "settings, or pass --allow-different-settings to compare anyway")
    if diffs:
        warnings.warn("COMPARING FOLDERS SAMPLED WITH DIFFERENT SETTINGS: " + "; ".join(diffs), stacklevel=2)
    return diffs


def _unique_names(folders: Sequence[SampleFolder]) -> list[str]:
    """Each folder's model name: the ``sample --name`` it was written with (else the folder's name); folder paths
    where two names clash."""
    names = [f.settings.get("name") or f.path.name for f in folders]
    return names if len(set(names)) == len(names) else [str(f.path) for f in folders]


def load_folders(folders: Sequence[str | Path | SampleFolder], *,
                 allow_different_settings: bool = False) -> list[SampleFolder]:
    """Read and check the folders to compare: each complete, all with the same (prompt, seed) set and the same
    sampling settings. Cheap (metadata only), so ``eval`` runs it before any scorer's weights load."""
    if not folders:
        raise ValueError("give at least one sample folder")
    read = [f if isinstance(f, SampleFolder) else read_folder(f) for f in folders]
    for f, name in zip(read, _unique_names(read), strict=True):
        f.name = name
    check_same_pairs(read)
    check_same_settings(read, allow_different_settings)
    return read


# ----------------------------------------------------------------------------------------------- run
def run_eval(folders: Sequence[str | Path | SampleFolder], scorers: dict[str, Scorer], out_dir: str | Path, *,
             not_run: dict[str, str] | None = None, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
             chunk: int = 64, progress: bool = True, allow_different_settings: bool = False) -> dict[str, Any]:
    """Score ``folders`` (outputs of ``fastinpo sample``) with ``scorers`` and write the report (module doc).

    ``not_run``: scorers that were asked for but not built, with the reason (reported, never given a score).
    Pairs are (folders[i], folders[j]) for i < j, reported as "A vs B" with the win rate of A: put the aligned
    model first to read "aligned vs base". Models are named by ``sample --name`` (else their folder's name).
    Folders sampled with different settings are refused unless ``allow_different_settings``.
    Returns the summary written to ``summary.json``.
    """
    from tqdm.auto import tqdm

    if not scorers:
        raise ValueError("no scorer to run: give at least one scorer's weights (or a reward function)")
    sample_folders = load_folders(folders, allow_different_settings=allow_different_settings)
    differences = settings_differences(sample_folders)  # empty unless allowed: load_folders refuses them
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # scores[model][scorer][(prompt, seed)]
    scores: dict[str, dict[str, dict[tuple[str, int], float]]] = {f.name: {s: {} for s in scorers}
                                                                  for f in sample_folders}
    total = sum(len(f.records) for f in sample_folders)
    with (out / "scores.jsonl").open("w", encoding="utf-8") as sink, \
            tqdm(total=total, desc="scoring", unit="img", disable=not progress) as bar:
        for folder in sample_folders:
            for start in range(0, len(folder.records), chunk):
                recs = folder.records[start:start + chunk]
                images = []
                for r in recs:
                    with Image.open(folder.path / r["file"]) as im:
                        images.append(im.convert("RGB"))
                prompts = [r["prompt"] for r in recs]
                for sname, scorer in scorers.items():
                    vals = torch.as_tensor(scorer.score(images, prompts)).detach().double().cpu().reshape(-1)
                    if vals.numel() != len(recs):
                        raise ValueError(f"scorer {sname} returned {vals.numel()} scores for {len(recs)} images")
                    bad = [recs[i]["file"] for i in range(len(recs)) if not math.isfinite(float(vals[i]))]
                    if bad:
                        raise ValueError(f"scorer {sname} gave non-finite scores in {folder.path}: {bad[:5]}")
                    for r, v in zip(recs, vals.tolist(), strict=True):
                        scores[folder.name][sname][(r["prompt"], int(r["seed"]))] = v
                        sink.write(json.dumps({"folder": str(folder.path), "model": folder.name, "file": r["file"],
                                               "prompt": r["prompt"], "seed": int(r["seed"]), "scorer": sname,
                                               "score": v}, ensure_ascii=False) + "\n")
                bar.update(len(recs))

    means = {f.name: {s: mean_stats(list(scores[f.name][s].values())) for s in scorers} for f in sample_folders}
    wins = []
    for fa, fb in itertools.combinations(sample_folders, 2):
        for s in scorers:
            a, b = scores[fa.name][s], scores[fb.name][s]
            per_prompt = per_prompt_outcomes(a, b)
            keys = list(a)
            outcomes = win_outcomes([a[k] for k in keys], [b[k] for k in keys])
            lo, hi = bootstrap_ci(list(per_prompt.values()), n=n_bootstrap, seed=seed, level=level)
            wins.append({"a": fa.name, "b": fb.name, "scorer": s, "win_rate": float(np.mean(list(per_prompt.values()))),
                         "ci_low": lo, "ci_high": hi, "n_prompts": len(per_prompt), "n_pairs": len(keys),
                         "a_wins": int((outcomes == 1.0).sum()), "ties": int((outcomes == 0.5).sum()),
                         "b_wins": int((outcomes == 0.0).sum())})
    summary = {
        "models": [{"name": f.name, "folder": str(f.path), "n_images": len(f.records),
                    "model": f.settings.get("model"), "unet": f.settings.get("unet"), "lora": f.settings.get("lora")}
                   for f in sample_folders],
        "sampling_settings": {f.name: sampling_settings(f) for f in sample_folders},
        "settings_differences": differences,
        "scorers_run": list(scorers),
        "scorers_not_run": dict(not_run or {}),
        "means": means,
        "win_rates": wins,
        "bootstrap": {"n": n_bootstrap, "seed": seed, "level": level, "resampled": "prompts"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(format_report(summary))
    bar_chart(summary, out / "scores.png")
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The markdown report of a summary."""
    scorers = summary["scorers_run"]
    lines = ["# fastinpo eval", ""]
    lines += ["Models: " + ", ".join(f"`{m['name']}` ({m['n_images']} images, {m['folder']})"
                                     for m in summary["models"]), ""]
    lines += ["## Scores", "", "mean ± std (standard error), per image.", ""]
    lines += ["| model | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
    for m in summary["models"]:
        cells = [f"{s['mean']:.4g} ± {s['std']:.3g} ({s['sem']:.2g})"
                 for s in (summary["means"][m["name"]][k] for k in scorers)]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    settings = summary.get("sampling_settings", {})
    if settings:
        keys = list(next(iter(settings.values())))
        lines += ["## Sampling settings", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(str(v) for v in vals.values()) + " |" for name, vals in settings.items()]
        lines.append("")
    if summary.get("settings_differences"):
        lines += ["**Warning: these folders were sampled with different settings** (compared on request):", ""]
        lines += [f"- {d}" for d in summary["settings_differences"]]
        lines.append("")
    if summary["scorers_not_run"]:
        lines += ["Not run (no score is reported for these):", ""]
        lines += [f"- {k}: {v}" for k, v in summary["scorers_not_run"].items()]
        lines.append("")
    if summary["win_rates"]:
        b = summary["bootstrap"]
        lines += ["## Win rates", "",
                  f"Win rate of A over B: same prompt and seed, ties count 0.5, averaged per prompt then over prompts; "
                  f"[{100 * b['level']:.0f}% bootstrap CI over prompts, {b['n']} resamples, seed {b['seed']}].", ""]
        lines += ["| A vs B (win rate of A: A wins) | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
        pairs = list(dict.fromkeys((w["a"], w["b"]) for w in summary["win_rates"]))
        for a, bb in pairs:
            cells = []
            for s in scorers:
                w = next(x for x in summary["win_rates"] if (x["a"], x["b"], x["scorer"]) == (a, bb, s))
                cells.append(f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]")
            lines.append(f"| {a} vs {bb} | " + " | ".join(cells) + " |")
        n = summary["win_rates"][0]
        lines += ["", f"{n['n_prompts']} prompts, {n['n_pairs']} (prompt, seed) pairs per comparison.", ""]
    return "\n".join(lines)


def bar_chart(summary: dict[str, Any], path: str | Path) -> Path:
    """One panel per scorer (their scales differ), one bar per model: the mean, error bar the standard error."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display: write the file only
    import matplotlib.pyplot as plt

    scorers = summary["scorers_run"]
    models = [m["name"] for m in summary["models"]]
    fig, axes = plt.subplots(1, len(scorers), figsize=(max(3.0, 1.2 * len(models) + 1.5) * len(scorers), 3.6),
                             squeeze=False)
    for ax, s in zip(axes[0], scorers, strict=True):
        stats = [summary["means"][m][s] for m in models]
        ax.bar(range(len(models)), [x["mean"] for x in stats], yerr=[x["sem"] for x in stats], capsize=4,
               color=[f"C{i}" for i in range(len(models))])
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
        ax.set_title(s)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------- CLI
def _import_reward(spec: str) -> tuple[str, Scorer]:
    """``NAME=module:function`` -> a CallableScorer of ``function(images, prompts)``."""
    import importlib

    from fastinpo.eval.scorers import CallableScorer

    name, sep, target = spec.partition("=")
    mod_name, sep2, attr = target.partition(":")
    if not sep or not sep2 or not name or not mod_name or not attr:
        raise ValueError(f"--reward expects NAME=module:function, got {spec!r}")
    fn = getattr(importlib.import_module(mod_name), attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {mod_name}.{attr} is not a callable")
    return name, CallableScorer(fn, name=name)


def build_scorers(args: argparse.Namespace) -> tuple[dict[str, Scorer], dict[str, str]]:
    """The scorers whose weights the arguments give, and the others with the reason they do not run."""
    from fastinpo.eval import scorers as sc
    from fastinpo.eval.sampling import resolve_device

    device = resolve_device(args.device)
    kw = {"device": device, "batch_size": args.batch_size}
    built: dict[str, Scorer] = {}
    not_run: dict[str, str] = {}
    if args.pickscore:
        built["pickscore"] = sc.PickScore(args.pickscore, args.pickscore_processor, **kw)
    else:
        not_run["pickscore"] = "no weights given (--pickscore FOLDER --pickscore-processor FOLDER)"
    if args.hpsv2:
        built["hpsv2"] = sc.HPSv2(args.hpsv2, args.hpsv2_config, **kw)
    else:
        not_run["hpsv2"] = "no weights given (--hpsv2 HPS_v2_compressed.pt)"
    if args.imagereward:
        if not (args.imagereward_med_config and args.imagereward_tokenizer):
            raise ValueError("--imagereward also needs --imagereward-med-config (med_config.json) and "
                             "--imagereward-tokenizer (a local bert-base-uncased tokenizer folder)")
        built["imagereward"] = sc.ImageRewardScorer(args.imagereward, args.imagereward_med_config,
                                                    args.imagereward_tokenizer, **kw)
    else:
        not_run["imagereward"] = ("no weights given (--imagereward ImageReward.pt --imagereward-med-config "
                                  "med_config.json --imagereward-tokenizer FOLDER)")
    if args.aesthetic:
        if not args.aesthetic_clip:
            raise ValueError("--aesthetic also needs --aesthetic-clip (CLIP ViT-L/14: a transformers folder or an "
                             "open_clip checkpoint)")
        built["aesthetic"] = sc.AestheticScorer(args.aesthetic, args.aesthetic_clip,
                                                open_clip_config_name=args.aesthetic_clip_config, **kw)
    else:
        not_run["aesthetic"] = "no weights given (--aesthetic HEAD.pth --aesthetic-clip CLIP)"
    if args.clip:
        built["clip"] = sc.ClipScore(args.clip, open_clip_config_name=args.clip_config,
                                     processor=args.clip_processor, **kw)
    else:
        not_run["clip"] = "no weights given (--clip CLIP)"
    for spec in args.reward or []:
        name, scorer = _import_reward(spec)
        if name in built or name in SCORER_NAMES:
            raise ValueError(f"--reward name {name!r} clashes with a built-in scorer; choose another")
        built[name] = scorer
    return built, not_run


def _cmd_eval(args: argparse.Namespace) -> int:
    # the folders first: a mismatch must not wait for multi-GB scorer weights to load
    folders = load_folders(args.folders, allow_different_settings=args.allow_different_settings)
    for f in folders:
        print(f"{f.name}: {f.path} ({len(f.records)} images) " +
              ", ".join(f"{k}={v}" for k, v in sampling_settings(f).items()))
    scorers, not_run = build_scorers(args)
    summary = run_eval(folders, scorers, args.out, not_run=not_run, n_bootstrap=args.bootstrap,
                       seed=args.seed, progress=not args.no_progress,
                       allow_different_settings=args.allow_different_settings)
    print(format_report(summary))
    print(f"scores.jsonl, summary.json, report.md and scores.png written to {args.out}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``fastinpo`` argparse subparsers object."""
    p = subparsers.add_parser("eval", help="score `sample` folders (PickScore, HPSv2, ImageReward, aesthetic, CLIP) "
                                           "and report win rates")
    p.add_argument("folders", nargs="+", help="folders written by `fastinpo sample`, aligned model first: each pair "
                                              "(A, B) in this order is reported as the win rate of A over B")
    p.add_argument("--allow-different-settings", action="store_true",
                   help="compare folders sampled with different steps/CFG/resolution/scheduler (warns loudly)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--pickscore", default=None, help="PickScore_v1 folder (transformers CLIPModel)")
    p.add_argument("--pickscore-processor", default=None,
                   help="CLIP-ViT-H-14-laion2B-s32B-b79K processor folder (tokenizer + preprocessor_config.json)")
    p.add_argument("--hpsv2", default=None, help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    p.add_argument("--hpsv2-config", default="ViT-H-14", help="open_clip config name or JSON (default ViT-H-14)")
    p.add_argument("--imagereward", default=None, help="ImageReward.pt")
    p.add_argument("--imagereward-med-config", default=None, help="ImageReward's med_config.json")
    p.add_argument("--imagereward-tokenizer", default=None, help="local bert-base-uncased tokenizer folder")
    p.add_argument("--aesthetic", default=None, help="sac+logos+ava1-l14-linearMSE.pth (LAION aesthetic head)")
    p.add_argument("--aesthetic-clip", default=None, help="CLIP ViT-L/14: transformers folder or open_clip file")
    p.add_argument("--aesthetic-clip-config", default="ViT-L-14", help="open_clip config when a file is given")
    p.add_argument("--clip", default=None, help="CLIP for CLIP score: transformers folder or open_clip file")
    p.add_argument("--clip-processor", default=None, help="tokenizer/preprocessor folder if not the --clip folder")
    p.add_argument("--clip-config", default="ViT-L-14", help="open_clip config when --clip is a file")
    p.add_argument("--reward", action="append", metavar="NAME=module:function",
                   help="a reward function fn(images, prompts) -> scores, importable (repeatable)")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)
    return p
