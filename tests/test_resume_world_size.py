"""Resume a DeepSpeed run on another number of ranks (issue 16 item 8), on the CPU (``DS_ACCELERATOR=cpu``, gloo,
tiny SDXL pipeline): 2 -> 1 and 1 -> 2 ranks, ZeRO-3 (every parameter sharded) full fine-tuning and ZeRO-2 LoRA.

Per case: a 4-step run on 1 rank and one on 2 ranks, both checkpointing at step 2, with the same pairs per
optimizer step (1 rank x 2 pairs, or 1 pair x 2 accumulation steps, = 2 ranks x 1 pair). Then each run's step-2
checkpoint resumes on the other number of ranks for steps 3-4. All randomness is per pair (seeded by its stream
position) and the stream positions of a step do not depend on the split, so the resumed run must continue the
uninterrupted run it came from: the same per-step losses and learning rates, the same final weights. Launches: one
process (1 rank), one ``torchrun`` (2 ranks), one process (1 rank) — the 1-rank runs cannot share the 2-rank launch.

Run with ``DS_ACCELERATOR=cpu pytest -m distributed tests/test_resume_world_size.py``; the tests of the rule and of
its message (no launch) are in the core tier.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from tests.tolerances import distributed_loss_tol

# the launches: the distributed tier; the rule and the message (plain functions) run in the core tier
distributed = pytest.mark.distributed

BETA = 100.0
# the 1-rank and 2-rank runs sum the same per-pair terms in another float32 order: tests/tolerances.py
LOSS_TOL = distributed_loss_tol(BETA)
# Final weights, elementwise, float32: the runs differ only by the reduction order of the gradient (~1e-7
# relative), which Adam's 1/sqrt(v) amplifies in elements whose gradient is near zero to a fraction of the
# learning rate per step (the bound tests/test_distributed.py uses for 2 ranks vs one process). A lost optimizer
# state or a shifted data stream moves the weights by the order of lr = 1e-4 per step.
WEIGHT_TOL = 1e-5
LR = 1e-4

# name -> (DeepSpeed preset ("zero3_tiny": zero3 with every parameter sharded), extra overrides, the 1-rank
# (pairs_per_batch, grad_accum) that keeps 2 ranks x 1 pair x 1 = 2 pairs per step)
CASES = {
    "zero3-full": ("zero3_tiny", [], (2, 1)),
    "zero2-lora": ("zero2", ["lora.rank=4", "optim.max_grad_norm=0.1"], (1, 2)),
}


def _overrides(setup: dict, case: str, out: Path, batch: tuple[int, int]) -> list[str]:
    preset, extra, _ = CASES[case]
    preset = setup["preset"] if preset == "zero3_tiny" else preset
    return [f"model.path={setup['pipeline']}", f"data.path={setup['data']}", "data.resolution=32",
            "method.name=diffusion-dpo", f"method.beta={BETA:g}", "data.caption_dropout=0.5", f"optim.lr={LR:g}",
            "optim.scale_lr=false", "optim.max_grad_norm=1.0",
            # a schedule that moves every step: a resume that lost its state would log another lr
            "optim.lr_scheduler=cosine", "optim.warmup_steps=1",
            "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=5", f"train.output_dir={out}",
            "train.log_every=1", "train.progress=false", "train.device=cpu", "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={preset}", f"train.pairs_per_batch={batch[0]}",
            f"train.grad_accum={batch[1]}", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- the worker
def _worker(spec_path: str) -> None:
    """Run the spec's trainings in order (one launch); record each summary, error or refusal message."""
    from fastinpo.config import load_config
    from fastinpo.train import train

    spec = json.loads(Path(spec_path).read_text())
    results: dict = {}
    rank = int(os.environ.get("RANK", "0"))
    for run in spec["runs"]:
        started = time.perf_counter()
        try:
            summary = train(load_config(None, run["overrides"]), resume=run.get("resume"))
            results[run["name"]] = {"summary": summary}
        except ValueError as err:
            if not run.get("refused"):
                results[run["name"]] = {"error": traceback.format_exc()}
                Path(spec["results"]).write_text(json.dumps(results, indent=2))
                raise
            results[run["name"]] = {"refused": str(err)}
        except Exception:  # noqa: BLE001 - recorded for the test to show, then re-raised to stop the launch
            results[run["name"]] = {"error": traceback.format_exc()}
            Path(spec["results"]).write_text(json.dumps(results, indent=2))
            raise
        results[run["name"]]["seconds"] = time.perf_counter() - started
        if rank == 0:
            Path(spec["results"]).write_text(json.dumps(results, indent=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root: Path, name: str, ranks: int, runs: list[dict]) -> dict:
    spec, results = root / f"spec-{name}.json", root / f"results-{name}.json"
    spec.write_text(json.dumps({"runs": runs, "results": str(results)}))
    port = str(_free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    # as a module from the repository root (tests/triton would shadow the triton package when run as a file)
    worker = ["-m", "tests.test_resume_world_size", "--worker", str(spec)]
    cmd = [sys.executable, *worker] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", port, *worker]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    found = json.loads(results.read_text()) if results.is_file() else {}
    errors = {k: v["error"] for k, v in found.items() if "error" in v}
    if proc.returncode != 0 or errors:
        pytest.fail(f"{name} launch failed (rc {proc.returncode}):\n{json.dumps(errors, indent=1)[-6000:]}\n"
                    f"{proc.stderr[-6000:]}")
    print(f"{name}: {ranks} rank(s), {time.perf_counter() - started:.1f} s")
    return found


@pytest.fixture(scope="module")
def runs(tiny_pipelines, pickapic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_world_size")
    preset = root / "zero3_tiny.json"
    cfg = json.loads((Path(__file__).parents[1] / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter of the tiny UNet
    preset.write_text(json.dumps(cfg))
    setup = {"preset": str(preset), "pipeline": tiny_pipelines["sdxl"], "data": pickapic_dir}
    started = time.perf_counter()

    def ckpt2(case: str, ranks: int) -> str:
        return str(root / f"{case}-{ranks}" / "checkpoints" / "step-00000002")

    one = {case: CASES[case][2] for case in CASES}
    first = [{"name": f"{c}-1", "overrides": _overrides(setup, c, root / f"{c}-1", one[c])} for c in CASES]
    second = []
    for c in CASES:
        second.append({"name": f"{c}-2", "overrides": _overrides(setup, c, root / f"{c}-2", (1, 1))})
        second.append({"name": f"{c}-1to2", "resume": ckpt2(c, 1),
                       "overrides": _overrides(setup, c, root / f"{c}-1to2", (1, 1))})
    third = []
    for c in CASES:
        # the 2-rank settings on 1 rank: 1 pair per step instead of 2 -> refused, naming what to type
        third.append({"name": f"{c}-refused", "resume": ckpt2(c, 2), "refused": True,
                      "overrides": _overrides(setup, c, root / f"{c}-refused", (1, 1))})
        third.append({"name": f"{c}-2to1", "resume": ckpt2(c, 2),
                      "overrides": _overrides(setup, c, root / f"{c}-2to1", one[c])})
    found = {**_launch(root, "first", 1, first), **_launch(root, "second", 2, second),
             **_launch(root, "third", 1, third)}
    print(f"resume on another world size: {time.perf_counter() - started:.1f} s in all")
    return found | {"_root": root}


def _export(run: Path, lora: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "lora/pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    return load_file(run / "export" / name)


# ----------------------------------------------------------------------------------------------- tests
@distributed
@pytest.mark.parametrize("direction", ["2to1", "1to2"])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_world_size_continues_the_same_training(case, direction, runs):
    """Steps 3-4 after the resume == steps 3-4 of the uninterrupted run the checkpoint came from (loss within the
    float32 reduction-order rule, the same learning rate), and the same final weights."""
    root = runs["_root"]
    source = root / f"{case}-{direction[0]}"
    resumed = root / f"{case}-{direction}"
    straight, after = _metrics(source), _metrics(resumed)
    assert [r["step"] for r in straight] == [1, 2, 3, 4] and [r["step"] for r in after] == [3, 4]
    for a, b in zip(after, straight[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), (case, direction, a["step"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6), (case, direction, a["step"])
    assert len({r["lr"] for r in straight}) == 4  # the schedule moves every step: a lost one would show
    summary = runs[f"{case}-{direction}"]["summary"]
    assert summary["world_size"] == int(direction[-1]) and summary["step"] == 4
    lora = "lora" in case
    a, b = _export(resumed, lora), _export(source, lora)
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= WEIGHT_TOL, (case, direction, worst)
    if not lora:
        # the weights moved after the resume by far more than the tolerance, so the comparison above can see a
        # resume that lost the optimizer state or trained from another point (step-2 weights: DeepSpeed's own
        # consolidation of the step-2 shards)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        at_2 = get_fp32_state_dict_from_zero_checkpoint(str(source / "checkpoints" / "step-00000002"), tag="ds")
        moved = max((a[k] - at_2[k]).abs().max().item() for k in at_2)
        assert moved > 10 * WEIGHT_TOL, moved


@distributed
def test_the_two_world_sizes_train_the_same_run(runs):
    """The 1-rank and 2-rank runs themselves agree (what makes "continue the same training" checkable)."""
    root = runs["_root"]
    for case in CASES:
        for a, b in zip(_metrics(root / f"{case}-1"), _metrics(root / f"{case}-2"), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), (case, a["step"])


@distributed
def test_conversion_keeps_the_original_checkpoint(runs):
    """The universal conversion sits next to the shards (which stay: the checkpoint still resumes on its own world
    size), complete, with no temporary folders left."""
    root = runs["_root"]
    for case in CASES:
        for ranks in (1, 2):
            step2 = root / f"{case}-{ranks}" / "checkpoints" / "step-00000002"
            shards = sorted(p.name for p in (step2 / "ds").glob("*optim_states.pt"))
            assert len(shards) == ranks, shards
            assert (step2 / "universal" / "latest_universal").is_file()
            assert (step2 / "universal" / "ds" / "zero" / "optimizer_state.pt").is_file()
            assert not list(step2.glob(".tmp-*"))
            assert json.loads((step2 / "state.json").read_text())["world_size"] == ranks


@distributed
def test_a_changed_global_batch_is_refused_with_what_to_type(runs):
    for case in CASES:
        message = runs[f"{case}-refused"]["refused"]
        assert "written by 2 rank(s)" in message and "this run has 1 rank(s) x 1 x 1 = 1" in message, message
        assert "--set train.pairs_per_batch=1 --set train.grad_accum=2" in message, message
        assert "--set train.pairs_per_batch=2 --set train.grad_accum=1" in message, message
        assert not (runs["_root"] / f"{case}-refused").exists()  # a refused start leaves nothing behind


# ----------------------------------------------------------------------------------------------- the rule (core tier)
def test_batch_settings_keep_the_pairs_per_step():
    from fastinpo.train.checkpoint import batch_settings

    assert batch_settings(8, 4, 1, 1) == [(1, 2), (2, 1)]  # 8 ranks x 1 x 1 -> 4 ranks: accumulate, or wider
    assert batch_settings(8, 16, 1, 1) == []  # half a pair per rank
    assert batch_settings(2, 2, 2, 1) == [(1, 1)]  # 1 rank x 2 pairs -> 2 ranks x 1 pair
    assert batch_settings(8, 3, 1, 1) == []  # 3 ranks cannot split 8 pairs
    assert batch_settings(12, 2, 4, 2) == [(3, 2)] and batch_settings(12, 2, 3, 4) == [(3, 2)]
    for pairs, ranks, b, a in ((8, 4, 1, 1), (2, 2, 2, 1), (12, 2, 4, 2), (64, 8, 2, 8), (6, 4, 1, 1)):
        assert all(ranks * b2 * a2 == pairs for b2, a2 in batch_settings(pairs, ranks, b, a))


def test_world_size_change_message_names_what_to_type():
    from fastinpo.train.checkpoint import world_size_change_problem

    path = Path("run/checkpoints/step-00000100")
    assert world_size_change_problem(path, (8, 1, 1), (4, 1, 2)) is None
    assert world_size_change_problem(path, (2, 1, 1), (1, 2, 1)) is None
    message = world_size_change_problem(path, (8, 1, 1), (4, 1, 1))
    assert "8 rank(s) x train.pairs_per_batch = 1 x train.grad_accum = 1 = 8 pairs" in message
    assert "`fastinpo train CONFIG --resume latest --set train.pairs_per_batch=1 --set train.grad_accum=2`" in message
    assert "--set train.pairs_per_batch=2 --set train.grad_accum=1" in message and "memory per rank" in message
    odd = world_size_change_problem(path, (8, 1, 1), (3, 1, 1), resume=str(path))
    assert "cannot be split evenly over 3 ranks" in odd and "(1, 2, 4, 8)" in odd


def test_resume_config_accepts_another_split_of_the_same_pairs_per_step(tmp_path):
    """run_folder.check_resume_config: train.pairs_per_batch / train.grad_accum may change only together with the
    world size (or each other) so that the pairs per step stay the same; anything else is still refused."""
    from fastinpo.config import load_config
    from fastinpo.train.run_folder import check_resume_config

    base = ["model.path=m", "data.path=d", "train.pairs_per_batch=1", "train.grad_accum=1"]
    ckpt = tmp_path / "step-00000002"
    ckpt.mkdir()
    saved = load_config(None, base).to_dict()
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "backend": "deepspeed", "world_size": 2,
                                                 "config": saved}))
    check_resume_config(load_config(None, [*base, "train.grad_accum=2"]), ckpt, tmp_path, world_size=1)
    check_resume_config(load_config(None, [*base, "train.pairs_per_batch=2"]), ckpt, tmp_path, world_size=1)
    check_resume_config(load_config(None, base), ckpt, tmp_path, world_size=2)
    with pytest.raises(ValueError, match="train.grad_accum: saved 1, now 2"):
        check_resume_config(load_config(None, [*base, "train.grad_accum=2"]), ckpt, tmp_path, world_size=2)
    with pytest.raises(ValueError, match="optim.lr"):
        check_resume_config(load_config(None, [*base, "train.grad_accum=2", "optim.lr=1e-3"]), ckpt, tmp_path,
                            world_size=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: [torchrun ...] python -m tests.test_resume_world_size --worker SPEC.json")
