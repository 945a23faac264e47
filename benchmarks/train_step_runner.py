"""Running a training-step benchmark group: timing (interleaved on CPU, one case after another on CUDA), peak
memory, UNet call counts, FLOPs and MFU, and the rows each case gives (see :mod:`benchmarks.train_step_cases` for
what the cases are)."""

from __future__ import annotations

import copy
import ctypes
import gc
import time

import torch

from benchmarks.common import Timer, loadavg, quantile
from benchmarks.train_step_cases import Case, Group


# ----------------------------------------------------------------------------------------------- environment
def synchronized_timer() -> float:
    """``perf_counter`` after the GPU has finished its queued work: the pytest-benchmark timer of this suite
    (a plain host timer would stop while CUDA kernels are still running)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def quantiles(values: list[float]) -> tuple[float, float]:
    """(median, IQR)."""
    return quantile(values, 0.5), quantile(values, 0.75) - quantile(values, 0.25)


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of one call above what was resident before it (MB).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the process's peak RSS (VmHWM, reset by
    writing 5 to /proc/self/clear_refs) minus its RSS before the call, with glibc's freed heap handed back first
    (``malloc_trim``) so that memory freed by earlier steps does not hide this step's peak.
    """

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.kind = "cuda max_memory_allocated" if dev.type == "cuda" else "cpu peak RSS delta"
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
        raise KeyError(key)

    def __call__(self, fn) -> float | None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        try:
            gc.collect()
            if self._libc is not None:
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = self._status("VmRSS")
            fn()
            return self._status("VmHWM") - base
        except (OSError, KeyError):
            return None


class CallCounter:
    """UNet calls and samples per step (forward pre-hooks on the UNets)."""

    def __init__(self, modules):
        self.calls = self.samples = 0
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        self.calls += 1
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / SD3 transformer
        self.samples += int(x.shape[0])

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- measuring
def measure_group(group: Group, args, timer: Timer, memory: PeakMemory, flops_on: bool) -> list[Case]:
    cases = group.cases()
    if group.secondary:
        args = copy.copy(args)
        args.repeats = max(3, args.repeats // 3)
    runnable = [c for c in cases if c.step is not None and c.status == "ok"]
    interleave = group.dev.type != "cuda"
    for c in runnable:
        if c.prepare is not None:
            try:
                c.prepare()
            except Exception as err:  # noqa: BLE001 - reported like a failing step
                c.status, c.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

    counter = CallCounter(group.unets)  # UNet calls / samples of every timed step, attributed to its case

    def guarded(c: Case, r: int) -> float | None:
        try:
            return timer(lambda: c.step(r))
        except Exception as err:  # noqa: BLE001 - a failing case is reported, the rest still measured
            c.status, c.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return None

    def timed(c: Case, r: int):
        calls, samples = counter.calls, counter.samples
        t = guarded(c, r)
        if t is not None:
            c.times.append((r, t))
            c.calls = (c.calls or 0) + counter.calls - calls
            c.samples = (c.samples or 0) + counter.samples - samples

    def finish(c: Case):
        if c.status != "ok":
            return
        if c.times:  # mean per timed step (InPO's work depends on each step's t)
            c.calls, c.samples = c.calls / len(c.times), c.samples / len(c.times)
        c.peak_mb = memory(lambda: c.step(args.warmup + args.repeats))
        if flops_on:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                c.step(args.warmup + args.repeats + 1)
            c.flops = float(fc.get_total_flops())

    if interleave:
        for r in range(args.warmup):
            for c in runnable:
                if c.status == "ok":
                    guarded(c, r)
        for i in range(args.repeats):
            r = args.warmup + i
            order = runnable[i % len(runnable):] + runnable[:i % len(runnable)]  # rotate: no case always first
            for c in order:
                if c.status == "ok":
                    timed(c, r)
        for c in runnable:
            finish(c)
    else:  # one case at a time: a GPU holds one optimizer state of a large UNet
        for c in runnable:
            for r in range(args.warmup):
                guarded(c, r)
            for i in range(args.repeats):
                if c.status == "ok":
                    timed(c, args.warmup + i)
            finish(c)
            group.drop_optimizer(c.impl)
        group.drop_optimizer("fastinpo")
    counter.remove()
    return cases


def matmul_tflops(dev: torch.device, timer: Timer) -> float | None:
    """The bf16 matmul rate this GPU reaches in this run (8192³ GEMMs): the denominator of MFU."""
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timer(lambda: a @ b) for _ in range(20)]
    return 2 * n**3 / quantiles(times)[0] / 1e12


