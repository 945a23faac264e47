"""Training methods: each turns a micro-batch into a loss through the public API ops (SPEC §2–5)."""

from __future__ import annotations

from fastinpo.methods.base import Method, MethodOutput, Models, StepInputs
from fastinpo.methods.diffusion_dpo import DiffusionDPO
from fastinpo.methods.inpo import InPO
from fastinpo.methods.inversion_dpo import InversionDPO
from fastinpo.methods.sft import SFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (SFT, DiffusionDPO, InPO, InversionDPO)}


def build_method(config, schedule) -> Method:
    """The method named by ``config.name`` (a :class:`fastinpo.config.MethodConfig`) for the schedule's model
    family: a :class:`fastinpo.ops.flow.FlowSchedule` (SD3) gets the flow methods (:mod:`fastinpo.methods.flow`)."""
    from fastinpo.ops.flow import FlowSchedule

    if isinstance(schedule, FlowSchedule):
        from fastinpo.methods.flow import build_flow_method

        return build_flow_method(config, schedule)
    if config.name not in METHODS:
        raise ValueError(f"unknown method {config.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[config.name](config, schedule)


__all__ = ["METHODS", "Method", "MethodOutput", "Models", "StepInputs", "build_method"]
