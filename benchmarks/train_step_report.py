"""Writing the training-step results: the CSV rows, the markdown summary with the targets, the chart, and the README
performance table rendered from the newest results files (never typed by hand; tests/test_readme.py checks it)."""

from __future__ import annotations

import csv
import glob
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

COLUMNS = [
    "timestamp", "device", "torch", "diffusers", "commit", "command", "model", "method", "mode", "pairs", "steps_N",
    "case", "optimization", "optimization_state", "status", "median_step_s", "iqr_step_s", "pairs_per_s",
    "pairs_per_s_iqr", "speedup_vs_reference", "paired_speedup_median", "paired_speedup_iqr",
    "gain_of_optimization", "speedup_vs_compile", "peak_mem_mb", "mem_kind", "unet_calls", "unet_samples",
    "tflop_per_step", "achieved_tflops", "matmul_tflops", "mfu", "repeats", "warmup", "threads", "loadavg_1m",
    "note", "times_s",
]


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------- reports
def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


TARGETS = {  # (device kind, method, N) -> minimum speedup over the reference (issue 8)
    ("cpu", "inpo", ""): 1.5,
    ("cpu", "inversion-dpo", "20"): 2.0,
    ("gpu", "inpo", ""): 3.0,
    ("gpu", "inversion-dpo", ""): 10.0,
    ("gpu", "diffusion-dpo", ""): 1.5,
}

# the cases judged against the targets: the trainer's defaults, and the recipe with the trajectory cache (an
# option, valid only with fixed pair inputs)
TARGET_CASES = {"fastinpo": "", "trajectory-cache": "with the reference-trajectory cache",
                "trajectory-cache+grad-steps-4": "with the reference-trajectory cache and 4 steps per grad call",
                "fastinpo+compile": "with model.compile"}


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["case"] not in TARGET_CASES or r["status"] != "ok":
            continue
        kind = "cpu" if r["device"].startswith("cpu") else "gpu"
        want = TARGETS.get((kind, r["method"], r["steps_N"] if r["method"] == "inversion-dpo" and kind == "cpu"
                            else ""))
        got = _num(r["paired_speedup_median"]) or _num(r["speedup_vs_reference"])
        if want is None or got is None:
            continue
        verdict = "met" if got >= want else f"NOT met (short by {100 * (1 - got / want):.0f}%)"
        n = f", N={r['steps_N']}" if r["method"] == "inversion-dpo" else ""
        case = f" ({TARGET_CASES[r['case']]})" if TARGET_CASES[r["case"]] else ""
        vs_compile = _num(r["speedup_vs_compile"])
        also = f"; {vs_compile:.2f}x the reference under torch.compile" if vs_compile is not None else ""
        out.append(f"- {r['model']} {r['method']} {r['mode']} B={r['pairs']}{n}{case}: {got:.2f}x (paired median) "
                   f"vs target {want:.1f}x — {verdict}{also}")
    return out


