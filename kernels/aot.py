"""Ahead-of-time compile of the Triton kernels exactly as the launchers launch them, for CUDA targets, without a GPU.

``python -m fastinpo.kernels.aot --arch 80 --arch 90`` runs every public launcher (the fused DPO, InPO and
Inversion-DPO losses forward and backward, the memory-light Inversion-DPO passes, the fused DDIM step in each
option set, the flow Euler step) on host tensors of the sizes training uses — SDXL latents ``4×128×128`` at 1, 4,
16 and 64 pairs, fp32/fp16/bf16 — plus an odd shape and a misaligned view, with the kernel launch intercepted.
Each intercepted launch goes through **Triton's own binder** (the one its JIT runs: the same signature, i32/i64
choice of every integer, ``== 1`` constants, and 16-byte divisibility attributes of every pointer and integer), and
the distinct variants are compiled with ``triton.compile`` for every requested ``sm_XX``: what the GPU will JIT,
not a hand-written approximation (GPU review item 3). The launchers' one device-dependent choice, the reduction's
``TILES`` (``dpo_loss.reduction_config``), is made as on CUDA.

Each compiled variant is then read back from its cubin with the ``cuobjdump`` Triton ships: registers, stack and
local memory. A variant that spills (stack or local memory beyond the local arrays its PTX declares) fails, and so
does a streaming kernel whose inputs are aligned but whose PTX has no 128-bit global load (it would run scalar).
One line per variant, a summary, exit status non-zero on any failure. CI runs it (Triton 3.9: no spills). With the
GPU image's Triton 3.6 two variants spill: the InPO partial sums fp16 with float32 targets at TILES = 2 (8 B) and
the bf16 Inversion-DPO partial sums at TILES = 8 (32 B, as the GPU review predicted).

It must run with the real compiler, so ``TRITON_INTERPRET`` must not be set (it is refused if it is). It uses
Triton's JIT internals (``create_function_from_signature``, ``JITFunction._pack_args``), present in 3.6 and 3.9;
a Triton without them is refused with that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

SDXL = (4, 128, 128)
PAIRS = (1, 4, 16, 64)
DTYPES = ("float32", "float16", "bfloat16")
# kernels that stream the big tensors: with aligned inputs they must load 128 bits at a time
STREAMING = ("_sumsq_partials_kernel", "_dpo_grad_kernel", "_ddim_step_kernel", "_flow_euler_step_kernel")
_V4_LOAD = re.compile(r"ld\.global[^;\n]*\.v4\.")


@contextlib.contextmanager
def intercepted_launches():
    """Record ``(jit_function, args, kwargs)`` of every Triton launch instead of running it; the reduction's tile
    choice made as on CUDA. The launchers run on host tensors (their outputs stay uninitialised)."""
    import torch
    from triton.runtime.jit import JITFunction

    from fastinpo.kernels import dpo_loss

    launches = []
    run, config = JITFunction.run, dpo_loss.reduction_config

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    def config_as_on_cuda(rows, n, device, block=None, tiles=None):
        return config(rows, n, torch.device("cuda"), block, tiles)

    JITFunction.run, dpo_loss.reduction_config = record, config_as_on_cuda
    try:
        yield launches
    finally:
        JITFunction.run, dpo_loss.reduction_config = run, config


def _scenarios():
    """``(name, thunk)``: each thunk calls public launchers the way training does."""
    import torch

    from fastinpo.kernels import ddim_step, dpo_loss, flow_step, inversion_dpo

    def randn(shape, dtype, grad=False):
        return torch.randn(shape, dtype=getattr(torch, dtype)).requires_grad_(grad)

    def dpo(B, d, t_dtype, loss_type="sigmoid", shape=SDXL, view=False):
        def go():
            if view:  # a view one sample into a larger tensor: its data pointer is not 16-byte aligned
                m = randn((2 * B + 1, *shape), d)[1:].detach().requires_grad_(True)
            else:
                m = randn((2 * B, *shape), d, grad=True)
            out = dpo_loss.diffusion_dpo_loss(m, randn(m.shape, d), randn(m.shape, t_dtype), 5000.0, loss_type)
            out.loss.backward()
        return go

    def inpo(B, d, t_dtype):
        def go():
            m = randn((2 * B, *SDXL), d, grad=True)
            alpha = torch.rand(2 * B) * 0.9 + 0.05
            out = dpo_loss.inpo_dpo_loss(m, randn(m.shape, d), randn(m.shape, t_dtype), randn(m.shape, t_dtype),
                                         alpha, 5000.0)
            out.loss.backward()
        return go

    def inversion(B, N, d):
        def go():
            m = randn((N, 2 * B, *SDXL), d, grad=True)
            out = inversion_dpo.inversion_dpo_loss(m, randn(m.shape, d), torch.rand(N), 5000.0)
            out.loss.backward()
        return go

    def inversion_light(B, N, d):  # the memory-light two-pass gradient, one step
        def go():
            m, r = randn((2 * B, *SDXL), d), randn((2 * B, *SDXL), d)
            D = torch.zeros(2 * B)
            inversion_dpo.accumulate_step(D, m, r, 0.5, N)
            inversion_dpo.step_grad(torch.randn(2 * B), m, r, 0.5, N)
        return go

    def ddim(B, d, e_dtype, fused, gather=False, cfg=False, active=False, noise=False, in_place=False, shape=SDXL,
             sample_base=0):
        def go():
            n = 2 * B
            x = randn((n, *shape), d)
            if not fused:
                ddim_step.ddim_inversion_step(x, randn(x.shape, e_dtype), torch.rand(n), torch.rand(n))
                return
            eps = randn(((2 * n) if cfg else n, *shape), e_dtype)
            table = torch.linspace(0.999, 0.01, 1000)
            levels = torch.randint(0, 1000, (n,))
            ddim_step.ddim_inversion_step_fused(
                x, eps, table, levels if gather else torch.full((n,), -1), levels, 0.9991,
                cfg_scale=7.5 if cfg else None, active=torch.ones(n, dtype=torch.bool) if active else None,
                noise_seed=1234 if noise else None, noise_scale=torch.rand(n) if noise else None,
                noise_sample_base=sample_base, out=x if in_place else None)
        return go

    def flow(B, d, v_dtype, shape=SDXL):
        def go():
            x = randn((2 * B, *shape), d)
            flow_step.flow_euler_step(x, randn(x.shape, v_dtype), torch.rand(2 * B))
        return go

    out = []
    for d in DTYPES:
        targets = sorted({d, "float32"})
        for B in PAIRS:
            for t in targets:
                out.append((f"diffusion-dpo B={B} {d} target={t}", dpo(B, d, t)))
        for B in (1, 16):
            for t in targets:
                out.append((f"inpo B={B} {d} x_t/z0={t}", inpo(B, d, t)))
        for B, N in ((1, 80), (4, 20)):
            out.append((f"inversion-dpo B={B} N={N} {d}", inversion(B, N, d)))
        out.append((f"inversion-dpo memory-light B=1 N=80 {d}", inversion_light(1, 80, d)))
        for e in sorted({d, "float32"}):
            for B in (1, 16):
                out.append((f"ddim plain B={B} x={d} eps={e}", ddim(B, d, e, fused=False)))
                out.append((f"ddim fused all options B={B} x={d} eps={e}",
                            ddim(B, d, e, True, gather=True, cfg=True, active=True, noise=True)))
                out.append((f"ddim fused in place B={B} x={d} eps={e}",
                            ddim(B, d, e, True, gather=True, cfg=True, active=True, noise=True, in_place=True)))
                out.append((f"ddim fused gather+noise B={B} x={d} eps={e}",
                            ddim(B, d, e, True, gather=True, noise=True)))
            out.append((f"flow euler B=1 x={d} v={e}", flow(1, d, e)))
    for loss_type in ("hinge", "ipo"):
        out.append((f"diffusion-dpo {loss_type} B=1 float32", dpo(1, "float32", "float32", loss_type)))
    odd = (3, 37, 41)  # 4551 elements per sample: nothing divisible by 16
    out.append(("diffusion-dpo odd shape B=1 float32", dpo(1, "float32", "float32", shape=odd)))
    out.append(("diffusion-dpo misaligned view B=1 bfloat16", dpo(1, "bfloat16", "bfloat16", shape=odd, view=True)))
    out.append(("ddim fused odd shape B=1 float32", ddim(1, "float32", "float32", True, gather=True, noise=True,
                                                         shape=odd)))
    out.append(("flow euler odd shape B=1 float32", flow(1, "float32", "float32", shape=odd)))
    # a numbered slice (noise_sample_base > 0): the seed argument becomes 64-bit
    out.append(("ddim fused noise, rank 1 of a split batch, B=1 float32",
                ddim(1, "float32", "float32", True, gather=True, noise=True, sample_base=2)))
    return out


class Variant:
    """One distinct compile: a kernel with the signature, constants and attributes Triton's binder gave it."""

    def __init__(self, fn, signature, constexprs, attrs, options, scenario):
        self.fn, self.signature, self.constexprs, self.attrs, self.options = fn, signature, constexprs, attrs, options
        self.scenarios = [scenario]

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self):
        return (self.name, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())))

    def aligned_inputs(self) -> bool:
        """Every pointer, every row stride and the row length ``n`` carry the 16-divisibility attribute (a
        constant ``== 1`` is not aligned): what lets the compiler load 16 bytes at a time."""
        for i, p in enumerate(self.fn.params):
            ty = self.signature.get(p.name, "constexpr")
            if not (ty.startswith("*") or p.name == "n" or p.name.endswith("_stride")):
                continue
            if ty == "constexpr" or not any(a and a[0] == "tt.divisibility" for a in self.attrs.get((i,), [])):
                return False
        return True

    def label(self) -> str:
        params = [p.name for p in self.fn.params]
        ptrs = sorted({v[1:] for v in self.signature.values() if v.startswith("*")})
        consts = ",".join(f"{params[k[0]]}={v}" for k, v in sorted(self.constexprs.items()))
        ints = [name for name, ty in self.signature.items() if ty in ("i32", "i64")]
        wide = [name for name in ints if self.signature[name] == "i64"]
        return (f"{self.name}[{'/'.join(ptrs)}; {consts}; {'aligned' if self.aligned_inputs() else 'unaligned'}"
                f"{'; i64 ' + ','.join(wide) if wide else ''}]")


