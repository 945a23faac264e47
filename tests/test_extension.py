"""The compiled extension fastinpo._C (issue 4): parity with fastinpo.ops.reference, validation, dispatch, the
batched InPO inversion on the "ext" backend, torch.compile tracing, and an nvcc compile check of csrc/*.cu.

Every number is compared with tests/tolerances.py: float32 against a float64 reference; fp16/bf16 against
float64 with the error of a plain PyTorch computation in that dtype as the yardstick.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fastinpo
from fastinpo.ops import dispatch, extension, reference
from fastinpo.ops.schedule import NoiseSchedule, inpo_noise_sigma
from tests.conftest import randn
from tests.tolerances import assert_close_fp32, assert_matches

ROOT = Path(__file__).resolve().parents[1]
# The set-up builds the extension unless told not to (FASTINPO_BUILD_EXT=0); only that choice skips its tests. An
# extension that is missing or does not load otherwise fails (test_the_extension_is_built_and_loads), and the
# parity tests then fail too, instead of being skipped as "not built".
OPTED_OUT = os.environ.get("FASTINPO_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off")
NOT_BUILT = "fastinpo._C was not built: FASTINPO_BUILD_EXT=0 opts out of the extension"
needs_ext = pytest.mark.skipif(OPTED_OUT and extension.load() is None, reason=NOT_BUILT)


@pytest.mark.skipif(OPTED_OUT, reason=NOT_BUILT)
def test_the_extension_is_built_and_loads():
    assert extension.load() is not None, extension.load_error()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(6, 4, 13, 17), (1, 4, 8, 8), (2, 3), (4, 4, 128, 128)]


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.stable_diffusion()


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Register "ext" for this module, and put the dispatcher back as it was afterwards: until fastinpo.ops.dispatch
    registers the extension itself, other test modules in the same session must see the dispatcher they expect."""
    impls = dispatch.implementations("ddim_inversion_step")
    before, was_registered = impls.get("ext"), extension._registered
    extension.register()
    yield
    if before is None:
        impls.pop("ext", None)
    else:
        impls["ext"] = before
    extension._registered = was_registered


def ops():
    return torch.ops.fastinpo


# ----------------------------------------------------------------------------------------------- expectations
def expected64(x, eps, a_from, a_to, *, cfg=None, noise=None, noise_scale=None, active=None):
    """The reference in float64 (reference.cfg_combine + reference.ddim_inversion_step + the noise term)."""
    x64 = x.double()
    if cfg is not None:
        n = x.shape[0]
        e64 = reference.cfg_combine(eps[:n].double(), eps[n:].double(), cfg)
    else:
        e64 = eps.double()
    out = reference.ddim_inversion_step(x64, e64, a_from.double(), a_to.double())
    if noise is not None:
        out = out + noise_scale.double().view(-1, *([1] * (x.dim() - 1))) * noise.double()
    if active is not None:
        out = torch.where(active.view(-1, *([1] * (x.dim() - 1))), out, x64)
    return out


def plain(x, eps, a_from, a_to, *, cfg=None, noise=None, noise_scale=None, active=None):
    """The same formula in plain PyTorch, every intermediate in x's dtype (the low-precision yardstick)."""
    dt = x.dtype
    shape = (-1, *([1] * (x.dim() - 1)))
    af, at = a_from.to(dt).view(shape), a_to.to(dt).view(shape)
    if cfg is not None:
        n = x.shape[0]
        e = eps[:n] + cfg * (eps[n:] - eps[:n])
    else:
        e = eps
    out = at**0.5 * ((x - (1 - af) ** 0.5 * e) / af**0.5) + (1 - at) ** 0.5 * e
    if noise is not None:
        out = out + noise_scale.to(dt).view(shape) * noise
    if active is not None:
        out = torch.where(active.view(shape), out, x)
    return out


def check(actual, x, eps, a_from, a_to, what, **kw):
    assert actual.dtype == x.dtype and actual.shape == x.shape, what
    assert_matches(actual, expected64(x, eps, a_from, a_to, **kw), dtype=x.dtype,
                   plain=plain(x, eps, a_from, a_to, **kw), what=what)


