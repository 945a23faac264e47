"""Input validation shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value) with a
message that says what was expected and what came. Nothing is silently broadcast. Shape and dtype checks cost
nothing; value checks (the range of an ``alpha`` tensor) read the tensor, which on CUDA is one small device
sync — internal hot loops call the unchecked implementations with values from an already validated table.
"""

from __future__ import annotations

import math

import torch


def tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    """``value`` must be a tensor (of a floating dtype unless ``floating=False``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32/float16/bfloat16/float64), got {value.dtype}")
    return value


def paired(name: str, value: torch.Tensor, *, batch_dim: int = 0) -> int:
    """``value`` holds ``[winners; losers]`` along ``batch_dim``: that size must be even and positive. Returns B."""
    if value.dim() <= batch_dim:
        raise ValueError(f"{name} must have a batch dimension {batch_dim}, got shape {tuple(value.shape)}")
    n = value.shape[batch_dim]
    if n == 0 or n % 2:
        raise ValueError(
            f"{name} must stack winners then losers along dim {batch_dim} (an even, non-zero size 2B), "
            f"got size {n} (shape {tuple(value.shape)})"
        )
    return n // 2


def same_shape(names: tuple[str, ...], values: tuple[torch.Tensor, ...]) -> None:
    shapes = [tuple(v.shape) for v in values]
    if any(s != shapes[0] for s in shapes[1:]):
        listing = ", ".join(f"{n} {s}" for n, s in zip(names, shapes, strict=False))
        raise ValueError(f"shapes must match exactly (no broadcasting): got {listing}")


def same_device(names: tuple[str, ...], values: tuple[torch.Tensor, ...]) -> None:
    devices = [v.device for v in values]
    if any(d != devices[0] for d in devices[1:]):
        listing = ", ".join(f"{n} on {d}" for n, d in zip(names, devices, strict=False))
        raise ValueError(f"tensors must be on one device: got {listing}")


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def per_sample_vector(name: str, value: torch.Tensor, n: int, device: torch.device) -> None:
    """``value`` must be a floating tensor of shape ``(n,)`` on ``device``."""
    tensor(name, value)
    if tuple(value.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per sample), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {value.device}")


def alpha_range(name: str, value: torch.Tensor, *, allow_one: bool = True) -> None:
    """Every entry of ``value`` must lie in (0, 1] (or (0, 1) when ``allow_one`` is False)."""
    hi_ok = value <= 1 if allow_one else value < 1
    ok = bool(((value > 0) & hi_ok).all())  # one tiny device sync on CUDA
    if not ok:
        interval = "(0, 1]" if allow_one else "(0, 1)"
        bad = value[~((value > 0) & hi_ok)]
        raise ValueError(
            f"{name} must lie in {interval} (cumulative products of alphas), got values such as "
            f"{bad[:4].tolist()}"
        )


def finite_float(name: str, value, *, minimum: float | None = None) -> float:
    """``value`` must be a real number (not a bool), finite, and ``>= minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite float{bound}, got {value}")
    return value


def cond_rows(name: str, cond, n: int) -> None:
    """Every tensor of the conditioning pytree ``cond`` must hold one row per sample: ``n`` along dim 0 (the
    models index and slice every leaf by sample). The error names the leaf."""

    def walk(value, path: str) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != n:
                raise ValueError(f"{path} must have {n} rows (one per sample: winners then losers) along dim 0, "
                                 f"got shape {tuple(value.shape)}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        else:
            raise TypeError(f"{path} must be a tensor, dict, list, tuple or None, got {type(value).__name__}")

    walk(cond, name)