def collect_variants():
    """Run every scenario with launches intercepted; bind each launch as the JIT would; keep the distinct ones."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as err:
        raise RuntimeError(f"this Triton has no JIT binder to reuse ({err}); the AOT check needs Triton 3.6+") from err
    if not hasattr(JITFunction, "_pack_args"):
        raise RuntimeError("this Triton's JITFunction has no _pack_args; the AOT check needs Triton 3.6+")
    backend = make_backend(GPUTarget("cuda", 90, 32))  # binding does not depend on the arch
    binders: dict = {}
    variants: dict = {}
    torch.manual_seed(0)
    for scenario, thunk in _scenarios():
        with intercepted_launches() as launches:
            thunk()
        if not launches:
            raise RuntimeError(f"scenario {scenario!r} launched no kernel")
        for fn, args, kwargs in launches:
            kwargs = dict(kwargs)
            kwargs.setdefault("debug", False)
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binders[fn](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            v = Variant(fn, signature, constexprs, attrs, options, scenario)
            if v.key() in variants:
                variants[v.key()].scenarios.append(scenario)
            else:
                variants[v.key()] = v
    return list(variants.values())


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def resources(cubin: bytes, tool: str | None) -> dict | None:
    """``{"REG": .., "STACK": .., "LOCAL": ..}`` of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return found or None


