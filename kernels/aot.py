"""Ahead-of-time compile of every Triton kernel of fastinpo, for CUDA targets, without a GPU.

``python -m fastinpo.kernels.aot --arch 80 --arch 90`` compiles each kernel, in each dtype variant (fp32, fp16,
bf16 inputs, plus the mixed variants the trainers use) and each constexpr specialization the launchers use, to
PTX and cubin for every requested ``sm_XX``, prints one line per compile and exits non-zero if any fails. CI runs
it so that a kernel that would not compile on an A100 (sm_80) or H100 (sm_90) fails there, not on the cluster.

It must run with the real compiler, so ``TRITON_INTERPRET`` must not be set (it is refused if it is).
Only long-standing Triton APIs are used (``triton.compile``, ``ASTSource``, ``GPUTarget``): 3.6 and 3.9 both work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

_DT = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _signature(fn, pointers: dict, scalars: dict, constexprs: dict) -> dict:
    """Triton signature of ``fn``: each pointer's element type, each scalar's type, ``"constexpr"`` otherwise."""
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
            sig[name] = "constexpr"
        elif name in scalars:
            sig[name] = scalars[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {name}")
    return sig


def jobs():
    """``(label, fn, signature, constexprs)`` for every kernel variant the launchers can produce."""
    from fastinpo.kernels import ddim_step, dpo_loss, flow_step, inversion_dpo

    out = []
    # partial sums: policy/ref/target dtypes; InPO target inputs; Inversion-DPO (no ref)
    sums_scalars = {k: "i32" for k in ("n", "num_chunks")}
    sums_scalars.update({k: "i64" for k in ("a_stride", "b_stride", "t_stride", "z_stride", "slot_size")})
    for d in _DT:
        for tdt in sorted({d, "fp32"}):
            for has_b, inpo in ((True, False), (False, False), (True, True)):
                ce = {"BLOCK": 1024, "TILES": 4, "HAS_B": has_b, "INPO": inpo}
                ptr = {"a_ptr": d, "b_ptr": d, "t_ptr": tdt, "z_ptr": tdt, "alpha_ptr": "fp32", "part_ptr": "fp32"}
                label = f"sumsq_partials[a={d},t={tdt},has_ref={int(has_b)},inpo={int(inpo)}]"
                out.append((label, dpo_loss._sumsq_partials_kernel, ptr, sums_scalars, ce))
    epi_scalars = {"B": "i32", "n": "i32", "num_chunks": "i32", "slot": "i32", "k": "fp32"}
    for has_ref in (True, False):
        for loss_type in (0, 1, 2):  # sigmoid, hinge, ipo
            ce = {"BLOCK_B": 64, "BLOCK_C": 64, "HAS_REF": has_ref, "LOSS_TYPE": loss_type}
            out.append((f"dpo_epilogue[has_ref={int(has_ref)},loss_type={loss_type}]",
                        dpo_loss._dpo_epilogue_kernel, {}, epi_scalars, ce))
    out.append(("weighted_distance", dpo_loss._weighted_distance_kernel, {},
                {"R2": "i32", "n": "i32", "num_chunks": "i32", "num_steps": "i32"}, {"BLOCK_N": 16, "BLOCK_C": 64}))
    grad_scalars = {"B": "i32", "n": "i32", "num_steps": "i32", "k": "fp32"}
    grad_scalars.update({k: "i64" for k in ("a_stride", "t_stride", "z_stride")})
    for d in _DT:
        for tdt in sorted({d, "fp32"}):
            for inpo, has_w, coef in ((False, False, False), (True, False, False), (False, True, False),
                                      (False, True, True)):
                # the common backward: only the loss sends a gradient (logits / model_mse do not)
                ce = {"BLOCK": 1024, "INPO": inpo, "HAS_W": has_w, "COEF_GIVEN": coef, "LOSS_TYPE": 0,
                      "HAS_GLOSS": not coef, "HAS_GLOGITS": False, "HAS_GM": False}
                ptr = {"a_ptr": d, "t_ptr": tdt, "z_ptr": tdt, "grad_ptr": d}
                label = f"dpo_grad[a={d},t={tdt},inpo={int(inpo)},has_w={int(has_w)},coef={int(coef)}]"
                out.append((label, dpo_loss._dpo_grad_kernel, ptr, grad_scalars, ce))
    for loss_type, all_grads in ((1, False), (2, False), (0, True)):  # hinge, ipo; every output sending a gradient
        ce = {"BLOCK": 1024, "INPO": False, "HAS_W": False, "COEF_GIVEN": False, "LOSS_TYPE": loss_type,
              "HAS_GLOSS": True, "HAS_GLOGITS": all_grads, "HAS_GM": all_grads}
        label = f"dpo_grad[a=fp32,t=fp32,loss_type={loss_type},all_output_grads={int(all_grads)}]"
        out.append((label, dpo_loss._dpo_grad_kernel, {}, grad_scalars, ce))
    out.append(("accumulate_rows", inversion_dpo._accumulate_rows_kernel, {},
                {"n": "i32", "num_chunks": "i32", "num_steps": "i32"}, {"BLOCK_C": 64}))
    step_scalars = {"alpha_init": "fp32", "g": "fp32", "seed": "i64", "n_levels": "i32", "n": "i32", "n_rows": "i32",
                    "x_stride": "i64", "eps_stride": "i64", "out_stride": "i64"}
    for xd in _DT:
        for ed in sorted({xd, "fp32"}):
            for gather, cfg, act, noise, inplace in ((False, False, False, False, False),
                                                     (True, True, True, True, False),
                                                     (True, True, True, True, True),
                                                     (True, False, False, True, False)):
                ce = {"BLOCK": 1024, "GATHER": gather, "CFG": cfg, "HAS_ACTIVE": act, "HAS_NOISE": noise,
                      "IN_PLACE": inplace}
                ptr = {"x_ptr": xd, "eps_ptr": ed, "out_ptr": xd, "tfrom_ptr": "i64", "tto_ptr": "i64",
                       "active_ptr": "i8"}
                label = (f"ddim_step[x={xd},eps={ed},gather={int(gather)},cfg={int(cfg)},active={int(act)},"
                         f"noise={int(noise)},in_place={int(inplace)}]")
                out.append((label, ddim_step._ddim_step_kernel, ptr, step_scalars, ce))
    flow_scalars = {"n": "i32", "x_stride": "i64", "v_stride": "i64", "out_stride": "i64"}
    for xd in _DT:
        for vd in sorted({xd, "fp32"}):  # the inversion passes float32 velocities with a float32 state
            ptr = {"x_ptr": xd, "v_ptr": vd, "out_ptr": xd, "d_ptr": "fp32"}
            out.append((f"flow_euler_step[x={xd},v={vd}]", flow_step._flow_euler_step_kernel, ptr, flow_scalars,
                        {"BLOCK": 1024}))
    return [(label, fn, _signature(fn, ptr, sc, ce), ce) for label, fn, ptr, sc, ce in out]


def compile_all(archs, verbose: bool = True) -> int:
    """Compile every job for every arch; returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", int(arch), 32)
        for label, fn, sig, ce in jobs():
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=target)
                asm = compiled.asm
                ok = "ptx" in asm and "cubin" in asm and len(asm["cubin"]) > 0
                status = "ok" if ok else "FAILED (no ptx/cubin)"
                failures += 0 if ok else 1
            except Exception as err:  # report and keep going: one line per kernel, all failures listed
                status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                failures += 1
                if verbose:
                    traceback.print_exc()
            print(f"sm_{arch} {label}: {status} ({time.perf_counter() - t0:.2f}s)", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastinpo.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", type=int, help="CUDA compute capability, e.g. 80, 90 (repeat)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; ahead-of-time compile needs the real compiler", file=sys.stderr)
        return 2
    archs = args.arch or [80, 90]
    n_jobs = len(jobs())
    failures = compile_all(archs)
    total = n_jobs * len(archs)
    print(f"{total - failures}/{total} kernel variants compiled for {', '.join(f'sm_{a}' for a in archs)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
