"""The compiled extension's flow Euler step (``torch.ops.fastinpo.flow_euler_step``, backend ``"ext"``; SPEC §7)
on CPU: parity with the reference by SPEC §6's rule (error against float64 at most twice plain PyTorch's in the
same dtype, plus a floor of a few float32 ulps of the terms ``|x| + |Δσ v|``), the multi-threaded split, mixed
dtypes, the InPO-for-flows inversion on the ext step, validation messages and dispatch. The CUDA kernel is the
DDIM step's (``c1 = 1``, ``c2 = Δσ``): compile-checked by tests/test_extension.py's nvcc test, run on a GPU by
tests/test_ops_cuda.py."""

from __future__ import annotations

import os

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch, extension, reference
from fastinpo.ops.flow import FlowSchedule, flow_inpo_levels, per_sample
from tests.conftest import randn
from tests.tolerances import assert_close_fp32, assert_spec_rule, ulp_floor

OPTED_OUT = os.environ.get("FASTINPO_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off")
needs_ext = pytest.mark.skipif(OPTED_OUT and extension.load() is None,
                               reason="fastinpo._C was not built: FASTINPO_BUILD_EXT=0 opts out of the extension")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd sizes (vector tails), B = 1, and one large enough to be split over threads (> 32K elements)
SHAPES = [(6, 4, 13, 17), (1, 4, 8, 8), (2, 3), (4, 16, 64, 64)]


def d_sigmas(n, gen):
    """Per-sample Δσ: InPO-for-flows level gaps (K = 10, SD3), clipped fractions of them, negative steps, 0."""
    gaps = flow_inpo_levels(FlowSchedule.sd3(), 10).sigmas.diff()
    pool = torch.cat([gaps, -gaps, gaps * 0.37, torch.zeros(1)])
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen)]


def check(out, x, v, d, dtype, what):
    assert out.dtype == x.dtype and out.shape == x.shape
    exp = reference.flow_euler_step(x.double(), v.double(), d.double())
    plain = reference.flow_euler_step(x, v, d)
    terms = x.double().abs() + d.double().abs().view(-1, *([1] * (x.dim() - 1))) * v.double().abs()
    assert_spec_rule(out, exp, plain, floor=ulp_floor(terms.max(), dtype), what=what)


@needs_ext
def test_the_op_is_registered():
    assert extension.load() is not None, extension.load_error()
    assert extension._has_op("flow_euler_step"), (
        "fastinpo._C has no flow_euler_step: it was built from older sources; rebuild it "
        "(pip install --no-build-isolation -e ., or python setup.py build_ext --inplace)")
    assert "ext" in dispatch.registered()["flow_euler_step"]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ext_flow_euler_step_matches_reference(dtype, shape, gen):
    x = randn(*shape, generator=gen, dtype=dtype)
    v = randn(*shape, generator=gen, dtype=dtype, scale=1.5)
    d = d_sigmas(shape[0], gen)
    check(fastinpo.flow_euler_step(x, v, d, backend="ext"), x, v, d, dtype, f"ext Euler step {dtype} {shape}")
    check(torch.ops.fastinpo.flow_euler_step(x, v, d), x, v, d, dtype, f"op {dtype} {shape}")


@needs_ext
def test_ext_is_the_automatic_cpu_choice_and_rows_are_independent(gen):
    x, v = randn(5, 4, 9, 7, generator=gen), randn(5, 4, 9, 7, generator=gen)
    d = d_sigmas(5, gen)
    assert dispatch.resolve("flow_euler_step", None, (x, v, d))[0] == "ext"
    out = fastinpo.flow_euler_step(x, v, d)
    for i in range(5):  # each sample's result depends only on its own row and Δσ
        alone = fastinpo.flow_euler_step(x[i:i + 1], v[i:i + 1], d[i:i + 1], backend="ext")
        assert torch.equal(out[i:i + 1], alone)


