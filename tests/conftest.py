"""Shared fixtures. Every test draws fresh random inputs (never zeros) from an explicit generator."""

from __future__ import annotations

import os

import pytest
import torch

# The automatic backend choice must not depend on the developer's shell.
os.environ.pop("FASTINPO_BACKEND", None)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def randn(*shape, generator: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped, with that reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
