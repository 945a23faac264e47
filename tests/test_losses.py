"""The losses of SPEC §2, §4, §5 and the InPO target, checked three ways:

1. the reference against an independent float64 transcription of SPEC written here with Python floats, pair by
   pair (this file is the only place that transcribes the formulas: it checks the reference itself; every fast
   path is then checked against the reference), for every loss type;
2. the public functions (dispatch, validation) against the reference, for every input dtype;
3. gradcheck in float64;
4. the drop-in swap of docs/DROP_IN.md against the loss lines of diffusers' two Diffusion-DPO scripts.
"""

from __future__ import annotations

import math
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastinpo
from fastinpo.ops import reference
from tests.conftest import randn
from tests.tolerances import (
    GRADCHECK_ATOL,
    GRADCHECK_EPS,
    GRADCHECK_RTOL,
    assert_close_fp32,
    assert_matches,
    assert_spec_rule,
    ulp_floor,
)

SHAPES = [(2, 4, 8, 8), (2, 3, 13, 17), (6, 4, 5, 7), (16, 4, 8, 8), (4, 11)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOSS_TYPES = ["sigmoid", "hinge", "ipo"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- independent transcription of SPEC (float64)
def _mse64(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    rows = []
    for i in range(a.shape[0]):
        d = [(float(x) - float(y)) ** 2 for x, y in zip(a[i].flatten().tolist(), b[i].flatten().tolist(), strict=False)]
        rows.append(math.fsum(d) / len(d))
    return rows


def _softplus(x: float) -> float:  # -logsigmoid(-x), stable for any x
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _pair_loss64(z: float, beta: float, loss_type: str) -> float:
    """SPEC §2's per-pair losses of the logit z."""
    if loss_type == "sigmoid":
        return _softplus(-z)
    if loss_type == "hinge":
        return max(0.0, 1.0 - z)
    assert loss_type == "ipo"
    return ((z - 0.5) / (0.5 * beta)) ** 2


def _pair_slope64(z: float, beta: float, loss_type: str) -> float:
    """|d(per-pair loss)/dz|: how much a logit's rounding moves the loss."""
    if loss_type == "sigmoid":
        return 1.0 / (1.0 + math.exp(min(z, 700.0)))
    if loss_type == "hinge":
        return 1.0 if z < 1 else 0.0
    return abs(2.0 * (z - 0.5) / (0.5 * beta) ** 2)


def _dpo64(m: list[float], r: list[float], beta: float, sign: float = -1.0, loss_type: str = "sigmoid"):
    B = len(m) // 2
    logits = [sign * 0.5 * beta * ((m[i] - m[B + i]) - (r[i] - r[B + i])) for i in range(B)]
    loss = math.fsum(_pair_loss64(z, beta, loss_type) for z in logits) / B
    acc = (sum(z > 0 for z in logits) + 0.5 * sum(z == 0 for z in logits)) / B
    return logits, loss, acc


def _loss_atol(logits: list[float], beta: float, loss_type: str, logit_atol: float) -> float:
    """The relative rule carried through the loss: a logit off by ``logit_atol`` moves the mean loss by at most
    ``mean(|slope|) * logit_atol``."""
    return max(1e-6, logit_atol * math.fsum(_pair_slope64(z, beta, loss_type) for z in logits) / len(logits))


def _inputs(shape, dtype, gen, scale=1.0):
    target = randn(*shape, generator=gen, dtype=dtype)
    model = (target.double() + scale * randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    ref = (target.double() + scale * randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    return model, ref, target


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_dpo_reference_matches_spec(shape, loss_type, gen):
    # beta 5000 with errors of order 1: logits of both signs, hinge active on some pairs and not on others
    beta = 5000.0
    model, ref, target = _inputs(shape, torch.float32, gen)
    m, r = _mse64(model, target), _mse64(ref, target)
    logits, loss, acc = _dpo64(m, r, beta, loss_type=loss_type)
    out = reference.diffusion_dpo_loss(model, ref, target, beta, loss_type)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_fp32(out.model_mse, torch.tensor(m, dtype=torch.float64), what="model_mse")
    assert_close_fp32(out.ref_mse, torch.tensor(r, dtype=torch.float64), what="ref_mse")
    # logits are a difference of differences times 2500: compare on the scale of the terms, not of the result
    scale = 0.5 * beta * max(max(m), max(r))
    assert_close_fp32(out.logits, torch.tensor(logits, dtype=torch.float64), atol=1e-5 * scale, what="logits")
    assert_close_fp32(out.loss, loss, atol=_loss_atol(logits, beta, loss_type, 1e-5 * scale), what="loss")
    assert out.implicit_acc.item() == pytest.approx(acc, rel=1e-7)  # float32 mean of 0/1 values


def test_loss_types_differ_and_reduce_to_the_logits(gen):
    """The three loss types are different functions of the same logits, and the hinge is active on exactly the
    pairs with z < 1 (a constant, inactive pair contributes 0)."""
    model, ref, target = _inputs((4, 3, 5, 5), torch.float32, gen)
    # each pair twice, once as (w, l) and once as (l, w): logits of both signs, so both hinge regimes
    model, ref, target = (torch.cat([x[:2], x[2:], x[2:], x[:2]]) for x in (model, ref, target))
    outs = {lt: fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0, loss_type=lt) for lt in LOSS_TYPES}
    for lt in LOSS_TYPES:
        assert torch.equal(outs[lt].logits, outs["sigmoid"].logits)
        assert torch.equal(outs[lt].implicit_acc, outs["sigmoid"].implicit_acc)
    z = outs["sigmoid"].logits
    assert bool((z < 1).any()) and bool((z >= 1).any())  # both hinge regimes present
    assert torch.equal(outs["hinge"].loss, (1 - z).clamp(min=0).mean())
    assert len({float(o.loss) for o in outs.values()}) == 3


def test_loss_type_is_validated():
    x = torch.randn(2, 3)
    for bad in ("cpo", "Sigmoid", None, 1):
        with pytest.raises(ValueError, match="loss_type must be one of 'sigmoid', 'hinge', 'ipo'"):
            fastinpo.diffusion_dpo_loss(x, x, x, 1.0, loss_type=bad)
        with pytest.raises(ValueError, match="loss_type"):
            fastinpo.inversion_dpo_loss(x[None, :, :, None, None], x[None, :, :, None, None], torch.ones(1), 1.0,
                                        loss_type=bad)
        with pytest.raises(ValueError, match="loss_type"):
            fastinpo.DiffusionDPOLoss(1.0, loss_type=bad)
    with pytest.raises(ValueError, match="unknown loss_type"):
        reference.preference_loss(x[0], 1.0, "cpo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (6, 3, 13, 17)])
@pytest.mark.parametrize("flip_sign", [False, True])
def test_inversion_dpo_reference_matches_spec(shape, flip_sign, loss_type, gen):
    N = 5
    model = randn(N, *shape, generator=gen)
    ref = model + 0.3 * randn(N, *shape, generator=gen)
    weights = 1.0 / (2.0 * torch.rand(N, generator=gen, dtype=torch.float64).clamp(min=0.05)).float()
    per_step = [_mse64(model[i], ref[i]) for i in range(N)]
    D = [math.fsum(float(weights[i]) * per_step[i][s] for i in range(N)) / N for s in range(shape[0])]
    logits, loss, acc = _dpo64(D, [0.0] * len(D), 2000.0, sign=1.0 if flip_sign else -1.0, loss_type=loss_type)
    out = reference.inversion_dpo_loss(model, ref, weights, 2000.0, flip_sign, loss_type)
    assert_close_fp32(out.model_mse, torch.tensor(D, dtype=torch.float64), what="D")
    assert torch.equal(out.ref_mse, torch.zeros(shape[0]))
    scale = 0.5 * 2000.0 * max(D)
    assert_close_fp32(out.logits, torch.tensor(logits, dtype=torch.float64), atol=1e-5 * scale, what="logits")
    assert_close_fp32(out.loss, loss, atol=_loss_atol(logits, 2000.0, loss_type, 1e-5 * scale), what="loss")
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


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_modules_equal_functions(loss_type, gen):
    model, ref, target = _inputs((6, 4, 5, 5), torch.float32, gen)
    a = fastinpo.DiffusionDPOLoss(5000.0, loss_type=loss_type)(model, ref, target)
    b = fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0, loss_type=loss_type)
    assert type(a) is fastinpo.DPOLossOutput and a._fields == b._fields
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert f"loss_type='{loss_type}'" in repr(fastinpo.DiffusionDPOLoss(5000.0, loss_type=loss_type))
    preds, refs = randn(3, 6, 4, 5, 5, generator=gen), randn(3, 6, 4, 5, 5, generator=gen)
    w = torch.rand(3, generator=gen) + 0.5
    a = fastinpo.InversionDPOLoss(2000.0, flip_sign=True, loss_type=loss_type)(preds, refs, w)
    b = fastinpo.inversion_dpo_loss(preds, refs, w, 2000.0, flip_sign=True, loss_type=loss_type)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert "beta=2000.0" in repr(fastinpo.InversionDPOLoss(2000.0))


def test_separate_winner_loser_tensors_recipe(gen):
    """The documented one-line recipe for trainers with separate (B, ...) winner and loser tensors."""
    B = 3
    pred_w, pred_l, ref_w, ref_l, target_w, target_l = (randn(B, 4, 5, 5, generator=gen) for _ in range(6))
    out = fastinpo.diffusion_dpo_loss(torch.cat([pred_w, pred_l]), torch.cat([ref_w, ref_l]),
                                      torch.cat([target_w, target_l]), beta=5000.0)
    m_w, m_l = reference.per_sample_mse(pred_w, target_w), reference.per_sample_mse(pred_l, target_l)
    r_w, r_l = reference.per_sample_mse(ref_w, target_w), reference.per_sample_mse(ref_l, target_l)
    assert torch.equal(out.logits, -0.5 * 5000.0 * ((m_w - m_l) - (r_w - r_l)))


def test_only_policy_gets_gradient(gen):
    model, ref, target = (t.requires_grad_(True) for t in _inputs((4, 3, 5, 5), torch.float32, gen))
    fastinpo.diffusion_dpo_loss(model, ref, target, 10.0).loss.backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None and target.grad is None


# ---------------------------------------------------------------- gradcheck (float64)
def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=GRADCHECK_EPS, atol=GRADCHECK_ATOL, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 2, 3, 3)])
def test_gradcheck_diffusion_dpo(shape, loss_type, gen):
    model, ref, target = (t.double() for t in _inputs(shape, torch.float32, gen, scale=0.3))
    model.requires_grad_(True)
    # beta chosen so that the logits are O(1): the sigmoid's slope is then far from 0 and 1 (and no logit sits on
    # the hinge's kink at 1)
    _gradcheck(lambda m: fastinpo.diffusion_dpo_loss(m, ref, target, 20.0, loss_type=loss_type).loss, model)
    _gradcheck(lambda m: fastinpo.diffusion_dpo_loss(m, ref, target, 20.0, loss_type=loss_type).logits, model)


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


# ---------------------------------------------------------------- drop-in swap for diffusers' DPO scripts
# docs/DROP_IN.md gives, for diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5) and
# train_diffusion_dpo_sdxl.py (SDXL), the lines to delete and the block to insert. The functions below rebuild the
# scripts' loss lines from their structure (per-sample F.mse_loss on .float() inputs, chunk(2) into winners and
# losers, the logged raw_model_loss / raw_ref_loss / implicit_acc, then each script's final loss); the test runs
# the inserted blocks exactly as the document shows them on the same tensors.
DROP_IN = ROOT / "docs" / "DROP_IN.md"


def _drop_in_snippet(name: str) -> str:
    text = DROP_IN.read_text()
    start = text.index(f"<!-- snippet: {name} -->")
    fence = text.index("```python\n", start) + len("```python\n")
    return text[fence:text.index("```", fence)]


def _per_sample_mse_like_the_scripts(pred, target):
    losses = F.mse_loss(pred.float(), target.float(), reduction="none")
    return losses.mean(dim=list(range(1, losses.dim())))


def _scripts_loss_lines(script, model_pred, ref_preds, target, args):
    """The loss lines of diffusers' two DPO scripts. ``script="sd15"``: ``logits = ref_diff - model_diff`` and the
    ``--loss_type`` branches on ``beta_dpo * logits`` (no factor 0.5); ``script="sdxl"``: ``inside_term =
    -0.5 * beta_dpo * (model_diff - ref_diff)`` with the sigmoid loss. The SDXL script has no ``--loss_type``; for
    hinge / IPO its logit is converted to the SD1.5 one (``inside_term = beta_dpo/2 * logits``) and the SD1.5
    branches apply — what fastinpo's ``loss_type`` does with the same β."""
    model_losses_w, model_losses_l = _per_sample_mse_like_the_scripts(model_pred, target).chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = _per_sample_mse_like_the_scripts(ref_preds, target)
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_loss.mean()
    if script == "sdxl":
        inside_term = -0.5 * args.beta_dpo * (model_diff - ref_diff)
        beta_sd15 = 0.5 * args.beta_dpo
        logits = inside_term / beta_sd15
    else:
        beta_sd15 = args.beta_dpo
        logits = ref_diff - model_diff
    if script == "sdxl" and args.loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(inside_term).mean()
    elif args.loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(beta_sd15 * logits).mean()
    elif args.loss_type == "hinge":
        loss = torch.relu(1 - beta_sd15 * logits).mean()
    else:
        # the SD1.5 script writes 1 / (2 * args.beta) here, an attribute its parser never defines (AttributeError);
        # beta_dpo is what it means
        loss = ((logits - 1 / (2 * beta_sd15)) ** 2).mean()
    acc_of = inside_term if script == "sdxl" else logits
    implicit_acc = (acc_of > 0).sum().float() / acc_of.size(0)
    implicit_acc += 0.5 * (acc_of == 0).sum().float() / acc_of.size(0)
    return loss, raw_model_loss, raw_ref_loss, implicit_acc


def _realistic_preds(B, dtype, gen, identical=False):
    """Unit-variance targets, per-sample MSEs of 0.3–0.6 whose pair differences span 1e-3–1e-1 (both signs), for
    the policy and for the reference; ``identical``: policy == reference (a LoRA run's first step)."""
    shape = (2 * B, 4, 16, 16)
    target = randn(*shape, generator=gen, dtype=torch.float64)

    def preds(mse):
        noise = randn(*shape, generator=gen, dtype=torch.float64)
        noise = noise / noise.square().flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)  # mean square exactly 1
        return target + mse.sqrt().view(-1, 1, 1, 1) * noise

    def signed_log_uniform():
        u = torch.rand(B, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(B, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        return sign * 10 ** (-3 + 2 * u)

    base = 0.3 + 0.2 * torch.rand(B, generator=gen, dtype=torch.float64)
    ref_gap, logit_gap = signed_log_uniform(), signed_log_uniform()
    r = torch.cat([base + ref_gap / 2, base - ref_gap / 2]).clamp(min=0.05)
    m = torch.cat([base + (ref_gap + logit_gap) / 2, base - (ref_gap + logit_gap) / 2]).clamp(min=0.05)
    ref_preds = preds(r)
    model_pred = ref_preds.clone() if identical else preds(m)
    return model_pred.to(dtype), ref_preds.to(dtype), target.to(dtype)


def _run_drop_in(script, model_pred, ref_preds, target, args):
    mp = model_pred.detach().clone().requires_grad_(True)
    ns = {"fastinpo": fastinpo, "torch": torch, "args": args, "model_pred": mp, "ref_preds": ref_preds,
          "target": target}
    exec(compile(textwrap.dedent(_drop_in_snippet(f"insert-{script}")), "DROP_IN", "exec"), ns)
    ns["loss"].backward()
    return {k: ns[k] for k in ("loss", "raw_model_loss", "raw_ref_loss", "implicit_acc")}, mp.grad


def _run_scripts_lines(script, model_pred, ref_preds, target, args):
    mp = model_pred.detach().clone().requires_grad_(True)
    loss, raw_model_loss, raw_ref_loss, implicit_acc = _scripts_loss_lines(script, mp, ref_preds, target, args)
    loss.backward()
    return {"loss": loss, "raw_model_loss": raw_model_loss, "raw_ref_loss": raw_ref_loss,
            "implicit_acc": implicit_acc}, mp.grad


def _exact_drop_in(script, model_pred, ref_preds, target, args):
    """The float64 truth: fastinpo's reference (checked against SPEC above) on the same inputs in float64, with the
    β of each script converted to SPEC's (SD1.5: 2 * beta_dpo)."""
    beta = 2 * args.beta_dpo if script == "sd15" else args.beta_dpo
    m64 = model_pred.detach().double().requires_grad_(True)
    out = reference.diffusion_dpo_loss(m64, ref_preds.double(), target.double(), float(beta), args.loss_type)
    out.loss.backward()
    values = {"loss": out.loss, "raw_model_loss": out.model_mse.mean(), "raw_ref_loss": out.ref_mse.mean(),
              "implicit_acc": out.implicit_acc}
    return values, m64.grad, out


@pytest.mark.parametrize("identical", [False, True], ids=["trained", "first-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("script", ["sd15", "sdxl"])
def test_drop_in_swap_matches_the_scripts(script, loss_type, dtype, identical, gen):
    """docs/DROP_IN.md's inserted lines give the loss, the three logged values and the gradient of the scripts'
    own lines, for every loss type and both β conventions (the scripts' default β: SD1.5 2500, SDXL 5000), with
    float32 predictions and with bf16 ones (mixed precision). Judged by SPEC §6: the swap's error against float64 is
    at most twice the scripts' own float32 error plus FLOOR_ULPS float32 ulps of the terms."""
    args = types.SimpleNamespace(beta_dpo=2500 if script == "sd15" else 5000, loss_type=loss_type)
    model_pred, ref_preds, target = _realistic_preds(6, dtype, gen, identical=identical)
    if script == "sdxl" and loss_type != "sigmoid":
        # the SDXL script has no --loss_type: its users add loss_type=... to the inserted call (docs/DROP_IN.md)
        mine, g_mine = _run_drop_in_with_loss_type(model_pred, ref_preds, target, args.beta_dpo, loss_type)
    else:
        mine, g_mine = _run_drop_in(script, model_pred, ref_preds, target, args)
    plain, g_plain = _run_scripts_lines(script, model_pred, ref_preds, target, args)
    exact, g_exact, out64 = _exact_drop_in(script, model_pred, ref_preds, target, args)

    half_beta = 0.5 * (2 * args.beta_dpo if script == "sd15" else args.beta_dpo)
    m, r = out64.model_mse.detach(), out64.ref_mse
    B = m.shape[0] // 2
    logit_terms = half_beta * (m[:B] + m[B:] + r[:B] + r[B:])  # the terms of each logit, before they cancel
    z = out64.logits.detach()
    slope = torch.autograd.functional.jacobian(
        lambda x: reference.preference_loss(x, 2 * half_beta, loss_type).sum(), z).abs()
    scales = {
        "loss": float(out64.loss.detach().abs() + (slope * logit_terms).mean()),
        "raw_model_loss": float(m.max()),
        "raw_ref_loss": float(r.max()),
    }
    for key, scale in scales.items():
        assert_spec_rule(mine[key], exact[key], plain[key], floor=ulp_floor(scale, torch.float32),
                         what=f"{script} {loss_type} {key}")
    # implicit accuracy counts signs: the logits here are >= 0.25 away from 0, or exactly 0 (first step)
    assert float(mine["implicit_acc"]) == float(plain["implicit_acc"])
    assert float(mine["implicit_acc"]) == pytest.approx(float(exact["implicit_acc"]), rel=1e-7)  # float32 of k/B
    assert g_mine.dtype == model_pred.dtype and g_mine.shape == model_pred.shape
    assert float(g_exact.abs().max()) > 0  # a LoRA run's first step: loss ln 2, but the gradient is not 0
    assert_spec_rule(g_mine, g_exact, g_plain, floor=ulp_floor(g_exact.abs().max(), dtype),
                     what=f"{script} {loss_type} grad")


def _run_drop_in_with_loss_type(model_pred, ref_preds, target, beta_dpo, loss_type):
    """The SDXL insert with the ``loss_type=`` keyword that docs/DROP_IN.md tells SDXL users to add."""
    snippet = _drop_in_snippet("insert-sdxl")
    call = "beta=args.beta_dpo)"
    assert snippet.count(call) == 1
    mp = model_pred.detach().clone().requires_grad_(True)
    ns = {"fastinpo": fastinpo, "torch": torch, "model_pred": mp, "ref_preds": ref_preds, "target": target,
          "args": types.SimpleNamespace(beta_dpo=beta_dpo)}
    code = snippet.replace(call, f"beta=args.beta_dpo, loss_type={loss_type!r})")
    exec(compile(textwrap.dedent(code), "DROP_IN", "exec"), ns)
    ns["loss"].backward()
    return {k: ns[k] for k in ("loss", "raw_model_loss", "raw_ref_loss", "implicit_acc")}, mp.grad


def test_drop_in_without_the_sd15_beta_conversion_is_caught(gen):
    """The mistake the old README invited (``beta=args.beta_dpo`` in the SD1.5 script): identical first-step loss
    (ln 2), half the gradient — the comparison above would fail on it."""
    model_pred, ref_preds, target = _realistic_preds(4, torch.float32, gen, identical=True)
    args = types.SimpleNamespace(beta_dpo=2500, loss_type="sigmoid")
    plain, g_plain = _run_scripts_lines("sd15", model_pred, ref_preds, target, args)
    mp = model_pred.clone().requires_grad_(True)
    wrong = fastinpo.diffusion_dpo_loss(mp, ref_preds, target, beta=args.beta_dpo)
    wrong.loss.backward()
    assert float(wrong.loss.detach()) == pytest.approx(math.log(2.0)) == pytest.approx(float(plain["loss"].detach()))
    torch.testing.assert_close(mp.grad, 0.5 * g_plain)
    exact, g_exact, _ = _exact_drop_in("sd15", model_pred, ref_preds, target, args)
    with pytest.raises(AssertionError, match="grad"):
        assert_spec_rule(mp.grad, g_exact, g_plain, floor=ulp_floor(g_exact.abs().max(), torch.float32),
                         what="unconverted beta grad")