def rows_for(group: Group, cases: list[Case], base: dict, model: str, peak_tflops: float | None) -> list[dict]:
    by = {c.name: c for c in cases}
    ref_case, fast_case = by.get("reference"), by.get("fastinpo")
    comp = by.get("reference+compile")

    def med(c):
        return quantiles([t for _, t in c.times])[0] if c is not None and c.times else None

    ref_med, comp_med = med(ref_case), med(comp)
    ref_by_r = {r: t for r, t in ref_case.times} if ref_case and ref_case.times else {}
    denoiser = "transformer" if group.flow else "UNet"
    rows = []
    for c in cases:
        row = dict(base, loadavg_1m=loadavg(), model=model, method=group.method,
                   mode="lora" if group.lora else "full", pairs=group.B,
                   steps_N=group.num_steps if group.method == "inversion-dpo" else
                   (f"K={group.config.method.inversion_levels}" if group.method == "inpo" else ""),
                   case=c.name, optimization=c.optimization, optimization_state=c.state, status=c.status,
                   note="; ".join(x for x in (c.note, f"reference {denoiser} {group.ref_dtype}"
                                               if c.name in ("reference", "fastinpo") else "") if x),
                   repeats=len(c.times), warmup=group.args.warmup)
        if c.times:
            ts = [t for _, t in c.times]
            m, iqr = quantiles(ts)
            pps = [group.B / t for t in ts]
            pm, piqr = quantiles(pps)
            row.update(median_step_s=m, iqr_step_s=iqr, pairs_per_s=group.B / m, pairs_per_s_iqr=piqr)
            if ref_med:
                row["speedup_vs_reference"] = ref_med / m
                paired = [ref_by_r[r] / t for r, t in c.times if r in ref_by_r]
                if paired:
                    row["paired_speedup_median"], row["paired_speedup_iqr"] = quantiles(paired)
            if comp_med:
                row["speedup_vs_compile"] = comp_med / m
            fast_by_r = {r: t for r, t in fast_case.times} if fast_case and fast_case.times else {}
            if c.impl == "fastinpo" and c.name != "fastinpo" and fast_by_r:
                # > 1: the optimization makes fastinpo faster — per repeat, against fastinpo's time for the same
                # work ("off" rows: case / fastinpo; "on" rows, a fast path fastinpo does not use by default: the
                # inverse), median over repeats: robust to the machine's load changing during the group
                per = [t / fast_by_r[r] if c.state == "off" else fast_by_r[r] / t for r, t in c.times if r in fast_by_r]
                row["gain_of_optimization"] = quantiles(per)[0]
            row["times_s"] = ";".join(f"{t:.4f}" for _, t in c.times)
        if c.peak_mb is not None:
            row.update(peak_mem_mb=c.peak_mb, mem_kind=group.args._mem_kind)
        if c.calls is not None:
            row.update(unet_calls=c.calls, unet_samples=c.samples)  # means per timed step
        if c.flops is not None and c.times:
            m = quantiles([t for _, t in c.times])[0]
            row.update(tflop_per_step=c.flops / 1e12, achieved_tflops=c.flops / m / 1e12, matmul_tflops=peak_tflops,
                       mfu=(c.flops / m / 1e12 / peak_tflops) if peak_tflops else "")
        rows.append(row)
    return rows


