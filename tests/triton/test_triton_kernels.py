"""Triton kernels vs the reference (SPEC §6), on CPU through TRITON_INTERPRET=1, and on a GPU at full size.

Expected values are the reference in float64; float32 paths use the relative rule, fp16/bf16 the "at most 2x the
plain PyTorch error in that dtype" rule (tests/tolerances.py). Tensors are small (the interpreter runs each
program in Python) except where a test needs a sample split across several programs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch, reference
from fastinpo.ops.schedule import NoiseSchedule, gather_alphas
from tests.tolerances import FLOAT32_RTOL, assert_close_fp32, assert_matches

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 4, 13, 17), (6, 4, 13, 17), (16, 3, 5, 7)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_preds(shape, dtype, seed, device="cpu", spread=0.5):
    """target ~ N(0,1); model and ref = target + spread * N(0,1) (random every time, never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(shape, generator=g)
    m = t + spread * torch.randn(shape, generator=g)
    r = t + spread * torch.randn(shape, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (m, r, t))


def _loss_fields(out):
    return {f: getattr(out, f) for f in out._fields}


def check_output(actual, expected64, plain, dtype, beta, what):
    """Compare every field of two DPOLossOutputs.

    The logits are ``0.5 * beta * ((m_w - m_l) - (r_w - r_l))``: a float32 path carries the rounding error of the
    four errors, amplified by ``0.5 * beta`` (2500 at beta = 5000) and not reduced by the subtraction. So the
    logits (and the loss, whose slope in the logits is at most 1/B) get an absolute floor of
    ``FLOAT32_RTOL * 0.5 * beta * max(|m| + |r|)``: the relative rule applied to the terms before they cancel.
    """
    scale = 0.5 * beta * float((expected64.model_mse.detach().abs().max() + expected64.ref_mse.abs().max()) * 2)
    for f in actual._fields:
        a, e = getattr(actual, f), getattr(expected64, f)
        if f in ("logits", "loss") and dtype == torch.float32:
            assert_close_fp32(a, e, atol=max(1e-6, FLOAT32_RTOL * scale), what=f"{what}.{f}")
        elif dtype == torch.float32:
            assert_close_fp32(a, e, what=f"{what}.{f}")
        else:
            assert_matches(a, e, dtype=dtype, plain=getattr(plain, f), what=f"{what}.{f}")


def check_grad(actual, expected64, plain, dtype, expected_out, beta, what):
    """Gradient of a DPO-family loss.

    float32: ``grad = coef_s * (...)`` with ``coef_s`` proportional to ``sigmoid(-logit_b)``, whose relative change
    is at most the logit's absolute change. The logits carry the ``FLOAT32_RTOL * 0.5 * beta * max(|m| + |r|)``
    error explained in :func:`check_output`, so the relative tolerance of the gradient is
    ``FLOAT32_RTOL * (1 + 0.5 * beta * max(|m| + |r|))``. fp16/bf16: the usual low-precision rule.
    """
    if dtype == torch.float32:
        e = expected_out
        scale = 0.5 * beta * float((e.model_mse.detach().abs().max() + e.ref_mse.abs().max()) * 2)
        assert_close_fp32(actual, expected64, rtol=FLOAT32_RTOL * (1 + scale), what=what)
    else:
        assert_matches(actual, expected64, dtype=dtype, plain=plain, what=what)


# ------------------------------------------------------------------------------------------ Diffusion-DPO loss
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_diffusion_dpo_forward_backward(shape, dtype):
    beta = 5000.0
    m, r, t = make_preds(shape, dtype, seed=sum(shape) * 3 + DTYPES.index(dtype))
    m.requires_grad_(True)
    out = fastinpo.diffusion_dpo_loss(m, r, t, beta, backend="triton")
    out.loss.backward()
    grad = m.grad.clone()

    m64 = m.detach().double().requires_grad_(True)
    exp = reference.diffusion_dpo_loss(m64, r.double(), t.double(), beta)
    exp.loss.backward()
    mp = m.detach().clone().requires_grad_(True)
    plain = reference.diffusion_dpo_loss(mp, r, t, beta)
    plain.loss.backward()

    check_output(out, exp, plain, dtype, beta, "dpo")
    assert grad.dtype == dtype and grad.shape == m.shape
    check_grad(grad, m64.grad, mp.grad, dtype, exp, beta, "dpo grad")


def test_diffusion_dpo_gradient_through_every_output():
    """Gradients that enter through logits and model_mse (not only the loss) reach model_pred too."""
    m, r, t = make_preds((6, 4, 13, 17), torch.float32, seed=1)
    m.requires_grad_(True)
    out = fastinpo.diffusion_dpo_loss(m, r, t, 3.0, backend="triton")
    (out.loss + 0.3 * out.logits.sum() + 2.0 * (out.model_mse * torch.arange(6.0)).sum()).backward()
    m64 = m.detach().double().requires_grad_(True)
    e = reference.diffusion_dpo_loss(m64, r.double(), t.double(), 3.0)
    (e.loss + 0.3 * e.logits.sum() + 2.0 * (e.model_mse * torch.arange(6.0, dtype=torch.float64)).sum()).backward()
    assert_close_fp32(m.grad, m64.grad, what="grad through all outputs")


def test_beta_5000_large_logits_saturate_finite():
    """Winners far better than losers (or the reverse): |logits| ~ 1e3, log-sigmoid saturates, all finite."""
    shape = (8, 4, 13, 17)
    g = torch.Generator().manual_seed(7)
    t = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    level = torch.tensor([0.1, 2.0, 0.1, 2.0, 2.0, 0.1, 2.0, 0.1]).view(-1, 1, 1, 1)
    m = (t + level * noise).requires_grad_(True)
    r = t + 0.5 * torch.randn(shape, generator=g)
    out = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0, backend="triton")
    out.loss.backward()
    assert float(out.logits.detach().abs().min()) > 1e3
    assert all(bool(torch.isfinite(v).all()) for v in _loss_fields(out).values())
    assert bool(torch.isfinite(m.grad).all())
    m64 = m.detach().double().requires_grad_(True)
    e = reference.diffusion_dpo_loss(m64, r.double(), t.double(), 5000.0)
    e.loss.backward()
    check_output(out, e, None, torch.float32, 5000.0, "saturated")
    assert_close_fp32(m.grad, m64.grad, what="saturated grad")