def levels(n, gen, T=1000):
    """Per-sample (t_from, t_to) on the InPO grid: sources include the negative first level -99."""
    src = torch.randint(0, 10, (n,), generator=gen) * 100 - 99
    return src, src + 100


# ----------------------------------------------------------------------------------------------- parity
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_table_op_matches_reference(dtype, shape, sched, gen):
    n = shape[0]
    x = randn(*shape, generator=gen, dtype=dtype)
    eps = randn(*shape, generator=gen, dtype=dtype)
    t_from, t_to = levels(n, gen)
    t_from[0] = -99  # a negative source level reads alpha_init
    out = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init)
    check(out, x, eps, sched.alphas_at(t_from), sched.alphas_at(t_to), f"table {dtype} {shape}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ext_backend_matches_reference(dtype, shape, gen):
    n = shape[0]
    x = randn(*shape, generator=gen, dtype=dtype)
    eps = randn(*shape, generator=gen, dtype=dtype)
    a_from = torch.rand(n, generator=gen) * 0.5 + 0.5
    a_to = a_from * (torch.rand(n, generator=gen) * 0.9 + 0.05)
    out = fastinpo.ddim_inversion_step(x, eps, a_from, a_to, backend="ext")
    check(out, x, eps, a_from, a_to, f"ext backend {dtype} {shape}")


@needs_ext
def test_alpha_init_one_and_arbitrary_levels(gen):
    """set_alpha_to_one (alpha_init = 1: sqrt(1 - a_from) = 0) and arbitrary forward level pairs."""
    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                       "beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": True})
    assert sched.alpha_init == 1.0
    n = 7
    x, eps = randn(n, 3, 5, generator=gen), randn(n, 3, 5, generator=gen)
    t_from = torch.tensor([-1, -99, 0, 5, 400, 998, -5])
    t_to = torch.tensor([1, 0, 999, 6, 401, 999, 500])
    out = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init)
    check(out, x, eps, sched.alphas_at(t_from), sched.alphas_at(t_to), "alpha_init = 1")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_active_mask(dtype, sched, gen):
    n = 6
    x = randn(n, 4, 13, 17, generator=gen, dtype=dtype)
    eps = randn(n, 4, 13, 17, generator=gen, dtype=dtype)
    t_from, t_to = levels(n, gen)
    active = torch.tensor([True, False, True, True, False, True])
    t_from[1], t_to[4] = 5000, -7  # inactive samples' levels are never read (nor validated)
    out = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init, active)
    assert torch.equal(out[~active], x[~active]), "inactive samples must be copied through bit-exactly"
    af, at = sched.alphas_at(t_from.clamp(max=999)), sched.alphas_at(t_to.clamp(min=0))
    check(out, x, eps, af, at, f"active mask {dtype}", active=active)
    none_active = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init,
                                            torch.zeros(n, dtype=torch.bool))
    assert torch.equal(none_active, x)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_noise", [False, True], ids=["no-noise", "noise"])
@pytest.mark.parametrize("cfg", [None, 1.0, 7.5], ids=["no-cfg", "cfg1", "cfg7.5"])
def test_noise_and_cfg(dtype, use_noise, cfg, sched, gen):
    n = 6
    x = randn(n, 4, 13, 17, generator=gen, dtype=dtype)
    eps = randn(2 * n if cfg is not None else n, 4, 13, 17, generator=gen, dtype=dtype)
    t_from, t_to = levels(n, gen)
    af, at = sched.alphas_at(t_from), sched.alphas_at(t_to)
    kw = {}
    if use_noise:
        kw["noise"] = randn(n, 4, 13, 17, generator=gen, dtype=dtype)
        kw["noise_scale"] = 0.1 * inpo_noise_sigma(af, at)  # eta * sigma, as inpo_invert uses it
    active = torch.tensor([True, True, False, True, True, False])
    out = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init, active,
                                    kw.get("noise"), kw.get("noise_scale"), cfg)
    check(out, x, eps, af, at, f"noise={use_noise} cfg={cfg} {dtype}", cfg=cfg, active=active, **kw)
    out_alphas = ops().ddim_inversion_step_alphas(x, eps, af, at, active, kw.get("noise"), kw.get("noise_scale"), cfg)
    assert torch.equal(out, out_alphas), "the table and the per-sample-alpha variants must agree exactly"