def local_array_bytes(ptx: str) -> int:
    """Bytes of local arrays the PTX itself declares (``__local_depot``: e.g. libdevice's sin/cos argument reduction,
    which the in-kernel Box-Muller noise links and only takes for |x| > 1e5, never), rounded up to 16 as ptxas lays
    out the frame. Stack beyond them is ptxas spilling registers."""
    declared = sum(int(b) for b in re.findall(r"\.local[^\n]*__local_depot\d+\[(\d+)\]", ptx))
    return -(-declared // 16) * 16


def spill_bytes(res: dict, ptx: str) -> int:
    """Stack and local memory of the compiled kernel beyond the PTX's own local arrays: register spills."""
    return max(0, res.get("STACK", 0) + res.get("LOCAL", 0) - local_array_bytes(ptx))


def compile_variant(v: Variant, arch: int, attrs: dict | None = None):
    """``triton.compile`` of one variant for ``sm_<arch>`` as the JIT would compile it (``attrs``: override the
    binder's divisibility attributes, e.g. ``{}`` for the attribute-less compile the old check did)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(v.fn, v.signature, v.constexprs, v.attrs if attrs is None else attrs)
    return triton.compile(source, target=GPUTarget("cuda", int(arch), 32), options=v.options.__dict__)


def compile_all(archs, verbose: bool = True) -> tuple[int, int]:
    """Compile every variant for every arch and check its resources; returns (failures, distinct variants)."""
    variants = collect_variants()
    tool = _cuobjdump()
    if tool is None:
        print("note: no cuobjdump found: registers and spills are not checked", flush=True)
    print(f"{len(variants)} distinct kernel variants from the launchers", flush=True)
    failures = 0
    for arch in archs:
        for v in variants:
            t0 = time.perf_counter()
            problems = []
            res = None
            try:
                asm = compile_variant(v, arch).asm
                if not ("ptx" in asm and asm.get("cubin")):
                    problems.append("no ptx/cubin")
                else:
                    res = resources(asm["cubin"], tool)
                    spilled = spill_bytes(res, asm["ptx"]) if res else 0
                    if spilled:
                        problems.append(f"spills {spilled} B (stack {res.get('STACK', 0)} B, local "
                                        f"{res.get('LOCAL', 0)} B, arrays declared in the PTX "
                                        f"{local_array_bytes(asm['ptx'])} B)")
                    if v.name in STREAMING and v.aligned_inputs() and not _V4_LOAD.search(asm["ptx"]):
                        problems.append("aligned inputs but no 128-bit global load")
            except Exception as err:  # report and keep going: one line per kernel, all failures listed
                problems.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                if verbose:
                    traceback.print_exc()
            status = "ok" if not problems else "FAILED " + "; ".join(problems)
            failures += bool(problems)
            usage = f" regs {res.get('REG')} stack {res.get('STACK', 0)} B" if res else ""
            print(f"sm_{arch} {v.label()}: {status}{usage} ({time.perf_counter() - t0:.2f}s; "
                  f"{len(v.scenarios)} launch site(s), e.g. {v.scenarios[0]})", flush=True)
    return failures, len(variants)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastinpo.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", type=int, help="CUDA compute capability, e.g. 80, 90 (repeat)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; ahead-of-time compile needs the real compiler", file=sys.stderr)
        return 2
    archs = args.arch or [80, 90]
    failures, n_variants = compile_all(archs)
    total = n_variants * len(archs)
    print(f"{total - failures}/{total} kernel variants compiled for {', '.join(f'sm_{a}' for a in archs)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