def policy_mfu_row(group: Group, base: dict, model: str, timer: Timer, peak_tflops: float, repeats: int) -> dict:
    """GPU: MFU of the policy forward + backward alone on [winners; losers] (bf16 autocast), the issue's 40% target."""
    from torch.utils.flop_counter import FlopCounterMode

    e = group.data.encoded_at(0)
    n = e.latent_mean.shape[0]
    x = e.latent_mean
    if group.flow:  # SD3: the timestep is σ·T (a float), the cond holds the pooled projections
        t = torch.rand(n, device=group.dev) * 1000
    else:
        t = torch.randint(0, 1000, (n,), device=group.dev)
    cond = group.family.conditioning(e.prompt_embeds.repeat(2, 1, 1),
                                     None if e.pooled_embeds is None else e.pooled_embeds.repeat(2, 1), e.time_ids)
    policy = group.models.callables.policy

    def fwd_bwd():
        policy(x, t, cond).float().square().mean().backward()

    for _ in range(3):
        fwd_bwd()
    with FlopCounterMode(display=False) as fc:
        fwd_bwd()
    times = [timer(fwd_bwd) for _ in range(repeats)]
    m, iqr = quantiles(times)
    flops = float(fc.get_total_flops())
    for p in group.models.trainable:
        p.grad = None
    return dict(base, loadavg_1m=loadavg(), model=model, method="policy-fwd-bwd",
                mode="lora" if group.lora else "full", pairs=group.B, case="fastinpo", status="ok",
                median_step_s=m, iqr_step_s=iqr, pairs_per_s=group.B / m, tflop_per_step=flops / 1e12,
                achieved_tflops=flops / m / 1e12, matmul_tflops=peak_tflops, mfu=flops / m / 1e12 / peak_tflops,
                repeats=repeats, note="policy forward+backward on [winners; losers], bf16 autocast")


def unit_cost_rows(group: Group, base: dict, model: str, timer: Timer, repeats: int = 9) -> list[dict]:
    """What one UNet call costs at the batch sizes the steps use (policy float32 no-grad / with backward, the
    reference in its dtype): the unit costs that explain the step ratios on this device."""
    e = group.data.encoded_at(0)
    rows = []
    for n in (group.B, 2 * group.B, 4 * group.B):
        reps = (n + 2 * group.B - 1) // (2 * group.B)
        x = e.latent_mean.repeat(reps, 1, 1, 1)[:n]
        t = torch.full((n,), 500, dtype=torch.int64, device=group.dev)
        cond = {"encoder_hidden_states": e.prompt_embeds.repeat(2 * reps, 1, 1)[:n]}
        if e.pooled_embeds is not None:
            cond.update(text_embeds=e.pooled_embeds.repeat(2 * reps, 1)[:n], time_ids=e.time_ids.repeat(reps, 1)[:n])
        policy, reference = group.models.callables.policy, group.models.callables.reference

        def fwd_nograd(policy=policy, x=x, t=t, cond=cond):
            with torch.no_grad():
                policy(x, t, cond)

        def fwd_bwd(policy=policy, x=x, t=t, cond=cond):
            policy(x, t, cond).float().square().mean().backward()

        def ref_fwd(reference=reference, x=x, t=t, cond=cond):
            with torch.no_grad():
                reference(x, t, cond)

        for name, fn in ((f"policy fwd no-grad n={n}", fwd_nograd), (f"policy fwd+bwd n={n}", fwd_bwd),
                         (f"reference fwd ({group.ref_dtype}) n={n}", ref_fwd)):
            fn()
            times = []
            for _ in range(repeats):
                times.append(timer(fn))
            m, iqr = quantiles(times)
            rows.append(dict(base, loadavg_1m=loadavg(), model=model, method="unit-cost", mode="full",
                             pairs=group.B, case=name, status="ok", median_step_s=m, iqr_step_s=iqr,
                             repeats=repeats, note="one UNet call (per-call cost behind the step ratios)"))
    for p in group.models.trainable:
        p.grad = None
    return rows
