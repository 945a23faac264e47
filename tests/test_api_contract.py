"""The public API's contract: bad input gets a clear ValueError/TypeError, the one dispatcher's precedence,
and importing fastinpo needs no GPU, Triton or extension."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch
from tests.conftest import randn

X = torch.randn(4, 3, 5, 5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fastinpo.diffusion_dpo_loss(X[:3], X[:3], X[:3], 1.0), ValueError, "even, non-zero size 2B"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X[:2], X, 1.0), ValueError, "shapes must match exactly"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X[..., :1], X, 1.0), ValueError, "no broadcasting"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X.long(), X, 1.0), TypeError, "ref_pred must have a floating dtype"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X, X.numpy(), 1.0), TypeError, "target must be a torch.Tensor"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X, X, 0.0), ValueError, "beta must be a finite float > 0"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X, X, -5), ValueError, "beta"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X, X, float("nan")), ValueError, "beta"),
        (lambda: fastinpo.diffusion_dpo_loss(X, X, X, "5000"), TypeError, "beta"),
        (lambda: fastinpo.diffusion_dpo_loss(X[:, 0, 0, 0], X[:, 0, 0, 0], X[:, 0, 0, 0], 1.0), ValueError,
         "at least one dimension after the batch"),
        (lambda: fastinpo.diffusion_dpo_loss(X[:0], X[:0], X[:0], 1.0), ValueError, "even, non-zero"),
        (lambda: fastinpo.inversion_dpo_loss(X[None], X[None], torch.ones(2), 1.0), ValueError,
         r"weights must have shape \(1,\)"),
        (lambda: fastinpo.inversion_dpo_loss(X[None], X[None], torch.ones(1, dtype=torch.long), 1.0), TypeError,
         "weights must have a floating dtype"),
        (lambda: fastinpo.inversion_dpo_loss(X[None, :3], X[None, :3], torch.ones(1), 1.0), ValueError, "2B"),
        (lambda: fastinpo.inversion_dpo_loss(X[None], X[None], torch.ones(1), 1.0, flip_sign=1), TypeError,
         "flip_sign"),
        (lambda: fastinpo.sft_loss(X, X[:2]), ValueError, "shapes must match"),
        (lambda: fastinpo.inpo_target(X, X, torch.full((4,), 1.0)), ValueError, r"alpha_t must lie in \(0, 1\)"),
        (lambda: fastinpo.inpo_target(X, X, torch.full((3,), 0.5)), ValueError, r"alpha_t must have shape \(4,\)"),
        (lambda: fastinpo.ddim_inversion_step(X, X, torch.full((4,), 0.5), torch.full((4,), 1.5)), ValueError,
         r"alpha_to must lie in \(0, 1\]"),
        (lambda: fastinpo.ddim_inversion_step(X, X, torch.zeros(4), torch.full((4,), 0.5)), ValueError,
         "alpha_from must lie"),
        (lambda: fastinpo.ddim_inversion_step(X, X, torch.full((4, 1), 0.5), torch.full((4,), 0.5)), ValueError,
         "one value per sample"),
        (lambda: fastinpo.ddim_inversion_step(X, X.half(), torch.full((4,), 0.5), torch.full((4,), 0.5),
                                              backend="cuda"), ValueError, "unknown backend 'cuda'"),
    ],
)
def test_bad_input_is_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_alpha_of_one_is_allowed_in_the_step():
    a = torch.full((4,), 1.0)  # set_alpha_to_one: ᾱ_init = 1 is a legal source level
    out = fastinpo.ddim_inversion_step(X, X, a, torch.full((4,), 0.5))
    assert torch.isfinite(out).all()


def test_dispatch_precedence(monkeypatch):
    tensors = (X,)
    assert dispatch.resolve("diffusion_dpo_loss", None, tensors)[0] == "reference"  # automatic on CPU
    monkeypatch.setenv("FASTINPO_BACKEND", "reference")
    assert dispatch.resolve("diffusion_dpo_loss", None, tensors)[0] == "reference"
    monkeypatch.setenv("FASTINPO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTINPO_BACKEND"):
        dispatch.resolve("diffusion_dpo_loss", None, tensors)
    # the explicit argument wins over the environment
    assert dispatch.resolve("diffusion_dpo_loss", "reference", tensors)[0] == "reference"
    monkeypatch.setenv("FASTINPO_BACKEND", "auto")
    assert dispatch.resolve("diffusion_dpo_loss", None, tensors)[0] == "reference"


def test_named_backend_that_cannot_run_raises(monkeypatch):
    calls = []
    dispatch.register("test_only_op", "reference", lambda *a: calls.append("reference"))
    dispatch.register("test_only_op", "ext", lambda *a: calls.append("ext"), lambda ts: "not built in this test")
    try:
        with pytest.raises(ValueError, match="backend 'ext' cannot run test_only_op here: not built in this test"):
            dispatch.resolve("test_only_op", "ext", (X,))
        monkeypatch.setenv("FASTINPO_BACKEND", "ext")
        with pytest.raises(ValueError, match="cannot run"):  # a named request never falls back silently
            dispatch.resolve("test_only_op", None, (X,))
        with pytest.raises(ValueError, match="not implemented for test_only_op"):
            dispatch.resolve("test_only_op", "triton", (X,))
        monkeypatch.delenv("FASTINPO_BACKEND")
        assert dispatch.resolve("test_only_op", None, (X,))[0] == "reference"  # automatic skips what can't run
    finally:
        dispatch._REGISTRY.pop("test_only_op")


def test_import_needs_no_triton_no_extension_no_gpu():
    code = (
        "import sys, fastinpo, torch\n"
        "assert 'triton' not in sys.modules, 'importing fastinpo imported triton'\n"
        "assert 'fastinpo._C' not in sys.modules\n"
        "x = torch.randn(2, 3, 4)\n"
        "fastinpo.diffusion_dpo_loss(x, x, x, 1.0)\n"
        "print('ok')\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_api_is_exported():
    for name in fastinpo.__all__:
        assert hasattr(fastinpo, name), name
    out = fastinpo.diffusion_dpo_loss(*(randn(2, 3, generator=torch.Generator().manual_seed(0)) for _ in range(3)),
                                      beta=1.0)
    assert isinstance(out, fastinpo.DPOLossOutput) and out._fields == (
        "loss", "logits", "model_mse", "ref_mse", "implicit_acc")
