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


# ----------------------------------------------------------------------------------------------- trainer fixtures
@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Tiny random SD1.5 and SDXL pipelines on disk, written by `fastinpo make-tiny-pipeline`'s code path."""
    from fastinpo.models.sd import make_tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {arch: make_tiny_pipeline(root / arch, arch, seed=0, sample_size=32) for arch in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def pickapic_dir(tmp_path_factory):
    """A Pick-a-Pic-format parquet folder of synthetic pairs (with ties, which the trainer drops)."""
    from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

    root = tmp_path_factory.mktemp("pickapic")
    write_pickapic_parquet(root / "train-00000.parquet", synthetic_rows(10, 40, seed=0))
    return root


@pytest.fixture
def moved_sd15_models(tiny_pipelines):
    """``(policy_unet, Models, schedule)``: a tiny SD1.5 policy moved off its frozen float32 reference copy (at
    θ = θ_ref Inversion-DPO's loss and gradient are exactly 0, so a gradient test there would pass trivially)."""
    import copy

    from fastinpo.methods.base import Models
    from fastinpo.models.sd import load_components, unet_callable
    from fastinpo.ops.schedule import NoiseSchedule

    comps = load_components(tiny_pipelines["sd15"], load_vae=False, load_text=False)
    policy_unet = comps.unet
    ref_unet = copy.deepcopy(policy_unet).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy_unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    schedule = NoiseSchedule.from_config(comps.scheduler_config)
    return policy_unet, Models(unet_callable(policy_unet), unet_callable(ref_unet)), schedule