@needs_ext
def test_batched_wrapper(sched, gen):
    n = 4
    x, eps = randn(n, 4, 9, 7, generator=gen), randn(2 * n, 4, 9, 7, generator=gen)
    noise = randn(n, 4, 9, 7, generator=gen)
    t_from, t_to = levels(n, gen)
    scale = torch.rand(n, generator=gen)
    out = extension.ddim_inversion_step_batched(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init,
                                                noise=noise, noise_scale=scale, cfg_scale=2.0)
    check(out, x, eps, sched.alphas_at(t_from), sched.alphas_at(t_to), "batched wrapper", cfg=2.0, noise=noise,
          noise_scale=scale)


@needs_ext
def test_non_contiguous_inputs_are_handled(sched, gen):
    """Non-contiguous x / eps / noise (strided and transposed views) give the contiguous result exactly."""
    n = 6
    big_x = randn(n, 4, 13, 34, generator=gen)
    x = big_x[..., ::2]
    eps = randn(n, 4, 17, 13, generator=gen).transpose(2, 3)
    noise = randn(2 * n, 4, 13, 17, generator=gen)[::2]
    t_from, t_to = levels(n, gen)
    scale = torch.rand(2 * n, generator=gen)[::2]
    active = torch.tensor([True, False] * 6)[::2]
    assert not (x.is_contiguous() or eps.is_contiguous() or noise.is_contiguous() or scale.is_contiguous())
    args = (sched.alphas_cumprod, t_from, t_to, sched.alpha_init)
    out = ops().ddim_inversion_step(x, eps, *args, active, noise, scale)
    ref = ops().ddim_inversion_step(x.contiguous(), eps.contiguous(), *args, active.contiguous(),
                                    noise.contiguous(), scale.contiguous())
    assert out.is_contiguous() and torch.equal(out, ref)
    check(out, x, eps, sched.alphas_at(t_from), sched.alphas_at(t_to), "non-contiguous", noise=noise,
          noise_scale=scale, active=active)


@needs_ext
def test_batch_independence(sched, gen):
    """Each sample's result depends only on that sample (no cross-sample mixing in the split)."""
    n = 5
    x, eps = randn(n, 3, 11, 13, generator=gen), randn(n, 3, 11, 13, generator=gen)
    t_from, t_to = levels(n, gen)
    whole = ops().ddim_inversion_step(x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init)
    for i in range(n):
        one = ops().ddim_inversion_step(x[i:i + 1], eps[i:i + 1], sched.alphas_cumprod, t_from[i:i + 1],
                                        t_to[i:i + 1], sched.alpha_init)
        assert torch.equal(one[0], whole[i])


@needs_ext
def test_multithreaded_split_matches_single_thread(sched, gen):
    """Pieces of at::parallel_for that straddle sample boundaries give the same bits as one thread."""
    n = 3
    x, eps = randn(n, 5, 7919, generator=gen), randn(n, 5, 7919, generator=gen)  # rows not a multiple of anything
    t_from, t_to = levels(n, gen)
    args = (x, eps, sched.alphas_cumprod, t_from, t_to, sched.alpha_init)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops().ddim_inversion_step(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops().ddim_inversion_step(*args), single)


@needs_ext
def test_mixed_dtypes_through_ext_backend(gen):
    """x fp16 with eps fp32 (the reference promotes): read both as float32, return x's dtype."""
    x = randn(4, 3, 8, 8, generator=gen, dtype=torch.float16)
    eps = randn(4, 3, 8, 8, generator=gen)
    a_from, a_to = torch.tensor([0.99, 0.9, 0.5, 0.3]), torch.tensor([0.9, 0.5, 0.3, 0.01])
    out = fastinpo.ddim_inversion_step(x, eps, a_from, a_to, backend="ext")
    ref = reference.ddim_inversion_step(x, eps, a_from, a_to)
    assert out.dtype == torch.float16
    assert_matches(out, expected64(x, eps, a_from, a_to), dtype=torch.float16, plain=ref, what="mixed dtypes")


