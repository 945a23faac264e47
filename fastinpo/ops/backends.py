"""The fast paths the dispatcher may pick, registered lazily: the Triton kernels (``fastinpo.kernels``) and the
compiled extension (``fastinpo._C`` through :mod:`fastinpo.ops.extension`).

:mod:`fastinpo.ops.dispatch` is the bottom of the op layer and names no backend; the backends import it to
register themselves. This module only adds the loaders that do that at the first dispatch of any op (importing
``fastinpo.ops`` imports it), so importing fastinpo never imports Triton or the compiled extension (house rule 3).
"""

from __future__ import annotations

import importlib
import importlib.util

from fastinpo.ops import dispatch


def _load_triton_backend() -> None:
    """Register the Triton implementations, if Triton is installed and the kernels exist.

    ``fastinpo.kernels.registry.register()`` must not import Triton itself: each implementation imports its
    kernel module when first called, so a CPU-only process that never asks for Triton never pays for it.
    """
    if importlib.util.find_spec("triton") is None:
        return
    try:
        registry = importlib.import_module("fastinpo.kernels.registry")
    except ModuleNotFoundError as err:
        if err.name != "fastinpo.kernels.registry":  # a real import error inside our kernels: never hide it
            raise
        return
    registry.register()


def _load_extension_backend() -> None:
    """Register the C++/CUDA extension's implementations. ``fastinpo.ops.extension`` imports the compiled
    ``fastinpo._C`` only when asked whether it can run, and registers even when it is not built, so that
    ``backend="ext"`` says why it cannot run instead of "not implemented"."""
    from fastinpo.ops import extension

    extension.register()


# the automatic choice's order is dispatch.KNOWN_BACKENDS, whatever the order of registration
dispatch.register_lazy_loader(_load_triton_backend)
dispatch.register_lazy_loader(_load_extension_backend)
