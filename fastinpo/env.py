"""``fastinpo env``: what this machine has and which backends can run here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass

import torch

PACKAGES = ("torch", "triton", "diffusers", "transformers", "accelerate", "deepspeed", "peft", "safetensors",
            "xformers", "numpy")


@dataclass
class BackendStatus:
    name: str
    available: bool
    detail: str


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> list[str]:
    found = [f"cpu ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                         f"{p.multi_processor_count} SMs)")
    return found


def backend_status() -> list[BackendStatus]:
    """Which backends can run here, and why not where they cannot."""
    has_triton = importlib.util.find_spec("triton") is not None
    has_cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    status = [BackendStatus("reference", True, "plain PyTorch, every device")]
    if not has_triton:
        status.append(BackendStatus("triton", False, "triton is not installed (pip install triton)"))
        status.append(BackendStatus("triton-interpreter", False, "triton is not installed"))
    else:
        status.append(BackendStatus("triton", has_cuda, "CUDA tensors" if has_cuda else "no CUDA device"))
        status.append(BackendStatus(
            "triton-interpreter", interp,
            "CPU tensors through TRITON_INTERPRET=1" if interp
            else "set TRITON_INTERPRET=1 before importing fastinpo to run the kernels on CPU tensors"))
    try:
        ext = importlib.import_module("fastinpo._C")
    except ImportError:
        status.append(BackendStatus("ext-cpu", False, "fastinpo._C is not built (reinstall with a C++ compiler)"))
        status.append(BackendStatus("ext-cuda", False, "fastinpo._C is not built"))
    else:
        cuda_built = bool(getattr(ext, "built_with_cuda", lambda: False)())
        status.append(BackendStatus("ext-cpu", True, "fastinpo._C CPU kernels"))
        status.append(BackendStatus("ext-cuda", cuda_built and has_cuda,
                                    "CUDA kernels" if cuda_built else "built without CUDA"))
    return status


def report() -> dict:
    from fastinpo import __version__
    from fastinpo.ops import dispatch

    return {
        "fastinpo": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda": torch.version.cuda,
        "devices": devices(),
        "backends": [asdict(b) for b in backend_status()],
        "ops": dispatch.registered(),
        "FASTINPO_BACKEND": os.environ.get("FASTINPO_BACKEND"),
    }


def format_report(info: dict) -> str:
    lines = [f"fastinpo {info['fastinpo']}  python {info['python']}  {info['platform']}", "", "packages:"]
    for name, version in info["packages"].items():
        lines.append(f"  {name:<13} {version or '-- not installed'}")
    lines += ["", f"torch CUDA build: {info['torch_cuda'] or 'none (CPU build)'}", "devices:"]
    lines += [f"  {d}" for d in info["devices"]]
    lines += ["", "backends:"]
    for b in info["backends"]:
        lines.append(f"  {b['name']:<19} {'yes' if b['available'] else 'no ':<4} {b['detail']}")
    lines += ["", "ops and their implementations:"]
    for op, backends in info["ops"].items():
        lines.append(f"  {op:<20} {', '.join(backends)}")
    lines.append("")
    lines.append(f"FASTINPO_BACKEND={info['FASTINPO_BACKEND'] or '(unset: automatic)'}")
    return "\n".join(lines)