@needs_ext
def test_empty_batch(sched):
    x = torch.randn(0, 4, 3)
    out = ops().ddim_inversion_step(x, x, sched.alphas_cumprod, torch.zeros(0, dtype=torch.long),
                                    torch.zeros(0, dtype=torch.long), sched.alpha_init)
    assert out.shape == (0, 4, 3)


# ----------------------------------------------------------------------------------------------- validation
def _good(sched, gen, n=3, dtype=torch.float32):
    x = randn(n, 4, 5, generator=gen, dtype=dtype)
    return dict(x=x, eps=randn(n, 4, 5, generator=gen, dtype=dtype), alphas_cumprod=sched.alphas_cumprod,
                t_from=torch.tensor([-99, 1, 101])[:n], t_to=torch.tensor([1, 101, 201])[:n],
                alpha_init=sched.alpha_init)


BAD_CASES = {
    "eps shape": (lambda k: k.update(eps=k["eps"][:, :3]), ValueError, "eps must have shape"),
    "eps rows": (lambda k: k.update(eps=k["eps"][:2]), ValueError, "eps must have shape"),
    "cfg without doubled eps": (lambda k: k.update(cfg_scale=2.0), ValueError, "first dim doubled"),
    "eps dtype": (lambda k: k.update(eps=k["eps"].half()), TypeError, "eps must have x's dtype"),
    "float64 x": (lambda k: k.update(x=k["x"].double(), eps=k["eps"].double()), TypeError,
                  "float32, float16 or bfloat16"),
    "int x": (lambda k: k.update(x=k["x"].long(), eps=k["eps"].long()), TypeError, "float32, float16 or bfloat16"),
    "0-d x": (lambda k: k.update(x=k["x"][0, 0, 0], eps=k["eps"][0, 0, 0]), ValueError, "batch dimension"),
    "table dtype": (lambda k: k.update(alphas_cumprod=k["alphas_cumprod"].double()), TypeError,
                    "alphas_cumprod must be float32"),
    "table shape": (lambda k: k.update(alphas_cumprod=k["alphas_cumprod"].view(10, 100)), ValueError,
                    "1-d table"),
    "t_from dtype": (lambda k: k.update(t_from=k["t_from"].int()), TypeError, "t_from must be Long"),
    "t_to shape": (lambda k: k.update(t_to=k["t_to"][:2]), ValueError, "t_to must have shape (3,)"),
    "t_to out of range": (lambda k: k["t_to"].__setitem__(1, 1000), ValueError, "t_to[1] = 1000 is out of range"),
    "t_to negative": (lambda k: k["t_to"].__setitem__(2, -1), ValueError, "t_to[2] = -1 is out of range"),
    "t_from out of range": (lambda k: k["t_from"].__setitem__(0, 1000), ValueError,
                            "t_from[0] = 1000 is out of range"),
    "alpha_init": (lambda k: k.update(alpha_init=0.0), ValueError, "alpha_init must lie in (0, 1]"),
    "active dtype": (lambda k: k.update(active=torch.ones(3)), TypeError, "active must be Bool"),
    "noise without scale": (lambda k: k.update(noise=k["x"].clone()), ValueError, "noise and noise_scale go together"),
    "noise shape": (lambda k: k.update(noise=k["x"][:, :2], noise_scale=torch.ones(3)), ValueError,
                    "noise must have x's shape"),
    "noise_scale dtype": (lambda k: k.update(noise=k["x"].clone(), noise_scale=torch.ones(3).double()), TypeError,
                          "noise_scale must be Float"),
    "device": (lambda k: k.update(alphas_cumprod=k["alphas_cumprod"].to("meta")), ValueError,
               "alphas_cumprod must be on cpu like x"),
}