def test_tied_logits_give_half_accuracy():
    m, _, t = make_preds((4, 3, 5, 5), torch.float32, seed=3)
    out = fastinpo.diffusion_dpo_loss(m, m.clone(), t, 5000.0, backend="triton")
    assert float(out.implicit_acc) == 0.5
    assert torch.equal(out.logits, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inpo_in_kernel_target(dtype):
    from fastinpo.kernels.dpo_loss import inpo_dpo_loss

    shape = (6, 4, 13, 17)
    g = torch.Generator().manual_seed(11)
    x_t = torch.randn(shape, generator=g)
    z0 = torch.randn(shape, generator=g)
    alpha = torch.rand(6, generator=g) * 0.9 + 0.05
    eps = reference.inpo_target(x_t, z0, alpha)
    m = (eps + 0.5 * torch.randn(shape, generator=g)).to(dtype).requires_grad_(True)
    r = (eps + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    x_t, z0 = x_t.to(dtype), z0.to(dtype)
    beta = 2000.0
    out = inpo_dpo_loss(m, r, x_t, z0, alpha, beta)
    out.loss.backward()

    m64 = m.detach().double().requires_grad_(True)
    e = reference.diffusion_dpo_loss(m64, r.double(), reference.inpo_target(x_t.double(), z0.double(), alpha.double()),
                                     beta)
    e.loss.backward()
    mp = m.detach().clone().requires_grad_(True)
    p = reference.diffusion_dpo_loss(mp, r, reference.inpo_target(x_t, z0, alpha), beta)
    p.loss.backward()
    check_output(out, e, p, dtype, beta, "inpo")
    if dtype == torch.float32:
        # The gradient is coef_s * 2 (m - eps*) / n with eps* = (x - sqrt(a) z0) / sqrt(1 - a) formed in float32
        # (by the kernel and by a plain float32 computation alike): eps* carries ~1 ulp of |x|/sqrt(1 - a), which
        # (m - eps*) does not shrink. So the relative rule is applied to the terms before they cancel:
        # atol = FLOAT32_RTOL * max_s |coef_s| * 2/n * max(|m| + |eps*|). (A plain float32 reference misses the
        # element-wise rule by the same amount.)
        t64 = reference.inpo_target(x_t.double(), z0.double(), alpha.double())
        diff = (m64.detach() - t64).flatten(1)
        idx = diff.abs().argmax(1, keepdim=True)
        coef = (m64.grad.flatten(1).gather(1, idx) / diff.gather(1, idx)).abs()  # = |coef_s| * 2 / n
        atol = FLOAT32_RTOL * float((coef * (m64.detach().abs() + t64.abs()).flatten(1)).max())
        assert_close_fp32(m.grad, m64.grad, atol=max(atol, 1e-6), what="inpo grad")
    else:
        assert_matches(m.grad, m64.grad, dtype=dtype, plain=mp.grad, what="inpo grad")


def test_non_contiguous_inputs():
    base_m, base_r, base_t = make_preds((12, 4, 17, 13), torch.float32, seed=5)
    # a batch slice (row-strided view: read in place) and a transposed H/W (copied once)
    m = base_m[::2].transpose(2, 3).detach().requires_grad_(True)
    r = base_r[::2].transpose(2, 3)
    t = base_t[1::2]
    t = t.transpose(2, 3)
    r2 = base_r[1::2].permute(0, 1, 3, 2)
    assert not m.is_contiguous() and not t.is_contiguous()
    for ref_pred in (r, r2):
        out = fastinpo.diffusion_dpo_loss(m, ref_pred, t, 50.0, backend="triton")
        out.loss.backward()
        m64 = m.detach().double().requires_grad_(True)
        e = reference.diffusion_dpo_loss(m64, ref_pred.double(), t.double(), 50.0)
        e.loss.backward()
        check_output(out, e, None, torch.float32, 50.0, "non-contiguous")
        assert_close_fp32(m.grad, m64.grad, what="non-contiguous grad")
        m.grad = None
    # a row-strided (but inner-contiguous) view goes through without a copy
    from fastinpo.kernels.dpo_loss import as_rows

    sl = base_m.view(12, -1)[::2]
    assert as_rows(sl, 6).data_ptr() == sl.data_ptr()


def test_sample_split_across_programs():
    """A sample spread over many programs (small BLOCK) sums to the same errors as one long sum."""
    from fastinpo.kernels.dpo_loss import as_rows, sumsq_partials

    m, r, t = make_preds((6, 4, 13, 17), torch.float32, seed=9)
    part = sumsq_partials(as_rows(m, 6), as_rows(r, 6), as_rows(t, 6), block=64, tiles=2)
    n = 4 * 13 * 17
    assert part.shape == (2, 6, math.ceil(n / 128)) and part.shape[-1] >= 2
    exp_m = reference.per_sample_mse(m.double(), t.double())
    exp_r = reference.per_sample_mse(r.double(), t.double())
    assert_close_fp32(part[0].sum(-1) / n, exp_m, what="split model mse")
    assert_close_fp32(part[1].sum(-1) / n, exp_r, what="split ref mse")
    # and through the public path: 4x32x32 = 4096 elements, four 1024-wide programs per sample
    m, r, t = make_preds((2, 4, 32, 32), torch.float32, seed=10)
    out = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0, backend="triton")
    e = reference.diffusion_dpo_loss(m.double(), r.double(), t.double(), 5000.0)
    check_output(out, e, None, torch.float32, 5000.0, "split public")


def test_determinism_bit_identical():
    m, r, t = make_preds((6, 4, 32, 32), torch.float16, seed=12)
    results = []
    for _ in range(2):
        mm = m.detach().clone().requires_grad_(True)
        out = fastinpo.diffusion_dpo_loss(mm, r, t, 5000.0, backend="triton")
        out.loss.backward()
        results.append((*_loss_fields(out).values(), mm.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    from fastinpo.kernels.inversion_dpo import accumulate_step

    D = [torch.zeros(6), torch.zeros(6)]
    for d in D:
        for i in range(3):
            accumulate_step(d, m * (i + 1), r, 0.5 + i, 3, block=64)
    assert torch.equal(D[0], D[1])


# ------------------------------------------------------------------------------------------ Inversion-DPO
def make_inversion(N, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn((N, *shape), generator=g)
    # the policy moved away from the reference (otherwise every gradient is 0 and the test passes trivially)
    pol = ref + 0.3 * torch.randn((N, *shape), generator=g)
    sch = NoiseSchedule.stable_diffusion()
    w = fastinpo.inversion_dpo_grid(sch, N).weights
    return pol.to(dtype), ref.to(dtype), w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 13, 17), (6, 3, 5, 7), (16, 2, 3, 5)], ids=str)
@pytest.mark.parametrize("flip_sign", [False, True])
def test_inversion_dpo_forward_backward(shape, dtype, flip_sign):
    N, beta = 5, 2000.0
    pol, ref, w = make_inversion(N, shape, dtype, seed=len(shape) + shape[0])
    pol.requires_grad_(True)
    out = fastinpo.inversion_dpo_loss(pol, ref, w, beta, flip_sign=flip_sign, backend="triton")
    out.loss.backward()
    p64 = pol.detach().double().requires_grad_(True)
    e = reference.inversion_dpo_loss(p64, ref.double(), w.double(), beta, flip_sign)
    e.loss.backward()
    pp = pol.detach().clone().requires_grad_(True)
    p = reference.inversion_dpo_loss(pp, ref, w, beta, flip_sign)
    p.loss.backward()
    check_output(out, e, p, dtype, beta, "inversion")
    assert float(p64.grad.abs().max()) > 0
    check_grad(pol.grad, p64.grad, pp.grad, dtype, e, beta, "inversion grad")


def test_inversion_two_pass_gradient():
    """accumulate_step (no grad) + distance_coef + step_grad == autograd of the reference loss (SPEC §4)."""
    from fastinpo.kernels.inversion_dpo import accumulate_step, distance_coef, step_grad

    N, beta = 4, 2000.0
    pol, ref, w = make_inversion(N, (6, 4, 13, 17), torch.float32, seed=21)
    D = torch.zeros(6)
    for i in range(N):
        accumulate_step(D, pol[i], ref[i], w[i], N, block=128)  # 0-d tensor weight: no host sync
    p64 = pol.double().requires_grad_(True)
    e = reference.inversion_dpo_loss(p64, ref.double(), w.double(), beta)
    e.loss.backward()
    assert_close_fp32(D, e.model_mse, what="accumulated D")
    coef = distance_coef(D, beta)
    grads = torch.stack([step_grad(coef, pol[i], ref[i], float(w[i]), N) for i in range(N)])
    assert_close_fp32(grads, p64.grad, what="two-pass grad")


def test_inversion_non_contiguous():
    pol, ref, w = make_inversion(3, (4, 4, 13, 17), torch.float32, seed=4)
    pol_t = pol.transpose(3, 4).detach().requires_grad_(True)
    ref_t = ref.transpose(3, 4)
    out = fastinpo.inversion_dpo_loss(pol_t, ref_t, w, 2000.0, backend="triton")
    out.loss.backward()
    p64 = pol_t.detach().double().requires_grad_(True)
    e = reference.inversion_dpo_loss(p64, ref_t.double(), w.double(), 2000.0)
    e.loss.backward()
    check_output(out, e, None, torch.float32, 2000.0, "inversion non-contiguous")
    assert_close_fp32(pol_t.grad, p64.grad, what="inversion non-contiguous grad")


# ------------------------------------------------------------------------------------------ DDIM inversion step
def _levels(n, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(-1, 9, (n,), generator=g) * 100 + 1  # -99 (-> alpha_init), 1, 101, ..., 801
    return src, src + 100


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ddim_step_registered(shape, dtype):
    sch = NoiseSchedule.stable_diffusion()
    n = shape[0]
    src, dst = _levels(n, seed=n)
    a_from = gather_alphas(sch.alphas_cumprod, src, sch.alpha_init)
    a_to = gather_alphas(sch.alphas_cumprod, dst, sch.alpha_init)
    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(shape, generator=g).to(dtype)
    eps = torch.randn(shape, generator=g).to(dtype)
    out = fastinpo.ddim_inversion_step(x, eps, a_from, a_to, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    exp = reference.ddim_inversion_step(x.double(), eps.double(), a_from.double(), a_to.double())
    plain = reference.ddim_inversion_step(x, eps, a_from, a_to)
    assert_matches(out, exp, dtype=dtype, plain=plain, what="ddim step")


def _fused_expected(x, eps, sch, src, dst, cfg, active):
    n = x.shape[0]
    a_from = gather_alphas(sch.alphas_cumprod.double(), src, sch.alpha_init)
    a_to = gather_alphas(sch.alphas_cumprod.double(), dst, sch.alpha_init)
    e = reference.cfg_combine(eps[:n].double(), eps[n:].double(), cfg) if cfg is not None else eps.double()
    out = reference.ddim_inversion_step(x.double(), e, a_from, a_to)
    if active is not None:
        out[~active] = x.double()[~active]
    return out


@pytest.mark.parametrize("cfg", [None, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_ddim_step_fused_options(cfg, masked, in_place):
    from fastinpo.kernels.ddim_step import ddim_inversion_step_fused

    sch = NoiseSchedule.stable_diffusion()
    n, shape = 6, (6, 4, 13, 17)
    src, dst = _levels(n, seed=3)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=g)
    eps = torch.randn((2 * n if cfg is not None else n, *shape[1:]), generator=g)
    active = torch.tensor([True, False, True, True, False, True]) if masked else None
    exp = _fused_expected(x, eps, sch, src, dst, cfg, active)
    x_in = x.clone()
    out = ddim_inversion_step_fused(
        x_in, eps, sch.alphas_cumprod, src, dst, sch.alpha_init, cfg_scale=cfg, active=active,
        out=x_in if in_place else None, block=256,
    )
    if in_place:
        assert out is x_in
    else:
        assert torch.equal(x_in, x)  # input untouched
    assert_close_fp32(out, exp, what=f"fused step cfg={cfg} masked={masked} in_place={in_place}")
    if masked:
        assert torch.equal(out[~active], x[~active])  # inactive samples copied bit for bit


def test_ddim_step_fused_non_contiguous_and_lowp():
    from fastinpo.kernels.ddim_step import ddim_inversion_step_fused

    sch = NoiseSchedule.stable_diffusion()
    n = 4
    src, dst = _levels(n, seed=5)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(n, 4, 17, 13, generator=g).transpose(2, 3)  # (n, 4, 13, 17), non-contiguous
    eps_full = torch.randn(2 * n, 4, 13, 34, generator=g)[..., ::2]  # strided inner dim
    assert not x.is_contiguous() and not eps_full.is_contiguous()
    exp = _fused_expected(x, eps_full, sch, src, dst, 2.0, None)
    out = ddim_inversion_step_fused(x, eps_full, sch.alphas_cumprod, src, dst, sch.alpha_init, cfg_scale=2.0)
    assert_close_fp32(out, exp, what="non-contiguous fused step")
    # in place into a non-contiguous x: computed in a copy, written back
    xi = x.clone().transpose(2, 3).contiguous().transpose(2, 3)
    ddim_inversion_step_fused(xi, eps_full, sch.alphas_cumprod, src, dst, sch.alpha_init, cfg_scale=2.0, out=xi)
    assert torch.equal(xi, out)
    # fp16 eps with a bf16 state
    xb, eh = x.to(torch.bfloat16), eps_full.to(torch.float16)
    outb = ddim_inversion_step_fused(xb, eh, sch.alphas_cumprod, src, dst, sch.alpha_init, cfg_scale=2.0)
    expb = _fused_expected(xb, eh, sch, src, dst, 2.0, None)
    a_from = gather_alphas(sch.alphas_cumprod, src, sch.alpha_init)
    a_to = gather_alphas(sch.alphas_cumprod, dst, sch.alpha_init)
    plain = reference.ddim_inversion_step(xb, reference.cfg_combine(eh[:n], eh[n:], 2.0), a_from, a_to)
    assert outb.dtype == torch.bfloat16
    assert_matches(outb, expb, dtype=torch.bfloat16, plain=plain, what="bf16 fused step")


def _noise_of(seed, n=4, shape=(4, 64, 64), scale=1.0, active=None):
    """The noise the fused step adds: (step with noise) - (step without), divided by the scale."""
    from fastinpo.kernels.ddim_step import ddim_inversion_step_fused

    sch = NoiseSchedule.stable_diffusion()
    src, dst = _levels(n, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((n, *shape), generator=g)
    eps = torch.randn((n, *shape), generator=g)
    args = (x, eps, sch.alphas_cumprod, src, dst, sch.alpha_init)
    ns = torch.full((n,), scale)
    noisy = ddim_inversion_step_fused(*args, noise_seed=seed, noise_scale=ns, active=active)
    clean = ddim_inversion_step_fused(*args, active=active)
    return noisy, (noisy.double() - clean.double()) / scale


def test_noise_reproducible_and_seed_dependent():
    a, za = _noise_of(1234, shape=(3, 16, 16))
    b, _ = _noise_of(1234, shape=(3, 16, 16))
    c, zc = _noise_of(1235, shape=(3, 16, 16))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float((za - zc).abs().mean()) > 0.5
    # winner and loser (different samples) get different noise, and a sample's noise does not depend on which
    # other samples are active
    assert not torch.allclose(za[0], za[1])
    act = torch.tensor([True, False, True, True])
    _, zm = _noise_of(1234, shape=(3, 16, 16), active=act)
    assert torch.equal(zm[act], za[act]) and bool((zm[~act] == 0).all())


def test_noise_moments():
    """mean ≈ 0 and variance ≈ 1 over M = 4 × 4 × 64 × 64 = 65536 draws.

    For i.i.d. N(0, 1): the sample mean has standard deviation 1/sqrt(M) and the sample variance sqrt(2/M)
    (kurtosis 3). Tolerances are 5 standard deviations (a false failure has probability ~6e-7; the seed is fixed
    anyway): |mean| < 5/sqrt(M) ≈ 0.020, |var - 1| < 5 sqrt(2/M) ≈ 0.028. Subtracting the noiseless step in
    float64 adds ~1e-7 per draw, negligible. The sample correlation of two samples' noise is ~N(0, 1/m) with
    m = 16384 draws per sample: |rho| < 5/sqrt(m) ≈ 0.039.
    """
    _, z = _noise_of(42, n=4, shape=(4, 64, 64), scale=0.37)
    M = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(M)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / M)
    flat = z.flatten(1)
    m = flat.shape[1]
    rho = torch.corrcoef(flat)
    off = rho[~torch.eye(4, dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / math.sqrt(m)
    # tails: the fraction beyond 2 sigma is 4.55%; binomial std sqrt(p(1-p)/M) ≈ 0.0008, 5 sigma ≈ 0.004
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / M)


# ------------------------------------------------------------------------------------------ dispatch, compile, AOT
def test_registry_automatic_choice_on_cpu_is_never_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 3, 4)
    a = torch.rand(2)
    assert dispatch.resolve("diffusion_dpo_loss", None, (x, x, x))[0] == "reference"
    assert dispatch.resolve("inversion_dpo_loss", None, (x[None], x[None], a[:1]))[0] == "reference"
    # the step has a compiled C++ implementation: where fastinpo._C is built it is the automatic CPU choice
    from fastinpo.ops import extension

    expected_step = "ext" if extension.load() is not None else "reference"
    assert dispatch.resolve("ddim_inversion_step", None, (x, x, a, a))[0] == expected_step
    assert dispatch.resolve("diffusion_dpo_loss", "triton", (x, x, x))[0] == "triton"
    # float64 stays on the reference: a named request says why
    with pytest.raises(ValueError, match="float64"):
        dispatch.resolve("diffusion_dpo_loss", "triton", (x.double(),) * 3)
    from fastinpo.kernels import registry

    assert registry.can_run([x]) is None
    assert "CUDA" in registry.auto_can_run([x])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in registry.can_run([x])


def test_import_fastinpo_does_not_import_triton():
    code = (
        "import sys, torch, fastinpo\n"
        "fastinpo.diffusion_dpo_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), 1.0)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    """The public loss with backend="triton" traces under torch.compile(fullgraph=True), forward and backward
    (the kernels sit behind torch.library custom ops with fake implementations)."""
    torch._dynamo.reset()

    def f(m, r, t):
        out = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0, backend="triton")
        return out.loss, out.logits

    m, r, t = make_preds((4, 4, 8, 8), torch.float32, seed=31)
    m.requires_grad_(True)
    loss, logits = f(m, r, t)
    loss.backward()
    g_eager = m.grad.clone()
    m.grad = None
    try:
        cf = torch.compile(f, fullgraph=True, backend=compile_backend)
        loss_c, logits_c = cf(m, r, t)
    except Exception as err:  # inductor needs a working C++ toolchain; aot_eager does not
        if compile_backend == "inductor" and "C++" in str(err):
            pytest.skip(f"inductor cannot compile on this machine: {err}")
        raise
    loss_c.backward()
    assert torch.equal(loss_c, loss) and torch.equal(logits_c, logits)
    assert torch.equal(m.grad, g_eager)


def test_aot_compile_sm80_sm90():
    """Every kernel compiles ahead of time for A100 (sm_80) and H100 (sm_90), without a GPU, without the
    interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastinpo.kernels.aot", "--arch", "80", "--arch", "90"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAILED" not in proc.stdout
    assert "kernel variants compiled for sm_80, sm_90" in proc.stdout


# ------------------------------------------------------------------------------------------ GPU, full SDXL sizes
SDXL = (4, 128, 128)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_dpo_sdxl(dtype, B):
    m, r, t = make_preds((2 * B, *SDXL), dtype, seed=B, device="cuda")
    m.requires_grad_(True)
    assert dispatch.resolve("diffusion_dpo_loss", None, (m, r, t))[0] == "triton"
    out = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0)  # automatic: triton on CUDA
    out.loss.backward()
    m64 = m.detach().double().requires_grad_(True)
    e = reference.diffusion_dpo_loss(m64, r.double(), t.double(), 5000.0)
    e.loss.backward()
    mp = m.detach().clone().requires_grad_(True)
    p = reference.diffusion_dpo_loss(mp, r, t, 5000.0)
    p.loss.backward()
    check_output(out, e, p, dtype, 5000.0, "gpu dpo")
    check_grad(m.grad, m64.grad, mp.grad, dtype, e, 5000.0, "gpu dpo grad")
    # determinism at full size
    out2 = fastinpo.diffusion_dpo_loss(m, r, t, 5000.0)
    assert torch.equal(out.loss, out2.loss) and torch.equal(out.model_mse, out2.model_mse)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_inversion_dpo_sdxl(dtype):
    pol, ref, w = make_inversion(8, (4, *SDXL), dtype, seed=3)
    pol, ref, w = pol.cuda().requires_grad_(True), ref.cuda(), w.cuda()
    out = fastinpo.inversion_dpo_loss(pol, ref, w, 2000.0)
    out.loss.backward()
    p64 = pol.detach().double().requires_grad_(True)
    e = reference.inversion_dpo_loss(p64, ref.double(), w.double(), 2000.0)
    e.loss.backward()
    pp = pol.detach().clone().requires_grad_(True)
    p = reference.inversion_dpo_loss(pp, ref, w, 2000.0)
    p.loss.backward()
    check_output(out, e, p, dtype, 2000.0, "gpu inversion")
    check_grad(pol.grad, p64.grad, pp.grad, dtype, e, 2000.0, "gpu inversion grad")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_ddim_step_sdxl(dtype):
    from fastinpo.kernels.ddim_step import ddim_inversion_step_fused

    sch = NoiseSchedule.stable_diffusion()
    n = 32
    src, dst = _levels(n, seed=9)
    x = torch.randn((n, *SDXL), device="cuda").to(dtype)
    eps = torch.randn((2 * n, *SDXL), device="cuda").to(dtype)
    table = sch.alphas_cumprod.cuda()
    out = ddim_inversion_step_fused(x, eps, table, src.cuda(), dst.cuda(), sch.alpha_init, cfg_scale=2.0)
    exp = _fused_expected(x.cpu(), eps.cpu(), sch, src, dst, 2.0, None)
    a_from = gather_alphas(sch.alphas_cumprod, src, sch.alpha_init).cuda()
    a_to = gather_alphas(sch.alphas_cumprod, dst, sch.alpha_init).cuda()
    plain = reference.ddim_inversion_step(x, reference.cfg_combine(eps[:n], eps[n:], 2.0), a_from, a_to)
    assert_matches(out, exp, dtype=dtype, plain=plain, what="gpu fused step")
    reg = fastinpo.ddim_inversion_step(x, eps[:n], a_from, a_to)
    exp2 = reference.ddim_inversion_step(x.double(), eps[:n].double(), a_from.double(), a_to.double())
    assert_matches(reg, exp2, dtype=dtype, plain=reference.ddim_inversion_step(x, eps[:n], a_from, a_to),
                   what="gpu registered step")
