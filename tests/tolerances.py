"""The one tolerance table of the test suite (SPEC.md §6), and the assertions that read it.

- float32 (and float64) inputs: within ``FLOAT32_RTOL`` relative of a float64 computation, plus an absolute
  floor ``FLOAT32_ATOL`` for values that are themselves near zero.
- float16 / bfloat16 inputs: the tested path's max error against float64 is at most
  ``LOW_PRECISION_FACTOR`` times the max error of a plain PyTorch computation in that same dtype, plus a small
  floor ``LOW_PRECISION_FLOOR[dtype]`` (relative to the scale of the expected values) so that a plain path which
  happens to be exact does not demand exactness.

Every test that compares numbers uses these; a test that needs something looser says why in a comment next
to the number it uses.
"""

from __future__ import annotations

import torch

FLOAT32_RTOL = 1e-5
FLOAT32_ATOL = 1e-6
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

# gradcheck in float64 (torch's defaults, written here so the suite has one table)
GRADCHECK_EPS = 1e-6
GRADCHECK_ATOL = 1e-5
GRADCHECK_RTOL = 1e-3

# A whole UNet's float32 gradient computed with another batching of the same work (several trajectory steps per
# call, the two-pass gradient against one graph): GEMMs and sums run in another order, so an element may differ
# by a few float32 ulps of the gradient's *scale* (seen: 8e-7 at max |grad| 0.3), not of its own value; a wrong
# step or weight is off by a whole term.
MODEL_GRAD_RTOL = 1e-4
MODEL_GRAD_ATOL_OF_MAX = 1e-5


def assert_close_model_grad(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Flattened model gradients: ``|a - e| <= MODEL_GRAD_ATOL_OF_MAX * max|e| + MODEL_GRAD_RTOL * |e|``."""
    torch.testing.assert_close(actual, expected, rtol=MODEL_GRAD_RTOL,
                               atol=MODEL_GRAD_ATOL_OF_MAX * float(expected.abs().max()))


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64).cpu()


def assert_close_fp32(actual, expected, *, rtol: float = FLOAT32_RTOL, atol: float = FLOAT32_ATOL, what: str = ""):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, ``expected`` ideally float64."""
    a, e = _as64(actual), _as64(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: max abs error {float(err.max()):.3e} exceeds tolerance "
        f"(worst index {worst}: got {float(a.flatten()[worst])!r}, expected {float(e.flatten()[worst])!r})"
    )


def assert_close_lowp(actual, expected64, plain, dtype: torch.dtype, *, what: str = ""):
    """Low-precision rule: ``max|actual - exp| <= FACTOR * max|plain - exp| + FLOOR * max(1, max|exp|)``."""
    a, e, p = _as64(actual), _as64(expected64), _as64(plain)
    assert a.shape == e.shape == p.shape, f"{what}: shapes {a.shape}, {e.shape}, {p.shape}"
    err = float((a - e).abs().max())
    plain_err = float((p - e).abs().max())
    scale = max(1.0, float(e.abs().max()))
    bound = LOW_PRECISION_FACTOR * plain_err + LOW_PRECISION_FLOOR[dtype] * scale
    assert err <= bound, (
        f"{what}: error {err:.3e} > {LOW_PRECISION_FACTOR} x plain {dtype} error {plain_err:.3e} + floor"
    )


def assert_matches(actual, expected64, *, dtype: torch.dtype, plain=None, what: str = ""):
    """Dispatch on the input dtype: float32/float64 use the relative rule, fp16/bf16 the low-precision rule
    (``plain`` is then required: the same quantity computed by plain PyTorch in ``dtype``)."""
    if dtype in (torch.float32, torch.float64):
        assert_close_fp32(actual, expected64, what=what)
    else:
        assert plain is not None, "low-precision comparisons need the plain-PyTorch result in the same dtype"
        assert_close_lowp(actual, expected64, plain, dtype, what=what)
