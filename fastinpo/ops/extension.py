"""The optional compiled extension ``fastinpo._C``: loading it, and the ``"ext"`` backend of the inversion step and of
the flow Euler step.

``import fastinpo`` never imports the extension (house rule 3): :func:`load` does, the first time the dispatcher
registers the fast paths (or a caller asks). A missing or broken build gives ``None`` and a reason
(:func:`load_error`), never an ImportError at import time.

The extension registers three ops with torch's dispatcher (schemas and semantics: ``csrc/ops.cpp``):

- ``torch.ops.fastinpo.ddim_inversion_step(x, eps, alphas_cumprod, t_from, t_to, alpha_init, active=None,
  noise=None, noise_scale=None, cfg_scale=None)``: the whole ``[winners; losers]`` batch in one pass, per-sample
  levels looked up in the ᾱ table (negative source level -> ``alpha_init``, SPEC §3), inactive samples copied
  through, optional noise term and CFG combine (:func:`ddim_inversion_step_batched`);
- ``torch.ops.fastinpo.ddim_inversion_step_alphas(x, eps, alpha_from, alpha_to, ...)``: the same step with
  per-sample ᾱ values instead of a table, i.e. the signature of :func:`fastinpo.ops.reference.ddim_inversion_step`;
  :func:`ddim_inversion_step_ext` (the dispatcher's ``"ext"`` implementation) calls it directly, with no
  per-call table to build;
- ``torch.ops.fastinpo.flow_euler_step(x, v, d_sigma)``: the Euler step of a flow model (SPEC §7),
  ``x + Δσ_i v`` with per-sample ``Δσ`` — the same CPU / CUDA kernels with ``c1 = 1``, ``c2 = Δσ``
  (:func:`flow_euler_step_ext`, the dispatcher's ``"ext"`` implementation of ``flow_euler_step``).

All do float32 math on float32 / float16 / bfloat16 storage and return ``x``'s dtype. float64 stays on the
reference backend (the kernels would round it to float32).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NOT_BUILT = "fastinpo._C is not built (FASTINPO_BUILD_EXT=0 or no compiler)"

_module: ModuleType | None = None
_load_error: str | None = None
_loaded = False
_registered = False


def load() -> ModuleType | None:
    """The ``fastinpo._C`` module, or ``None`` if it is not built or does not load (see :func:`load_error`).

    Importing it registers ``torch.ops.fastinpo.*``. The result is cached, so a failed import is tried once.
    """
    global _module, _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("fastinpo._C")
        except ModuleNotFoundError as err:
            if err.name not in ("fastinpo._C", "fastinpo"):
                raise  # something the extension itself needs is missing: never hide that
            _load_error = _NOT_BUILT
        except ImportError as err:  # built, but does not load (e.g. built against another torch)
            _load_error = (f"fastinpo._C is built but does not load ({err}); "
                           "rebuild it: pip install --no-build-isolation -e .")
    return _module


def load_error() -> str | None:
    """``None`` if the extension loads, else why not."""
    return None if load() is not None else _load_error


def built_with_cuda() -> bool:
    """True if the extension loads and has its CUDA kernels."""
    mod = load()
    return bool(mod is not None and mod.built_with_cuda())


def available_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """``None`` when the extension can run on ``tensors``, else a human-readable reason why not.

    CPU tensors need the extension built; CUDA tensors need it built with CUDA. float64 is refused (the
    kernels compute in float32; the reference keeps float64 in float64), and all tensors must share a device.
    """
    reason = load_error()
    if reason is not None:
        return reason
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors:
        return "no tensor inputs"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors on several devices ({', '.join(sorted(str(d) for d in devices))})"
    device = next(iter(devices))
    floating = [t for t in tensors if t.is_floating_point()]
    bad = sorted({str(t.dtype) for t in floating if t.dtype not in _SUPPORTED_DTYPES})
    if bad:
        return (f"dtype {', '.join(bad)}: the extension computes in float32 on float32/float16/bfloat16 data "
                "(float64 stays on the reference backend)")
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if built_with_cuda() else "fastinpo._C was built without CUDA (CPU torch or no CUDA toolkit)"
    return f"tensors on {device.type}; the extension runs on CPU (and CUDA when built with it)"


def _ops():
    if load() is None:
        raise RuntimeError(f"the 'ext' backend is unavailable: {_load_error}")
    return torch.ops.fastinpo


def ddim_inversion_step_ext(
    x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> torch.Tensor:
    """:func:`fastinpo.ops.reference.ddim_inversion_step` on the extension (same signature, same result within the
    float32 tolerance): ``x_next = sqrt(a_to) (x - sqrt(1 - a_from) eps) / sqrt(a_from) + sqrt(1 - a_to) eps``.

    ``alpha_from``, ``alpha_to``: ``(n,)`` per-sample ᾱ in (0, 1], any floating dtype (read as float32). If ``x``
    and ``eps`` have different dtypes both are read as float32 (no precision is dropped before the math), and
    the result has ``x``'s dtype, as the reference's.
    """
    ops = _ops()
    out_dtype = x.dtype
    if eps.dtype != x.dtype:
        x, eps = x.to(torch.float32), eps.to(torch.float32)
    out = ops.ddim_inversion_step_alphas(x, eps, alpha_from.to(torch.float32), alpha_to.to(torch.float32))
    return out.to(out_dtype)


def flow_euler_step_ext(x: torch.Tensor, v: torch.Tensor, d_sigma: torch.Tensor) -> torch.Tensor:
    """:func:`fastinpo.ops.reference.flow_euler_step` on the extension (same signature, same result within the
    float32 tolerance): ``x_next = x + Δσ * v`` with ``d_sigma`` ``(n,)`` read as float32. If ``x`` and ``v`` have
    different dtypes (a bf16 state with a float32 velocity) both are read as float32, and the result has ``x``'s
    dtype, as the reference's."""
    ops = _ops()
    out_dtype = x.dtype
    if v.dtype != x.dtype:
        x, v = x.to(torch.float32), v.to(torch.float32)
    return ops.flow_euler_step(x, v, d_sigma.to(torch.float32)).to(out_dtype)


