"""The math of SPEC and its fast paths: the plain-PyTorch reference (``reference``), the one dispatcher that
picks a backend (``dispatch``), the public losses and inversion loops (``losses``, ``inversion``), the noise
schedules and grids (``schedule``), the loader of the compiled extension (``extension``), the loss output type
(``outputs``) and input checks (``checks``). The public API re-exports these from ``fastinpo``.

Layer rule (docs/ARCHITECTURE.md): ``fastinpo.ops`` imports nothing of fastinpo above it."""

from fastinpo.ops import backends  # noqa: F401  (adds the dispatcher's lazy loaders of the fast paths)
