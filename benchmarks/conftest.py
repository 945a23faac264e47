"""pytest-benchmark setup of the training-step suite (``pytest benchmarks --benchmark-only``).

- The timer synchronizes the GPU (``bench_train_step.synchronized_timer``) unless ``--benchmark-timer`` names
  another: a host timer alone would stop while CUDA kernels are still queued.
- On CPU the suite runs on one thread: the CI machines' few cores are shared, and two threads oversubscribed
  them (three times the spread of one thread here).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):  # `bench_train_step` and `benchmarks.reference` importable
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = getattr(config.option, "benchmark_timer", None)
    if option is not None and option in ("time.perf_counter", "pytest_benchmark.timers.default_timer"):
        config.option.benchmark_timer = "bench_train_step.synchronized_timer"
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