@needs_ext
@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_validation_messages(case, sched, gen):
    mutate, exc, message = BAD_CASES[case]
    kw = _good(sched, gen)
    mutate(kw)
    with pytest.raises(exc, match=None) as info:
        ops().ddim_inversion_step(**kw)
    assert message in str(info.value), str(info.value)
    assert "fastinpo::ddim_inversion_step" in str(info.value)


@needs_ext
def test_alpha_variant_validation(gen):
    x = randn(2, 3, generator=gen)
    with pytest.raises(ValueError, match=r"alpha_from\[1\] = 0 must lie in \(0, 1\]"):
        ops().ddim_inversion_step_alphas(x, x, torch.tensor([0.5, 0.0]), torch.tensor([0.4, 0.3]))
    with pytest.raises(ValueError, match=r"alpha_to must have shape \(2,\)"):
        ops().ddim_inversion_step_alphas(x, x, torch.tensor([0.5, 0.4]), torch.tensor([0.4]))
    # an inactive sample's alphas are not read
    out = ops().ddim_inversion_step_alphas(x, x, torch.tensor([0.5, 0.0]), torch.tensor([0.4, 7.0]),
                                           torch.tensor([True, False]))
    assert torch.equal(out[1], x[1])


@needs_ext
def test_dispatch_ext(gen):
    x = randn(2, 3, generator=gen)
    a = torch.tensor([0.9, 0.8])
    assert dispatch.resolve("ddim_inversion_step", "ext", (x, x, a, a))[0] == "ext"
    assert extension.available_reason([x, a]) is None
    reason = extension.available_reason([x.double()])
    assert "float64" in reason
    with pytest.raises(ValueError, match="backend 'ext' cannot run ddim_inversion_step here: dtype torch.float64"):
        fastinpo.ddim_inversion_step(x.double(), x.double(), a.double(), a.double(), backend="ext")
    # the automatic choice on CPU float64 still finds the reference
    assert dispatch.resolve("ddim_inversion_step", None, (x.double(),))[0] == "reference"
    assert "several devices" in extension.available_reason([x, torch.empty(1, device="meta")])
    assert "extension runs on CPU" in extension.available_reason([torch.empty(1, device="meta")])
    extension.register()  # idempotent
    assert "ext" in dispatch.registered()["ddim_inversion_step"]


def test_import_fastinpo_does_not_load_extension():
    code = "import fastinpo, sys; assert 'fastinpo._C' not in sys.modules, 'fastinpo._C imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@needs_ext
