"""What every benchmark script shares: how one call is timed, the quantiles it reports, and what it records about
a run (the commit, the device — name and a short slug for file names —, the command, the machine's load: CPU
timings taken under load are flagged by it)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a tarball without git still benchmarks
        return "unknown"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(dev: torch.device) -> str:
    """``cpu``, ``h100``, ``h200``, ``a100``, …: the device part of a results file name."""
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    m = re.search(r"(h100|h200|a100|b200|l40s?|a10g?|rtx ?\d+)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name)).replace(" ", "")


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def run_metadata(dev: torch.device) -> dict[str, str]:
    """The columns every results row starts with: timestamp, device, torch version, commit, command."""
    return {"timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "device": device_name(dev),
            "torch": torch.__version__, "commit": git_commit(),
            "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv])}


class Timer:
    """One call's wall time in seconds: CUDA events on a GPU (no host sync inside the timed region),
    ``perf_counter`` on CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def quantile(values: list[float], p: float) -> float:
    """The ``p`` quantile of ``values`` (nearest rank on the sorted values)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
