"""The Triton tier: runs the kernels on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before a kernel module is imported (``triton.jit`` reads it
when it decorates), so it is set here, at the very top, before anything imports Triton or fastinpo.kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# tests of this tier that run no kernel on CPU (they need neither the interpreter nor a GPU)
NO_KERNEL_TESTS = ("test_aot", "test_import", "test_registry")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    no_triton = importlib.util.find_spec("triton") is None
    interp_off = os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if no_triton:
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))
        elif interp_off and "gpu" not in item.keywords and not item.name.startswith(NO_KERNEL_TESTS):
            item.add_marker(pytest.mark.skip(reason="no CUDA device and TRITON_INTERPRET is not 1"))