def test_env_reports_extension():
    from fastinpo import env

    status = {b.name: b for b in env.backend_status()}
    assert status["ext-cpu"].available
    assert status["ext-cuda"].available == (extension.built_with_cuda() and torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------- torch.compile
@needs_ext
def test_opcheck(sched, gen):
    n = 3
    x, eps = randn(n, 4, 5, generator=gen), randn(2 * n, 4, 5, generator=gen)
    noise = randn(n, 4, 5, generator=gen)
    args = (x, eps, sched.alphas_cumprod, torch.tensor([-99, 1, 101]), torch.tensor([1, 101, 201]),
            sched.alpha_init, torch.tensor([True, False, True]), noise, torch.rand(n, generator=gen), 3.0)
    torch.library.opcheck(torch.ops.fastinpo.ddim_inversion_step.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    alpha_args = (x, eps[:n], torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.8, 0.7, 0.6]))
    torch.library.opcheck(torch.ops.fastinpo.ddim_inversion_step_alphas.default, alpha_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_ext
def test_torch_compile_traces_the_op(sched, gen):
    def step(x, eps, t_from, t_to):
        return torch.ops.fastinpo.ddim_inversion_step(x * 1.0, eps, sched.alphas_cumprod, t_from, t_to,
                                                      sched.alpha_init) + 0.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, eps = randn(4, 3, 8, generator=gen), randn(4, 3, 8, generator=gen)
    t_from, t_to = levels(4, gen)
    assert torch.equal(compiled(x, eps, t_from, t_to), step(x, eps, t_from, t_to))


# ----------------------------------------------------------------------------------------------- inversion
def stand_in_model(calls):
    def model(x, t, cond):
        calls.append(x.shape[0])
        return torch.tanh(0.7 * x + 1e-3 * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                          + cond.to(x.dtype).view(-1, *([1] * (x.dim() - 1))))

    return model


@needs_ext
@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_inpo_invert_ext_equals_reference(eta, sched):
    B = 5
    g = torch.Generator().manual_seed(7)
    z0 = randn(2 * B, 4, 13, 17, generator=g)
    t = torch.tensor([450, 0, 999, 1, 123])
    cond = torch.rand(2 * B, generator=g)

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(2 * B)]

    results, calls = {}, {}
    for backend in ("reference", "ext"):
        calls[backend] = []
        results[backend] = fastinpo.inpo_invert(stand_in_model(calls[backend]), z0, t, cond, sched, eta=eta,
                                                generator=gens() if eta > 0 else None, backend=backend)
    ref, ext = results["reference"], results["ext"]
    assert_close_fp32(ext.latents, ref.latents, what=f"inpo_invert ext vs reference (eta={eta})")
    assert torch.equal(ext.num_steps, ref.num_steps) and torch.equal(ext.end_levels, ref.end_levels)
    # no waste: each call sees exactly the active samples, and they sum to 2 * sum(steps per pair)
    assert ext.samples_per_call == calls["ext"] == ref.samples_per_call
    num_steps = ext.num_steps.tolist()
    assert sum(ext.samples_per_call) == 2 * sum(num_steps)
    assert ext.samples_per_call == [2 * sum(1 for s in num_steps if s > k) for k in range(max(num_steps))]
    if eta == 0.0:  # deterministic: also against the float64 truth
        truth = fastinpo.inpo_invert(stand_in_model([]), z0.double(), t, cond, sched, backend="reference")
        assert_close_fp32(ext.latents, truth.latents, what="inpo_invert ext vs float64")


# ----------------------------------------------------------------------------------------------- CUDA sources
def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = os.path.join(cand, "bin", "nvcc") if cand else ""
        if path and os.path.exists(path):
            return path
    return None


