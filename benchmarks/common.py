"""What every benchmark script records about a run: the commit, the device (name and a short slug for file
names) and the machine's load (CPU timings taken under load are flagged by it)."""

from __future__ import annotations

import os
import platform
import re
import subprocess

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