def ddim_inversion_step_batched(
    x: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    alpha_init: float,
    *,
    active: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    noise_scale: torch.Tensor | None = None,
    cfg_scale: float | None = None,
    check_levels: bool = True,
) -> torch.Tensor:
    """One DDIM inversion step for a whole batch with per-sample levels (the full ``fastinpo::ddim_inversion_step``).

    For each sample ``i`` (skipped — copied through — where ``active[i]`` is False):
    ``a_from = alphas_cumprod[t_from[i]]`` (``alpha_init`` if ``t_from[i] < 0``), ``a_to = alphas_cumprod[t_to[i]]``,
    ``e = eps[i]`` or, with ``cfg_scale = g``, ``eps[i] + g * (eps[n + i] - eps[i])`` (``eps = [uncond; cond]``),
    ``x_next = sqrt(a_to) (x - sqrt(1 - a_from) e) / sqrt(a_from) + sqrt(1 - a_to) e + noise_scale[i] * noise[i]``.

    Args:
        x: ``(n, ...)`` float32/float16/bfloat16.
        eps: like ``x``, or ``(2n, ...)`` with ``cfg_scale``; same dtype as ``x``.
        alphas_cumprod: ``(T,)`` float32 ᾱ table (:meth:`NoiseSchedule.table`).
        t_from, t_to: ``(n,)`` int64 source and target levels (``t_from < T``; ``0 <= t_to < T``).
        alpha_init: ᾱ of a negative source level (:attr:`NoiseSchedule.alpha_init`).
        active: optional ``(n,)`` bool; inactive samples are returned unchanged and their levels are not read.
        noise: optional, like ``x``; needs ``noise_scale`` ``(n,)`` float32.
        cfg_scale: optional guidance scale ``g``.
        check_levels: on CUDA, check the level range on the host first (one device sync); without it an
            out-of-range level gives NaN for that sample. The CPU op always checks (for free).

    Returns:
        ``x_next`` like ``x`` (contiguous).
    """
    ops = _ops()
    if check_levels and x.device.type == "cuda":
        T = alphas_cumprod.shape[0]
        live = t_from if active is None else t_from[active]
        live_to = t_to if active is None else t_to[active]
        if live.numel() and bool((live >= T).any() | (live_to < 0).any() | (live_to >= T).any()):
            raise ValueError(f"t_from must be < T = {T} and t_to in [0, {T}) for active samples")
    return ops.ddim_inversion_step(
        x, eps, alphas_cumprod, t_from, t_to, float(alpha_init), active, noise, noise_scale,
        None if cfg_scale is None else float(cfg_scale),
    )


def can_run(tensors: Sequence[torch.Tensor]) -> str | None:
    """The dispatcher's test for the ``"ext"`` backend (same as :func:`available_reason`)."""
    return available_reason(tensors)


def _has_op(name: str) -> bool:
    """True if the loaded ``fastinpo._C`` defines ``torch.ops.fastinpo.<name>`` (an older build may not)."""
    try:
        getattr(torch.ops.fastinpo, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def flow_can_run(tensors: Sequence[torch.Tensor]) -> str | None:
    """:func:`can_run` for ``flow_euler_step``, which also needs a build recent enough to have the op: an
    extension built before it was added still loads, and the automatic choice must then skip it."""
    reason = available_reason(tensors)
    if reason is None and not _has_op("flow_euler_step"):
        return ("fastinpo._C was built before flow_euler_step was added (no torch.ops.fastinpo.flow_euler_step); "
                "rebuild it: pip install --no-build-isolation -e .")
    return reason


def register() -> None:
    """Register ``"ext"`` as an implementation of ``ddim_inversion_step`` and ``flow_euler_step`` (idempotent).

    Registered even when the extension is not built, so that ``backend="ext"`` says why it cannot run instead
    of "not implemented". The automatic choice prefers triton, then ext, then the reference.
    """
    global _registered
    if _registered:
        return
    from fastinpo.ops import dispatch

    dispatch.register("ddim_inversion_step", "ext", ddim_inversion_step_ext, can_run)
    dispatch.register("flow_euler_step", "ext", flow_euler_step_ext, flow_can_run)
    _registered = True