CU_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not on PATH (nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
@pytest.mark.parametrize("source", CU_SOURCES, ids=[os.path.basename(s) for s in CU_SOURCES])
def test_nvcc_compiles_cuda_sources(source, tmp_path):
    """Every csrc/*.cu compiles for sm_80 and sm_90 (no link: a CPU torch has no CUDA libraries), warning-free."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-Wall", *includes, source,
           "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), proc.stderr


def _cuda_include() -> str | None:
    """The CUDA toolkit's include dir: next to nvcc, or under $CUDA_HOME / /usr/local/cuda (nvcc may be a wrapper
    script elsewhere on PATH)."""
    nvcc = _nvcc()
    candidates = [Path(nvcc).resolve().parents[1] / "include"] if nvcc else []
    candidates += [Path(p) / "include" for p in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if p]
    for inc in candidates:
        if (inc / "cuda_runtime_api.h").exists():
            return str(inc)
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers (cuda_runtime_api.h) found")
def test_ops_cpp_cuda_branch_compiles(tmp_path):
    """The FASTINPO_WITH_CUDA branch of csrc/ops.cpp (stream, device guard) compiles against torch's headers.

    A CPU torch wheel lacks one cmake-generated header of c10/cuda; a stand-in (the define a CUDA build has)
    goes in a temporary include dir. Syntax only: nothing to link against here.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{_cuda_include()}", f"-I{tmp_path}",
                                                      f"-I{sysconfig.get_paths()['include']}"]
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", "-DFASTINPO_WITH_CUDA", *includes, str(ROOT / "csrc" / "ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 4, 16])
def test_cuda_parity_sdxl(dtype, B, sched):
    if not extension.built_with_cuda():
        pytest.fail("a CUDA device is present but fastinpo._C was built without CUDA: rebuild on this machine")
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(B)
    n = 2 * B
    x = torch.randn(n, 4, 128, 128, generator=g, device=dev, dtype=torch.float64).to(dtype)
    eps = torch.randn(2 * n, 4, 128, 128, generator=g, device=dev, dtype=torch.float64).to(dtype)
    noise = torch.randn(n, 4, 128, 128, generator=g, device=dev, dtype=torch.float64).to(dtype)
    t_from = torch.randint(0, 10, (n,), device=dev, generator=g) * 100 - 99
    t_to = t_from + 100
    table = sched.table(dev)
    af, at = sched.alphas_at(t_from), sched.alphas_at(t_to)
    active = torch.arange(n, device=dev) % 3 != 1
    scale = 0.1 * inpo_noise_sigma(af, at)
    for cfg, nz, sc in ((None, None, None), (2.0, noise, scale)):
        e = eps if cfg is not None else eps[:n]
        out = ops().ddim_inversion_step(x, e, table, t_from, t_to, sched.alpha_init, active, nz, sc, cfg)
        check(out.cpu(), x.cpu(), e.cpu(), af.cpu(), at.cpu(), f"cuda {dtype} B={B} cfg={cfg}", cfg=cfg,
              noise=None if nz is None else nz.cpu(), noise_scale=None if sc is None else sc.cpu(),
              active=active.cpu())
    # the scalar path: rows that are not a multiple of the 16-byte vector width (3*13*17 elements) ...
    xo = torch.randn(n, 3, 13, 17, device=dev).to(dtype)
    eo = torch.randn(n, 3, 13, 17, device=dev).to(dtype)
    out = ops().ddim_inversion_step(xo, eo, table, t_from, t_to, sched.alpha_init)
    check(out.cpu(), xo.cpu(), eo.cpu(), af.cpu(), at.cpu(), f"cuda scalar path (odd rows) {dtype}")
    # ... and rows of a multiple of it behind a base pointer that is not 16-byte aligned
    flat = torch.randn(n * 4 * 64 + 1, device=dev).to(dtype)
    xm = flat[1:].view(n, 4, 8, 8)
    assert xm.data_ptr() % 16 != 0
    out = ops().ddim_inversion_step(xm, eo.flatten(1)[:, :256].reshape(n, 4, 8, 8).contiguous(), table, t_from,
                                    t_to, sched.alpha_init)
    em = eo.flatten(1)[:, :256].reshape(n, 4, 8, 8)
    check(out.cpu(), xm.cpu(), em.cpu(), af.cpu(), at.cpu(), f"cuda scalar path (misaligned) {dtype}")
    # the CUDA op equals the CPU op
    cpu = ops().ddim_inversion_step(x.cpu(), eps[:n].cpu(), sched.alphas_cumprod, t_from.cpu(), t_to.cpu(),
                                    sched.alpha_init)
    gpu = ops().ddim_inversion_step(x, eps[:n], table, t_from, t_to, sched.alpha_init)
    assert_matches(gpu.cpu(), expected64(x.cpu(), eps[:n].cpu(), af.cpu(), at.cpu()), dtype=dtype, plain=cpu,
                   what="cuda vs cpu")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_cuda_inpo_invert_sdxl(eta, sched):
    if not extension.built_with_cuda():
        pytest.fail("a CUDA device is present but fastinpo._C was built without CUDA: rebuild on this machine")
    dev = "cuda"
    B = 4
    g = torch.Generator(device=dev).manual_seed(3)
    z0 = torch.randn(2 * B, 4, 128, 128, generator=g, device=dev)
    t = torch.tensor([450, 0, 999, 123], device=dev)
    cond = torch.rand(2 * B, generator=g, device=dev)

    def gens():
        return [torch.Generator(device=dev).manual_seed(100 + i) for i in range(2 * B)]

    out = {b: fastinpo.inpo_invert(stand_in_model([]), z0, t, cond, sched, eta=eta,
                                   generator=gens() if eta > 0 else None, backend=b) for b in ("reference", "ext")}
    assert_close_fp32(out["ext"].latents, out["reference"].latents, what=f"cuda inpo_invert eta={eta}")
