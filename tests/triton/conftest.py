"""The Triton tier: the kernels on CPU tensors through Triton's interpreter, and on a GPU compiled.

``TRITON_INTERPRET`` must be in the environment before a kernel module is imported (``triton.jit`` reads it
when it decorates), so it is read here, at the very top, before anything imports Triton or fastinpo.kernels:

- ``TRITON_INTERPRET=1`` (the default here, and ``make test-triton``): the CPU-tensor tests run the kernels in the
  interpreter. The ``gpu`` tests are skipped: the interpreter copies CUDA tensors to the host, so a passing GPU
  test would say nothing about compiled code (GPU review item 1).
- ``TRITON_INTERPRET=0`` (``make test-gpu`` and the GPU kit, scripts/gpu/run.sh): the ``gpu`` tests run the
  compiled kernels on CUDA tensors, and an autouse check fails a ``gpu`` test whose kernels were built by the
  interpreter or that compiled nothing. The CPU-tensor kernel tests are skipped with that reason (compiled Triton
  runs on CUDA only).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# tests of this tier that run no kernel on CPU (they need neither the interpreter nor a GPU)
NO_KERNEL_TESTS = ("test_aot", "test_import", "test_registry")
KERNEL_MODULES = ("fastinpo.kernels.dpo_loss", "fastinpo.kernels.inversion_dpo", "fastinpo.kernels.ddim_step",
                  "fastinpo.kernels.flow_step")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    no_triton = importlib.util.find_spec("triton") is None
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        gpu = "gpu" in item.keywords
        if no_triton:
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))
        elif gpu and INTERPRET:
            item.add_marker(pytest.mark.skip(
                reason="TRITON_INTERPRET=1: a GPU test would run the interpreter, which copies CUDA tensors to the "
                       "host and tests no compiled code (run it with TRITON_INTERPRET=0: make test-gpu)"))
        elif not gpu and not INTERPRET and not item.name.startswith(NO_KERNEL_TESTS):
            item.add_marker(pytest.mark.skip(
                reason="TRITON_INTERPRET=0: compiled Triton kernels run on CUDA tensors only, and this test runs "
                       "them on CPU tensors (run it with TRITON_INTERPRET=1: make test-triton)"))


def _kernels():
    """Every ``@triton.jit`` function of fastinpo's kernel modules (importing them: only in a gpu test)."""
    import importlib

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            kind = type(obj).__name__
            if kind in ("JITFunction", "InterpretedFunction"):
                found.append((f"{name}.{getattr(obj, '__name__', '?')}", obj))
    return found


def compiled_kernel_count() -> int:
    """Compiled variants held by the kernels' caches (all devices): grows when a launch compiles."""
    total = 0
    for _, fn in _kernels():
        for cache in getattr(fn, "device_caches", {}).values():
            total += len(cache[0]) if isinstance(cache, tuple) else len(cache)
    return total


@pytest.fixture(autouse=True)
def gpu_test_ran_compiled(request):
    """A ``gpu`` test must have run compiled Triton: no kernel built by the interpreter, and compiled variants in
    the kernels' caches after it (a test that launched nothing, or fell back to another backend, fails here)."""
    if "gpu" not in request.node.keywords or not torch.cuda.is_available():
        yield
        return
    yield
    kernels = _kernels()
    interpreted = [name for name, fn in kernels if type(fn).__name__ == "InterpretedFunction"]
    assert not interpreted, (f"{request.node.name} ran Triton's interpreter ({', '.join(interpreted)}): run the GPU "
                             "tier with TRITON_INTERPRET=0")
    assert compiled_kernel_count() > 0, (f"{request.node.name}: no Triton kernel was compiled (the test launched "
                                         "none, or the op ran another backend)")
