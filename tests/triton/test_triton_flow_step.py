"""The Triton Euler step of flow models (SPEC §7) vs the reference, on CPU through TRITON_INTERPRET=1 and on a GPU
compiled: SPEC §6's rule (tests/tolerances.py, :func:`assert_spec_rule`) — the kernel's max error against float64
on the same inputs is at most twice plain PyTorch's in the same dtype, plus a floor of a few float32 ulps of the
terms ``|x| + |Δσ v|``. Per-sample ``Δσ`` of both signs and realistic magnitudes (the InPO-for-flows levels' gaps,
a clipped last step, a sampler's negative step)."""

from __future__ import annotations

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch, reference
from fastinpo.ops.flow import FlowSchedule, flow_inpo_levels, per_sample
from tests.tolerances import assert_close_fp32, assert_spec_rule, ulp_floor

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 4, 13, 17), (6, 4, 13, 17), (1, 16, 3, 5), (3, 4, 33, 17)]  # the last splits a sample over programs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def d_sigmas(n, seed):
    """Per-sample Δσ: gaps between InPO-for-flows levels (K = 10, SD3 schedule), clipped last steps, negative
    (sampler) steps and 0."""
    g = torch.Generator().manual_seed(seed)
    gaps = flow_inpo_levels(FlowSchedule.sd3(), 10).sigmas.diff()
    pool = torch.cat([gaps, -gaps, gaps * 0.37, torch.zeros(1)])
    return pool[torch.randint(0, pool.numel(), (n,), generator=g)]


def euler_floor(x, v, d, dtype):
    terms = x.double().abs() + d.double().abs().view(-1, *([1] * (x.dim() - 1))) * v.double().abs()
    return ulp_floor(terms.max(), dtype)


def check(out, x, v, d, dtype, what):
    assert out.dtype == x.dtype and out.shape == x.shape
    exp = reference.flow_euler_step(x.double(), v.double(), d.double())
    plain = reference.flow_euler_step(x, v, d)
    assert_spec_rule(out, exp, plain, floor=euler_floor(x, v, d, dtype), what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flow_euler_step_registered(shape, dtype):
    n = shape[0]
    g = torch.Generator().manual_seed(n + 17)
    x = torch.randn(shape, generator=g).to(dtype)
    v = (1.5 * torch.randn(shape, generator=g)).to(dtype)
    d = d_sigmas(n, seed=n)
    out = fastinpo.flow_euler_step(x, v, d, backend="triton")
    check(out, x, v, d, dtype, f"triton Euler step {dtype} {shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_flow_euler_step_low_precision_state_float32_velocity(dtype):
    """The inversion's model output is read as float32; a low-precision state with a float32 velocity works."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 9, 7, generator=g).to(dtype)
    v = torch.randn(4, 4, 9, 7, generator=g)
    d = d_sigmas(4, seed=3)
    check(fastinpo.flow_euler_step(x, v, d, backend="triton"), x, v, d, dtype, "mixed dtypes")


def test_flow_euler_step_non_contiguous_and_row_views():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 4, 17, 13, generator=g)
    x = base.transpose(2, 3)  # not row-viewable: copied
    v = torch.randn(8, 4, 13, 17, generator=g)[::2]  # a strided batch slice: a row view
    d = d_sigmas(4, seed=5)
    check(fastinpo.flow_euler_step(x, v, d, backend="triton"), x, v, d, torch.float32, "non-contiguous")


def test_flow_euler_step_in_the_inversion_equals_reference_backend():
    """The whole InPO-for-flows inversion on the Triton step equals it on the reference step within float32
    tolerance (a per-row, deterministic model)."""
    levels = flow_inpo_levels(FlowSchedule.sd3(), 10)
    sig = torch.tensor([0.31, 0.9, 0.004])
    g = torch.Generator().manual_seed(9)
    z0 = torch.randn(6, 4, 5, 7, generator=g)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) / 2

    def model(x, t, cond):
        h = torch.einsum("nchw,cd->ndhw", x.double(), w) + (t.double() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(h).to(x.dtype)

    cond = {"id": torch.arange(6)}
    a = fastinpo.flow_inpo_invert(model, z0, sig, cond, levels, backend="triton")
    b = fastinpo.flow_inpo_invert(model, z0, sig, cond, levels, backend="reference")
    assert_close_fp32(a.latents, b.latents.double(), what="x̃ triton vs reference")
    assert_close_fp32(a.target * per_sample(sig).view(-1, 1, 1, 1), (b.target * per_sample(sig).view(-1, 1, 1, 1))
                      .double(), what="σ_t v* triton vs reference")


def test_flow_euler_step_is_triton_only_by_name_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 3, 4)
    d = torch.rand(2)
    assert dispatch.resolve("flow_euler_step", "triton", (x, x, d))[0] == "triton"
    assert dispatch.resolve("flow_euler_step", None, (x, x, d))[0] != "triton"
    with pytest.raises(ValueError, match="float64"):
        fastinpo.flow_euler_step(x.double(), x.double(), d.double(), backend="triton")


# ------------------------------------------------------------------------------------------ GPU, full SD3.5 sizes
SD35 = (16, 128, 128)  # SD3.5-medium latents at 1024 px


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_flow_euler_step_sd35(dtype):
    n = 16
    x = torch.randn((n, *SD35), device="cuda").to(dtype)
    v = torch.randn((n, *SD35), device="cuda")
    d = d_sigmas(n, seed=11).cuda()
    assert dispatch.resolve("flow_euler_step", None, (x, v, d))[0] == "triton"
    out = fastinpo.flow_euler_step(x, v, d)
    check(out.cpu(), x.cpu(), v.cpu(), d.cpu(), dtype, f"gpu Euler step {dtype}")
