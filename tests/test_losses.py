"""The losses of SPEC §2, §4, §5 and the InPO target, checked three ways:

1. the reference against an independent float64 transcription of SPEC written here with Python floats, pair by
   pair (this file is the only place that transcribes the formulas: it checks the reference itself; every fast
   path is then checked against the reference);
2. the public functions (dispatch, validation) against the reference, for every input dtype;
3. gradcheck in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastinpo
from fastinpo.ops import reference
from tests.conftest import randn
from tests.tolerances import (
    GRADCHECK_ATOL,
    GRADCHECK_EPS,
    GRADCHECK_RTOL,
    assert_close_fp32,
    assert_matches,
)

SHAPES = [(2, 4, 8, 8), (2, 3, 13, 17), (6, 4, 5, 7), (16, 4, 8, 8), (4, 11)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- independent transcription of SPEC (float64)
def _mse64(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    rows = []
    for i in range(a.shape[0]):
        d = [(float(x) - float(y)) ** 2 for x, y in zip(a[i].flatten().tolist(), b[i].flatten().tolist(), strict=False)]
        rows.append(math.fsum(d) / len(d))
    return rows


def _softplus(x: float) -> float:  # -logsigmoid(-x), stable for any x
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _dpo64(m: list[float], r: list[float], beta: float, sign: float = -1.0):
    B = len(m) // 2
    logits = [sign * 0.5 * beta * ((m[i] - m[B + i]) - (r[i] - r[B + i])) for i in range(B)]
    loss = math.fsum(_softplus(-z) for z in logits) / B
    acc = (sum(z > 0 for z in logits) + 0.5 * sum(z == 0 for z in logits)) / B
    return logits, loss, acc


def _inputs(shape, dtype, gen, scale=1.0):
    target = randn(*shape, generator=gen, dtype=dtype)
    model = (target.double() + scale * randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    ref = (target.double() + scale * randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    return model, ref, target


@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_dpo_reference_matches_spec(shape, gen):
    model, ref, target = _inputs(shape, torch.float32, gen)
    m, r = _mse64(model, target), _mse64(ref, target)
    logits, loss, acc = _dpo64(m, r, 5000.0)
    out = reference.diffusion_dpo_loss(model, ref, target, 5000.0)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_fp32(out.model_mse, torch.tensor(m, dtype=torch.float64), what="model_mse")
    assert_close_fp32(out.ref_mse, torch.tensor(r, dtype=torch.float64), what="ref_mse")
    # logits are a difference of differences times 2500: compare on the scale of the terms, not of the result
    scale = 0.5 * 5000.0 * max(max(m), max(r))
    assert_close_fp32(out.logits, torch.tensor(logits, dtype=torch.float64), atol=1e-5 * scale, what="logits")
    assert_close_fp32(out.loss, loss, atol=1e-5 * scale, what="loss")
    assert out.implicit_acc.item() == pytest.approx(acc, rel=1e-7)  # float32 mean of 0/1 values


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (6, 3, 13, 17)])
@pytest.mark.parametrize("flip_sign", [False, True])
def test_inversion_dpo_reference_matches_spec(shape, flip_sign, gen):
    N = 5
    model = randn(N, *shape, generator=gen)
    ref = model + 0.3 * randn(N, *shape, generator=gen)
    weights = 1.0 / (2.0 * torch.rand(N, generator=gen, dtype=torch.float64).clamp(min=0.05)).float()
    per_step = [_mse64(model[i], ref[i]) for i in range(N)]
    D = [math.fsum(float(weights[i]) * per_step[i][s] for i in range(N)) / N for s in range(shape[0])]
    logits, loss, acc = _dpo64(D, [0.0] * len(D), 2000.0, sign=1.0 if flip_sign else -1.0)
    out = reference.inversion_dpo_loss(model, ref, weights, 2000.0, flip_sign)
    assert_close_fp32(out.model_mse, torch.tensor(D, dtype=torch.float64), what="D")
    assert torch.equal(out.ref_mse, torch.zeros(shape[0]))
    scale = 0.5 * 2000.0 * max(D)
    assert_close_fp32(out.logits, torch.tensor(logits, dtype=torch.float64), atol=1e-5 * scale, what="logits")
    assert_close_fp32(out.loss, loss, atol=1e-5 * scale, what="loss")
    assert out.implicit_acc.item() == pytest.approx(acc, rel=1e-7)  # float32 mean of 0/1 values


def test_flip_sign_flips_logits(gen):
    model = randn(3, 4, 2, 5, 5, generator=gen)
    ref = randn(3, 4, 2, 5, 5, generator=gen)
    w = torch.rand(3, generator=gen) + 0.5
    a = fastinpo.inversion_dpo_loss(model, ref, w, 2000.0)
    b = fastinpo.inversion_dpo_loss(model, ref, w, 2000.0, flip_sign=True)
    assert torch.equal(a.logits, -b.logits) and torch.equal(a.model_mse, b.model_mse)


def test_sft_loss_and_inpo_target_match_spec(gen):
    pred, target = randn(3, 4, 5, 7, generator=gen), randn(3, 4, 5, 7, generator=gen)
    assert_close_fp32(fastinpo.sft_loss(pred, target), math.fsum(_mse64(pred, target)) / 3, what="sft")
    x_t, z0 = randn(4, 4, 5, 5, generator=gen), randn(4, 4, 5, 5, generator=gen)
    alpha = torch.tensor([0.99915, 0.5, 0.01, 0.0047])
    got = fastinpo.inpo_target(x_t, z0, alpha)
    assert got.dtype == torch.float32
    a = alpha.double().view(-1, 1, 1, 1)
    expected = (x_t.double() - a.sqrt() * z0.double()) / (1 - a).sqrt()
    assert_close_fp32(got, expected, what="inpo_target")
    # bf16 latents: the target is still float32 math on the bf16 values (SPEC: never an fp16 ᾱ table)
    got16 = fastinpo.inpo_target(x_t.bfloat16(), z0.bfloat16(), alpha)
    assert got16.dtype == torch.float32
    expected16 = (x_t.bfloat16().double() - a.sqrt() * z0.bfloat16().double()) / (1 - a).sqrt()
    assert_close_fp32(got16, expected16, what="inpo_target bf16 inputs")


# ---------------------------------------------------------------- public API vs reference, every dtype
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_public_diffusion_dpo_every_dtype(shape, dtype, gen):
    model, ref, target = _inputs(shape, dtype, gen)
    out = fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0)
    exp = reference.diffusion_dpo_loss(model.double(), ref.double(), target.double(), 5000.0)
    # "plain PyTorch in the same dtype": the formula evaluated without float32 accumulation
    plain_m = (model - target).square().flatten(1).mean(1)
    assert out.loss.dtype == torch.float32 and out.logits.shape == (shape[0] // 2,)
    assert_matches(out.model_mse, exp.model_mse, dtype=dtype, plain=plain_m, what="model_mse")
    assert_matches(out.ref_mse, exp.ref_mse, dtype=dtype, plain=(ref - target).square().flatten(1).mean(1),
                   what="ref_mse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_inversion_dpo_every_dtype(dtype, gen):
    model = randn(4, 6, 3, 13, 17, generator=gen, dtype=dtype)
    ref = randn(4, 6, 3, 13, 17, generator=gen, dtype=dtype)
    w = (torch.rand(4, generator=gen) + 0.5)
    out = fastinpo.inversion_dpo_loss(model, ref, w, 2000.0)
    exp = reference.inversion_dpo_loss(model.double(), ref.double(), w.double(), 2000.0)
    plain = (w.to(dtype).view(-1, 1) * (model - ref).square().flatten(2).mean(2)).sum(0) / 4
    assert_matches(out.model_mse, exp.model_mse, dtype=dtype, plain=plain, what="D")


@pytest.mark.parametrize("beta", [5000.0, 1e6])
def test_large_logits_stay_finite(beta, gen):
    # errors of order 1 times beta 5000 give logits in the thousands: log-sigmoid saturates
    model, ref, target = _inputs((8, 4, 6, 6), torch.float32, gen, scale=3.0)
    out = fastinpo.diffusion_dpo_loss(model, ref, target, beta)
    assert out.logits.abs().max() > 100
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    model.requires_grad_(True)
    fastinpo.diffusion_dpo_loss(model, ref, target, beta).loss.backward()
    assert torch.isfinite(model.grad).all()
    # saturated pairs: loss = mean(softplus(-logits)), which for very negative logits is -logits exactly
    exp = _dpo64(_mse64(model.detach(), target), _mse64(ref, target), beta)[1]
    assert_close_fp32(out.loss, exp, rtol=1e-5, what="saturated loss")


def test_implicit_acc_gives_ties_half_credit(gen):
    target = randn(4, 3, 5, 5, generator=gen)
    pred = randn(4, 3, 5, 5, generator=gen)
    out = fastinpo.diffusion_dpo_loss(pred, pred, target, 5000.0)  # policy == reference: every logit is 0
    assert torch.equal(out.logits, torch.zeros(2)) and out.implicit_acc.item() == 0.5
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_modules_equal_functions(gen):
    model, ref, target = _inputs((6, 4, 5, 5), torch.float32, gen)
    a = fastinpo.DiffusionDPOLoss(5000.0)(model, ref, target)
    b = fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0)
    for x, y in zip(a, b, strict=False):
        assert torch.equal(x, y)
    preds, refs = randn(3, 6, 4, 5, 5, generator=gen), randn(3, 6, 4, 5, 5, generator=gen)
    w = torch.rand(3, generator=gen) + 0.5
    a = fastinpo.InversionDPOLoss(2000.0, flip_sign=True)(preds, refs, w)
    b = fastinpo.inversion_dpo_loss(preds, refs, w, 2000.0, flip_sign=True)
    for x, y in zip(a, b, strict=False):
        assert torch.equal(x, y)
    assert "beta=2000.0" in repr(fastinpo.InversionDPOLoss(2000.0))


def test_only_policy_gets_gradient(gen):
    model, ref, target = (t.requires_grad_(True) for t in _inputs((4, 3, 5, 5), torch.float32, gen))
    fastinpo.diffusion_dpo_loss(model, ref, target, 10.0).loss.backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None and target.grad is None


# ---------------------------------------------------------------- gradcheck (float64)
def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=GRADCHECK_EPS, atol=GRADCHECK_ATOL, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 2, 3, 3)])
def test_gradcheck_diffusion_dpo(shape, gen):
    model, ref, target = (t.double() for t in _inputs(shape, torch.float32, gen, scale=0.3))
    model.requires_grad_(True)
    # beta chosen so that the logits are O(1): the sigmoid's slope is then far from 0 and 1
    _gradcheck(lambda m: fastinpo.diffusion_dpo_loss(m, ref, target, 20.0).loss, model)
    _gradcheck(lambda m: fastinpo.diffusion_dpo_loss(m, ref, target, 20.0).logits, model)


def test_gradcheck_inversion_dpo(gen):
    # moved away from the reference first: at model == ref the gradient is 0 and the check would be trivial
    ref = randn(3, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    model = (ref + 0.5 * randn(3, 4, 2, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    _gradcheck(lambda m: fastinpo.inversion_dpo_loss(m, ref, w, 5.0).loss, model)
    _gradcheck(lambda m: fastinpo.inversion_dpo_loss(m, ref, w, 5.0, flip_sign=True).logits, model)
    g = torch.autograd.grad(fastinpo.inversion_dpo_loss(model, ref, w, 5.0).loss, model)[0]
    assert g.abs().max() > 1e-3


def test_gradcheck_sft_and_target(gen):
    pred = randn(3, 2, 3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    target = randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    _gradcheck(lambda p: fastinpo.sft_loss(p, target), pred)
    z0 = randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    x = randn(2, 2, 3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    alpha = torch.tensor([0.9, 0.2], dtype=torch.float64)
    _gradcheck(lambda v: fastinpo.inpo_target(v, z0, alpha), x)