@needs_ext
def test_multithreaded_split_matches_single_thread(gen):
    x, v = randn(3, 16, 96, 96, generator=gen), randn(3, 16, 96, 96, generator=gen)
    d = d_sigmas(3, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastinpo.flow_euler_step(x, v, d, backend="ext")
        torch.set_num_threads(max(2, threads))
        many = fastinpo.flow_euler_step(x, v, d, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_dtypes_and_non_contiguous(dtype, gen):
    x = randn(4, 4, 9, 7, generator=gen, dtype=dtype)
    v = randn(4, 4, 7, 9, generator=gen).transpose(2, 3)  # float32 velocity, not contiguous
    d = d_sigmas(4, gen)
    check(fastinpo.flow_euler_step(x, v, d, backend="ext"), x, v, d, dtype, f"mixed {dtype}")


@needs_ext
def test_inversion_on_the_ext_step_equals_reference_step(gen):
    levels = flow_inpo_levels(FlowSchedule.sd3(), 10)
    sig = torch.tensor([0.31, 0.9, 0.004, 1.0])
    z0 = randn(8, 4, 5, 7, generator=gen)
    w = randn(4, 4, generator=gen, dtype=torch.float64) / 2

    def model(x, t, cond):
        h = torch.einsum("nchw,cd->ndhw", x.double(), w) + (t.double() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(h).to(x.dtype)

    cond = {"id": torch.arange(8)}
    a = fastinpo.flow_inpo_invert(model, z0, sig, cond, levels, backend="ext")
    b = fastinpo.flow_inpo_invert(model, z0, sig, cond, levels, backend="reference")
    assert a.num_steps.tolist() == b.num_steps.tolist() == [3, 8, 1, 10]
    assert_close_fp32(a.latents, b.latents.double(), what="x̃ ext vs reference")
    s = per_sample(sig).view(-1, 1, 1, 1)  # v* divides x̃'s rounding by σ_t: compare σ_t v*
    assert_close_fp32(a.target * s, (b.target * s).double(), what="σ_t v* ext vs reference")


BAD_CASES = {
    "v shape": (lambda x, v, d: (x, v[:, :2], d), ValueError, "v must have x's shape"),
    "v dtype": (lambda x, v, d: (x, v.half(), d), TypeError, "v must have x's dtype"),
    "float64 x": (lambda x, v, d: (x.double(), v.double(), d), TypeError, "float32, float16 or bfloat16"),
    "0-d x": (lambda x, v, d: (x[0, 0, 0], v[0, 0, 0], d), ValueError, "batch dimension"),
    "d_sigma dtype": (lambda x, v, d: (x, v, d.double()), TypeError, "d_sigma must be Float"),
    "d_sigma shape": (lambda x, v, d: (x, v, d[:2]), ValueError, "d_sigma must have shape (3,)"),
    "d_sigma not finite": (lambda x, v, d: (x, v, torch.tensor([0.1, float("nan"), 0.2])), ValueError,
                           "d_sigma[1] = nan must be finite"),
    "device": (lambda x, v, d: (x, v, d.to("meta")), ValueError, "d_sigma must be on cpu like x"),
}


@needs_ext
@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_validation_messages(case, gen):
    make, exc, message = BAD_CASES[case]
    args = make(randn(3, 4, 5, generator=gen), randn(3, 4, 5, generator=gen), torch.tensor([0.1, 0.2, -0.3]))
    with pytest.raises(exc) as info:
        torch.ops.fastinpo.flow_euler_step(*args)
    assert message in str(info.value) and "fastinpo::flow_euler_step" in str(info.value), str(info.value)


@needs_ext
def test_meta_kernel_and_named_backend_refusal(gen):
    x = torch.empty(3, 4, 5, device="meta")
    out = torch.ops.fastinpo.flow_euler_step(x, x, torch.empty(3, device="meta"))
    assert out.shape == (3, 4, 5) and out.device.type == "meta"
    xs = randn(2, 3, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend 'ext' cannot run flow_euler_step here: dtype torch.float64"):
        fastinpo.flow_euler_step(xs, xs, torch.tensor([0.1, 0.2], dtype=torch.float64), backend="ext")
    assert dispatch.resolve("flow_euler_step", None, (xs, xs))[0] == "reference"


@needs_ext
def test_a_build_without_the_op_is_skipped_by_the_automatic_choice(monkeypatch, gen):
    """An extension built before flow_euler_step existed still loads: the automatic choice must not pick it, and
    a named request says to rebuild."""
    monkeypatch.setattr(extension, "_has_op", lambda name: False)
    x = randn(2, 3, generator=gen)
    d = torch.tensor([0.1, 0.2])
    assert dispatch.resolve("flow_euler_step", None, (x, x, d))[0] == "reference"
    assert dispatch.resolve("ddim_inversion_step", None, (x, x, d, d))[0] == "ext"
    with pytest.raises(ValueError, match="built before flow_euler_step was added.*rebuild"):
        fastinpo.flow_euler_step(x, x, d, backend="ext")