def write_markdown(path: str, rows: list[dict], base: dict, extra: list[str]) -> None:
    lines = [f"# Training-step throughput — {base['device']}", "",
             f"- command: `{base['command']}`", f"- torch {base['torch']}, diffusers {base['diffusers']}, "
             f"commit {base['commit']}, {base['threads']} thread(s), date {base['timestamp']}",
             "- speedup = reference step time / case step time (same model, data, per-pair randomness); "
             "'paired' = median [IQR] of per-repeat ratios of the same work (interleaved runs).",
             "- gain = how much faster fastinpo is with the optimization than without it (< 1: it costs here).",
             ""]
    lines += extra
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["mode"], r["steps_N"], r["pairs"]), []).append(r)
    for (model, method, mode, n, pairs), rs in groups.items():
        lines += ["", f"## {model} · {method} · {mode} · B={pairs}" + (f" · {n}" if n else ""), "",
                  "| case | optimization | pairs/s | IQR | speedup vs ref | paired [IQR] | vs ref+compile | gain | "
                  "peak MB | UNet calls / samples | MFU | status / note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            opt = f"{r['optimization']} ({r['optimization_state']})" if r["optimization"] else ""
            paired = (f"{float(r['paired_speedup_median']):.2f} [{float(r['paired_speedup_iqr']):.2f}]"
                      if _num(r["paired_speedup_median"]) is not None else "")
            calls = f"{r['unet_calls']} / {r['unet_samples']}" if r["unet_calls"] else ""
            pps = fmt(_num(r["pairs_per_s"]))
            if not pps and _num(r["median_step_s"]) is not None:  # unit-cost rows: a time per call, not pairs/s
                pps = f"{1000 * _num(r['median_step_s']):.3g} ms/call"
            lines.append("| " + " | ".join([
                r["case"], opt, pps, fmt(_num(r["pairs_per_s_iqr"])),
                fmt(_num(r["speedup_vs_reference"])), paired, fmt(_num(r["speedup_vs_compile"])),
                fmt(_num(r["gain_of_optimization"])),
                fmt(_num(r["peak_mem_mb"])), calls, fmt(_num(r["mfu"])),
                (r["status"] + (": " + r["note"] if r["note"] else "")).replace("|", "/")]) + " |")
    targets = target_lines(rows)
    if targets:
        lines += ["", "## Targets (issue 8)", "", *targets]
    gains: dict[str, list[str]] = {}
    for r in rows:
        g = _num(r["gain_of_optimization"])
        if r["optimization"] and g is not None:
            n = f" N={r['steps_N']}" if r["method"] == "inversion-dpo" else ""
            gains.setdefault(r["optimization"], []).append(f"{r['method']} {r['mode']} B={r['pairs']}{n}: {g:.2f}x")
        elif r["optimization"] and r["status"] in ("n/a", "not-implemented"):
            gains.setdefault(r["optimization"], []).append(f"{r['method']}: {r['status']}")
    if gains:
        lines += ["", "## What each optimization gives (fastinpo with it / without it; < 1: it costs here)", ""]
        lines += [f"- {opt}: " + "; ".join(dict.fromkeys(v)) for opt, v in gains.items()]
    mem = [r for r in rows if r["method"] == "inversion-dpo" and _num(r["peak_mem_mb"]) is not None
           and r["case"] in ("reference", "fastinpo", "all-in-graph")]
    if mem:
        ns = sorted({r["steps_N"] for r in mem}, key=int)
        lines += ["", "## Inversion-DPO peak memory by N (MB; the two-pass gradient should stay flat)", "",
                  "| mode | case | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
        for mode in dict.fromkeys(r["mode"] for r in mem):
            for case in ("reference", "fastinpo", "all-in-graph"):
                by_n = {r["steps_N"]: r["peak_mem_mb"] for r in mem if r["mode"] == mode and r["case"] == case}
                if by_n:
                    lines.append(f"| {mode} | {case} | " + " | ".join(
                        fmt(_num(by_n.get(n))) for n in ns) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and _num(r["speedup_vs_reference"]) is not None]
    if not ok:
        return
    labels = [f"{r['method']} {r['mode']} B={r['pairs']}" + (f" N={r['steps_N']}" if r["method"] == "inversion-dpo"
                                                              else "") + f" · {r['case']}" for r in ok]
    vals = [_num(r["paired_speedup_median"]) or _num(r["speedup_vs_reference"]) for r in ok]
    palette = {"reference": "#999999", "reference+compile": "#cccccc", "fastinpo": "#1f77b4"}
    colors = [palette.get(r["case"], "#ff7f0e") for r in ok]  # grey: the baselines; blue: defaults; orange: on/off
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(ok) + 1.2))
    ax.barh(range(len(ok)), vals, color=colors)
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over the reference step (paired median; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(csv_path: str, extra: list[str] | None = None) -> None:
    """The .md summary and .png chart of a results CSV, from its rows alone."""
    rows = read_rows(csv_path)
    first = rows[0]
    base = {k: first.get(k, "") for k in ("device", "torch", "diffusers", "commit", "command", "threads", "timestamp")}
    stem = csv_path[:-len(".csv")]
    write_markdown(stem + ".md", rows, base, extra or [f"- peak memory: {first.get('mem_kind') or 'n/a'}"])
    write_chart(stem + ".png", rows, f"fastinpo vs reference training step — {base['device']}, commit "
                                     f"{base['commit']}")


def results_by_device(results_dir: str) -> dict[str, list[str]]:
    """The full (non-smoke, untagged) train-step CSVs per device slug, oldest first; a device with none falls back
    to its newest smoke file."""
    full: dict[str, list[tuple[str, str]]] = {}
    smoke: dict[str, tuple[str, str]] = {}
    for f in sorted(glob.glob(os.path.join(results_dir, "train-step-*.csv"))):
        m = re.match(r"train-step-(.+)-(\d{4}-\d{2}-\d{2})(-smoke)?\.csv$", os.path.basename(f))
        if not m:
            continue
        slug, date, is_smoke = m.group(1), m.group(2), bool(m.group(3))
        if is_smoke:
            if slug not in smoke or date >= smoke[slug][0]:
                smoke[slug] = (date, f)
        else:
            full.setdefault(slug, []).append((date, f))
    out = {slug: [f for _, f in sorted(files)] for slug, files in full.items()}
    for slug, (_, f) in smoke.items():
        out.setdefault(slug, [f])
    return out


def newest_results(results_dir: str) -> list[str]:
    """The newest full (non-smoke) train-step CSV per device slug, falling back to a smoke file."""
    return [files[-1] for files in results_by_device(results_dir).values()]


def readme_table(results_dir: str = os.path.join(HERE, "results")) -> str:
    """The README performance table, rendered from the results files (never typed by hand).

    Per device, every group (model, method, mode, N, B) comes from the newest full results file that measured it:
    a later run of some groups (e.g. only InPO, after its reference changed) replaces those groups' lines and
    keeps the others', each line naming its own file and commit."""
    lines = ["| device | model | method | mode | B | fastinpo pairs/s | reference pairs/s | speedup (paired "
             "median [IQR]) | vs reference under torch.compile | peak MB fastinpo / reference | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for files in results_by_device(results_dir).values():
        groups: dict[tuple, tuple[str, dict]] = {}
        for path in files:  # oldest first: a newer file's group replaces an older one in place
            by_key: dict[tuple, dict] = {}
            for r in read_rows(path):
                key = (r["model"], r["method"], r["mode"], r["steps_N"], r["pairs"])
                by_key.setdefault(key, {})[r["case"]] = r
            for key, cases in by_key.items():
                if "reference" in cases:
                    groups[key] = (path, cases)
        for (model, method, mode, n, pairs), (path, cases) in groups.items():
            for case, label in TARGET_CASES.items():
                lines += _readme_line(path, model, method, mode, n, pairs, cases.get(case), cases.get("reference"),
                                      label)
    return "\n".join(lines)


def update_readme(table: str, readme: str = os.path.join(REPO, "README.md")) -> None:
    """Replace the table between README.md's ``<!-- perf-table:start ...-->`` and ``<!-- perf-table:end -->``."""
    with open(readme) as f:
        text = f.read()
    start = text.index("\n", text.index("<!-- perf-table:start")) + 1
    end = text.index("<!-- perf-table:end -->")
    with open(readme, "w") as f:
        f.write(text[:start] + table.strip() + "\n" + text[end:])


def _readme_line(path, model, method, mode, n, pairs, fast, ref, label) -> list[str]:
    """One README table line: a fastinpo case against the reference of its group (none if either is missing)."""
    if not fast or not ref or fast["status"] != "ok" or ref["status"] != "ok":  # e.g. InPO-flow: no reference
        return []
    dev = fast["device"].split(" (")[0]
    flow = {"diffusion-dpo": "Flow-DPO", "inpo": "InPO-flow"} if model.endswith("sd3") else {}  # SD3: flow methods
    name = (flow.get(method, method) + (f" (N={n})" if method == "inversion-dpo" else "")
            + (f", {label}" if label else ""))
    paired = (f"{float(fast['paired_speedup_median']):.2f}x [{float(fast['paired_speedup_iqr']):.2f}]"
              if _num(fast["paired_speedup_median"]) is not None
              else f"{float(fast['speedup_vs_reference']):.2f}x")
    mem = f"{fmt(_num(fast['peak_mem_mb']))} / {fmt(_num(ref['peak_mem_mb']))}"
    vs_compile = _num(fast["speedup_vs_compile"])
    vs_compile = f"{vs_compile:.2f}x" if vs_compile is not None else "not measured"
    return [f"| {dev} | {model} | {name} | {mode} | {pairs} | {fmt(_num(fast['pairs_per_s']))} | "
            f"{fmt(_num(ref['pairs_per_s']))} | {paired} | {vs_compile} | {mem} | "
            f"`{os.path.relpath(path, REPO)}` @ {fast['commit']} |"]


def write_csv(path: str, rows: list[dict]) -> None:
    """The results CSV: one row per case, every column of :data:`COLUMNS` (numbers to 4 significant digits)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: fmt(r.get(k)) for k in COLUMNS})
