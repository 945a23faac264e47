"""The one place that picks the backend of an accelerated op.

Order of precedence (house rule 2):

1. the ``backend=`` argument of the public function, if given;
2. the ``FASTINPO_BACKEND`` environment variable, if set (``auto`` means "not set");
3. automatic: the first of ``triton``, ``ext``, ``reference`` that implements the op and can run on the
   tensors — Triton on CUDA tensors when it is installed, the compiled extension where it is built (CPU, and
   CUDA when built with CUDA), otherwise the reference.

A backend asked for by name (1 or 2) that is unknown, not implemented for the op, or cannot run on the given
tensors raises ``ValueError`` naming what is available. The automatic choice only ever picks a backend that
reports it can run; it never falls back silently after a named request.

Fast paths register themselves with :func:`register`; the reference backend of every op is registered by the
module that defines the op (``fastinpo.ops.losses``, ``fastinpo.ops.inversion``). Registration is lazy for the fast
paths: :mod:`fastinpo.ops.backends` adds the loaders (:func:`register_lazy_loader`) that run at the first dispatch,
so importing fastinpo never imports Triton or the compiled extension (house rule 3), and this module names no
backend module: they import it, never the other way round.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Every backend name fastinpo knows, in the order the automatic choice prefers them.
KNOWN_BACKENDS = ("triton", "ext", "reference")

ENV_VAR = "FASTINPO_BACKEND"


@dataclass(frozen=True)
class BackendImpl:
    """One implementation of one op.

    ``fn`` is the callable; ``can_run(tensors)`` returns ``None`` when it can run on those tensors, else a
    human-readable reason why not; ``auto`` says whether the automatic choice may pick it. ``auto_can_run``, if
    given, replaces ``can_run`` for the automatic choice only: a backend that *can* run somewhere (Triton's
    interpreter on CPU, asked for by name) without being picked there automatically.
    """

    fn: Callable
    can_run: Callable[[Sequence[torch.Tensor]], str | None]
    auto: bool = True
    auto_can_run: Callable[[Sequence[torch.Tensor]], str | None] | None = None


_REGISTRY: dict[str, dict[str, BackendImpl]] = {}
# Loaders that register the fast paths of an op the first time the op is dispatched (keeps imports lazy).
_LAZY_LOADERS: list[Callable[[], None]] = []
_lazy_loaded = False


def _always(_tensors: Sequence[torch.Tensor]) -> str | None:
    return None


def register(
    op: str,
    backend: str,
    fn: Callable,
    can_run: Callable | None = None,
    *,
    auto: bool = True,
    auto_can_run: Callable | None = None,
) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (``auto_can_run``: see :class:`BackendImpl`)."""
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(KNOWN_BACKENDS)}")
    _REGISTRY.setdefault(op, {})[backend] = BackendImpl(fn, can_run or _always, auto, auto_can_run)


def register_lazy_loader(loader: Callable[[], None]) -> None:
    """Add a function that registers fast paths; it runs once, at the first dispatch of any op."""
    _LAZY_LOADERS.append(loader)


def _load_lazy() -> None:
    global _lazy_loaded
    if _lazy_loaded:
        return
    _lazy_loaded = True
    for loader in _LAZY_LOADERS:
        loader()


def implementations(op: str) -> dict[str, BackendImpl]:
    """The registered implementations of ``op`` (after loading the lazy fast paths)."""
    _load_lazy()
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r}; ops: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[op]


def requested_backend(backend: str | None) -> str | None:
    """The backend named by the argument or, failing that, by ``FASTINPO_BACKEND``; ``None`` means automatic."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"the environment variable {ENV_VAR}"
    else:
        source = "the backend argument"
    if backend is None or backend == "auto":
        return None
    if not isinstance(backend, str) or backend not in KNOWN_BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} (from {source}); expected one of: auto, {', '.join(KNOWN_BACKENDS)}"
        )
    return backend


def resolve(op: str, backend: str | None, tensors: Sequence[torch.Tensor]) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``tensors``; returns ``(backend_name, fn)``."""
    impls = implementations(op)
    name = requested_backend(backend)
    if name is not None:
        if name not in impls:
            raise ValueError(
                f"backend {name!r} is not implemented for {op}; implemented: {', '.join(sorted(impls))}"
            )
        reason = impls[name].can_run(tensors)
        if reason is not None:
            runnable = [b for b, impl in impls.items() if impl.can_run(tensors) is None]
            raise ValueError(
                f"backend {name!r} cannot run {op} here: {reason}. Backends that can: {', '.join(runnable)}"
            )
        return name, impls[name].fn
    for candidate in KNOWN_BACKENDS:
        impl = impls.get(candidate)
        if impl is None or not impl.auto:
            continue
        if (impl.auto_can_run or impl.can_run)(tensors) is None:
            return candidate, impl.fn
    raise RuntimeError(f"no backend can run {op}; this is a bug: the reference backend must always run")


def registered() -> dict[str, list[str]]:
    """``{op: [backend, ...]}`` for every op (after loading the lazy fast paths)."""
    _load_lazy()
    return {op: [b for b in KNOWN_BACKENDS if b in impls] for op, impls in sorted(_REGISTRY.items())}
