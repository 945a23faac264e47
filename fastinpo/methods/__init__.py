"""Training methods: each turns a micro-batch into a loss through the public API ops (SPEC §2–5)."""

from __future__ import annotations

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs
from fastinpo.methods.diffusion_dpo import DiffusionDPO
from fastinpo.methods.inpo import InPO
from fastinpo.methods.inversion_dpo import InversionDPO
from fastinpo.methods.sft import SFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (SFT, DiffusionDPO, InPO, InversionDPO)}


def build_method(config, schedule) -> Method:
    """The method named by ``config.name`` (a :class:`fastinpo.config.MethodConfig`)."""
    if config.name not in METHODS:
        raise ValueError(f"unknown method {config.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[config.name](config, schedule)


__all__ = ["METHODS", "Method", "MethodOutput", "Models", "StepInputs", "build_method"]
