"""The training-step benchmark under pytest-benchmark: fastinpo's step and the reference's, per method.

A saved baseline turns a throughput regression into a failing run::

    pytest benchmarks --benchmark-only --benchmark-save=baseline            # once, on the reference machine
    pytest benchmarks --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:25%

Every round runs the same pairs (positions 0, 1, 2, …: the same t, noise and inversion lengths in every run), so
two runs time the same work. On CPU the suite is tiny (the tiny SDXL-shaped pipeline, one pair, Inversion-DPO with
N = 4) — a smoke and a regression guard, not the throughput rows (``python benchmarks/bench_train_step.py``).
On CUDA the timer synchronizes the GPU (see conftest.py).
"""

from __future__ import annotations

import itertools

import bench_train_step as bts
import pytest
import torch

CUDA = torch.cuda.is_available()
ROUNDS = 5 if not CUDA else 10


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-pipelines"))


@pytest.fixture(scope="session")
def groups(work_dir):
    built: dict[str, bts.Group] = {}

    def get(method: str) -> bts.Group:
        if method not in built:
            built[method] = bts.build_group(method, work_dir, pairs=1, num_steps=4,
                                            model="tiny-sdxl" if not CUDA else "sd15")
        return built[method]

    return get


@pytest.mark.parametrize("impl", ["fastinpo", "reference"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "inpo", "inversion-dpo"])
def test_train_step(benchmark, groups, method, impl):
    group = groups(method)
    step = group.fastinpo_step() if impl == "fastinpo" else group.reference_step()
    positions = itertools.count()
    benchmark.group = f"train-step {method}"
    benchmark.extra_info.update(method=method, impl=impl, pairs=group.B, device=str(group.dev),
                                torch=torch.__version__, threads=torch.get_num_threads())

    def one_step():
        step(next(positions))
        if group.dev.type == "cuda":  # the step's time includes its GPU work even under a plain host timer
            torch.cuda.synchronize()

    benchmark.pedantic(one_step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
