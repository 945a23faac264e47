"""Every backend of every op on CUDA tensors (the GPU kit's correctness stage, scripts/gpu/run.sh): Triton compiled
for real, the CUDA extension, the eager reference; fp32/fp16/bf16, SDXL latents (4×128×128) at B = 1 and 4 pairs,
an odd shape; judged against float64 on the CPU by the SPEC §6 rule (tests/tolerances.py).

On a CUDA machine every registered backend must run (a fast path that cannot is a failure here, not a skip). Without
CUDA the module is skipped, except in the kit's dry run (``FASTINPO_KIT_DRY_RUN=1``), which runs the same checks on
CPU tensors with the backends that run there (reference, the extension's CPU kernels), so the kit cannot rot.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch, reference
from tests.tolerances import FLOAT32_RTOL, assert_close_fp32, assert_matches, assert_spec_rule, ulp_floor

CUDA = torch.cuda.is_available()
DRY = os.environ.get("FASTINPO_KIT_DRY_RUN") == "1"
if not CUDA and not DRY:
    pytest.skip("needs a CUDA device (the kit's dry run sets FASTINPO_KIT_DRY_RUN=1 to run it on CPU tensors)",
                allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
SDXL = (4, 128, 128) if CUDA else (4, 16, 16)  # the dry run: the same code at a tiny size
SHAPES = [(1, SDXL), (4, SDXL), (3, (3, 37, 53))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SD35 = (16, 128, 128) if CUDA else (16, 8, 8)  # SD3.5-medium latents at 1024 px (flow models, SPEC §7)


def backends(op: str) -> list[str]:
    """Backends that must run on this device: all registered ones on CUDA; reference and ext on the CPU."""
    names = dispatch.registered()[op]
    if CUDA:
        return names
    return [b for b in names if b in ("reference", "ext")]


def _assert_backend_runs(op: str, backend: str, tensors) -> None:
    chosen, _ = dispatch.resolve(op, backend, tensors)  # raises (fails the test) if it cannot run here
    assert chosen == backend
    if backend == "triton":
        import importlib

        module = importlib.import_module({"diffusion_dpo_loss": "fastinpo.kernels.dpo_loss",
                                          "inversion_dpo_loss": "fastinpo.kernels.inversion_dpo",
                                          "ddim_inversion_step": "fastinpo.kernels.ddim_step",
                                          "flow_euler_step": "fastinpo.kernels.flow_step"}[op])
        kinds = {type(v).__name__ for v in vars(module).values() if "triton" in type(v).__module__}
        assert kinds == {"JITFunction"}, f"Triton ran as {kinds}: set TRITON_INTERPRET=0 for the GPU tier"


def _assert_logits(got, want64, plain, dtype, beta: float, mse_scale: float, what: str) -> None:
    """Logits and loss: ``-0.5 β (Δm - Δr)`` cancels MSEs of size ``mse_scale``, so an error of FLOAT32_RTOL in
    each MSE moves them by ``0.5 β · FLOAT32_RTOL · mse_scale`` (float32's own conditioning, not a loosened
    tolerance); low precision uses the plain-PyTorch rule as everywhere."""
    if dtype == torch.float32:
        assert_close_fp32(got, want64, atol=2 * 0.5 * beta * FLOAT32_RTOL * mse_scale, what=what)
    else:
        assert_matches(got, want64, dtype=dtype, plain=plain, what=what)


def _preds(n: int, shape, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, *shape, generator=g)
    model = target + 0.3 * torch.randn(n, *shape, generator=g)  # realistic: predictions near the target
    ref = target + 0.3 * torch.randn(n, *shape, generator=g)
    return [t.to(dtype) for t in (model, ref, target)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,shape", SHAPES)
def test_diffusion_dpo_loss_every_backend(B, shape, dtype):
    model, ref, target = _preds(2 * B, shape, dtype, seed=B)
    m64 = model.double().requires_grad_(True)
    e = reference.diffusion_dpo_loss(m64, ref.double(), target.double(), 5000.0)
    e.loss.backward()
    mp = model.to(DEVICE).detach().clone().requires_grad_(True)
    plain = fastinpo.diffusion_dpo_loss(mp, ref.to(DEVICE), target.to(DEVICE), 5000.0, backend="reference")
    plain.loss.backward()
    for backend in backends("diffusion_dpo_loss"):
        m = model.to(DEVICE).detach().clone().requires_grad_(True)
        args = (m, ref.to(DEVICE), target.to(DEVICE))
        _assert_backend_runs("diffusion_dpo_loss", backend, args)
        out = fastinpo.diffusion_dpo_loss(*args, 5000.0, backend=backend)
        out.loss.backward()
        what = f"{backend} dpo {dtype} B={B} {shape}"
        scale = float(e.model_mse.abs().max().detach())
        _assert_logits(out.loss.cpu(), e.loss, plain.loss.cpu(), dtype, 5000.0, scale, what)
        _assert_logits(out.logits.cpu(), e.logits, plain.logits.cpu(), dtype, 5000.0, scale, what + " logits")
        if dtype == torch.float32:  # the gradient carries the logit's error through σ (relative, ≤ its abs error)
            assert_close_fp32(m.grad.cpu(), m64.grad, rtol=FLOAT32_RTOL + 5000.0 * FLOAT32_RTOL * scale,
                              what=what + " grad")
        else:
            assert_matches(m.grad.cpu(), m64.grad, dtype=dtype, plain=mp.grad.cpu(), what=what + " grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [4, 20])
def test_inversion_dpo_loss_every_backend(N, dtype):
    from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG, NoiseSchedule, inversion_dpo_grid

    w = inversion_dpo_grid(NoiseSchedule.from_config(SD_SCHEDULER_CONFIG), N).weights
    g = torch.Generator().manual_seed(N)
    ref = torch.randn(N, 2, *SDXL, generator=g)
    pol = (ref + 0.2 * torch.randn(N, 2, *SDXL, generator=g)).to(dtype)
    ref = ref.to(dtype)
    p64 = pol.double().requires_grad_(True)
    e = reference.inversion_dpo_loss(p64, ref.double(), w.double(), 2000.0)
    e.loss.backward()
    pp = pol.to(DEVICE).detach().clone().requires_grad_(True)
    plain = fastinpo.inversion_dpo_loss(pp, ref.to(DEVICE), w.to(DEVICE), 2000.0, backend="reference")
    plain.loss.backward()
    for backend in backends("inversion_dpo_loss"):
        p = pol.to(DEVICE).detach().clone().requires_grad_(True)
        args = (p, ref.to(DEVICE), w.to(DEVICE))
        _assert_backend_runs("inversion_dpo_loss", backend, args)
        out = fastinpo.inversion_dpo_loss(*args, 2000.0, backend=backend)
        out.loss.backward()
        what = f"{backend} inversion-dpo {dtype} N={N}"
        _assert_logits(out.loss.cpu(), e.loss, plain.loss.cpu(), dtype, 2000.0,
                       float(e.model_mse.abs().max().detach()), what)
        if dtype == torch.float32:  # as for Diffusion-DPO: the logit's error through σ
            assert_close_fp32(p.grad.cpu(), p64.grad, what=what + " grad", rtol=FLOAT32_RTOL + 2000.0 * FLOAT32_RTOL
                              * float(e.model_mse.abs().max().detach()))
        else:
            assert_matches(p.grad.cpu(), p64.grad, dtype=dtype, plain=pp.grad.cpu(), what=what + " grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,shape", SHAPES)
def test_ddim_inversion_step_every_backend(B, shape, dtype):
    from fastinpo.ops.schedule import SD_SCHEDULER_CONFIG, NoiseSchedule

    sch = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    n = 2 * B
    g = torch.Generator().manual_seed(B)
    x = torch.randn(n, *shape, generator=g).to(dtype)
    eps = torch.randn(n, *shape, generator=g).to(dtype)
    levels = torch.randint(0, 900, (n,), generator=g)
    levels[0] = -99  # the extra start level below 0 (ᾱ_init)
    a_from = sch.alphas_at(levels)
    a_to = sch.alphas_at(levels + 100)
    e = reference.ddim_inversion_step(x.double(), eps.double(), a_from.double(), a_to.double())
    dev = [t.to(DEVICE) for t in (x, eps, a_from, a_to)]
    plain = fastinpo.ddim_inversion_step(*dev, backend="reference").cpu()
    for backend in backends("ddim_inversion_step"):
        _assert_backend_runs("ddim_inversion_step", backend, dev)
        out = fastinpo.ddim_inversion_step(*dev, backend=backend)
        assert out.dtype == dtype and out.device.type == DEVICE
        assert_matches(out.cpu(), e, dtype=dtype, plain=plain, what=f"{backend} ddim step {dtype} B={B} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,shape", [(1, SD35), (4, SD35), (3, (3, 37, 53))])
def test_flow_euler_step_every_backend(B, shape, dtype):
    """x + Δσ v with per-sample Δσ (InPO-for-flows level gaps, clipped and negative steps) by SPEC §6's rule: the
    error against float64 at most twice plain PyTorch's in the same dtype plus FLOOR_ULPS float32 ulps of the
    terms |x| + |Δσ v| (x + Δσ v may cancel, where a relative-to-the-result rule would not be fair)."""
    from fastinpo.ops.flow import FlowSchedule, flow_inpo_levels

    n = 2 * B
    g = torch.Generator().manual_seed(B + 50)
    x = torch.randn(n, *shape, generator=g).to(dtype)
    v = (1.5 * torch.randn(n, *shape, generator=g)).to(dtype)
    gaps = flow_inpo_levels(FlowSchedule.sd3(), 10).sigmas.diff()
    pool = torch.cat([gaps, -gaps, 0.37 * gaps])
    d = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    e = reference.flow_euler_step(x.double(), v.double(), d.double())
    dev = [t.to(DEVICE) for t in (x, v, d)]
    plain = fastinpo.flow_euler_step(*dev, backend="reference").cpu()
    terms = x.double().abs() + d.double().abs().view(-1, *([1] * len(shape))) * v.double().abs()
    floor = ulp_floor(terms.max(), dtype)
    for backend in backends("flow_euler_step"):
        _assert_backend_runs("flow_euler_step", backend, dev)
        out = fastinpo.flow_euler_step(*dev, backend=backend)
        assert out.dtype == dtype and out.device.type == DEVICE
        assert_spec_rule(out.cpu(), e, plain, floor=floor, what=f"{backend} Euler step {dtype} B={B} {shape}")


@pytest.mark.skipif(not CUDA, reason="a second CUDA stream needs CUDA")
def test_backends_on_a_side_stream():
    """The fast paths launch on the current stream: results on a side stream equal the default stream's."""
    model, ref, target = [t.cuda() for t in _preds(2, SDXL, torch.bfloat16, seed=9)]
    for backend in backends("diffusion_dpo_loss"):
        want = fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0, backend=backend).loss
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            got = fastinpo.diffusion_dpo_loss(model, ref, target, 5000.0, backend=backend).loss
        torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(got, want), backend
