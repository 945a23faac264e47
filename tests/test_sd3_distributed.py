"""SD3 (flow) training under DeepSpeed ZeRO-3 and ZeRO-2 on CPU (2 ranks, gloo) equals one process with the same
global batch: Flow-DPO full fine-tuning (ZeRO-3 with a sharded reference; ZeRO-2 with the replicated one), and InPO
for flows with LoRA (ZeRO-3: inverting with the sharded policy, ranks kept in lockstep — each pair's Euler call count
comes from its σ, a function of its stream position; ZeRO-2: the policy is whole on every rank).

The 2-rank launch reuses the worker of tests/test_distributed.py (one torchrun, every case in sequence)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import LOSS_TOL, PAIRS_PER_RANK, WEIGHT_TOL, WORLD, _free_port, _metrics

pytestmark = pytest.mark.distributed

CASES = {
    "flow-dpo-full": ("diffusion-dpo", ["distributed.reference=sharded"]),
    "flow-inpo-lora": ("inpo", ["lora.rank=4", "optim.max_grad_norm=0.1"]),
    # ZeRO-2 (sharded optimizer state and gradients, whole parameters): the same one-process references as the
    # ZeRO-3 cases above (run once, reused)
    "flow-dpo-full-zero2": ("diffusion-dpo", ["distributed.deepspeed_config=zero2"]),
    "flow-inpo-lora-zero2": ("inpo", ["lora.rank=4", "optim.max_grad_norm=0.1", "distributed.deepspeed_config=zero2"]),
}
SINGLE_ONLY_PREFIXES = ("distributed.",)  # 2-rank settings; the one-process reference has none of them


def _base(pipeline, data, out, method, *extra) -> list[str]:
    return [f"model.path={pipeline}", f"data.path={data}", "data.resolution=32", f"method.name={method}",
            "method.beta=100", "method.inversion_levels=4", "data.caption_dropout=0.5", "optim.lr=1e-4",
            "optim.scale_lr=false", "optim.max_grad_norm=1.0", "train.max_steps=3", f"train.output_dir={out}",
            "train.log_every=1", "train.progress=false", "train.device=cpu", "train.checkpoint_every=0", *extra]


@pytest.fixture(scope="module")
def runs(pickapic_dir, tmp_path_factory):
    from fastinpo.config import load_config
    from fastinpo.models.sd3 import make_tiny_sd3_pipeline
    from fastinpo.train import train

    root = tmp_path_factory.mktemp("sd3-distributed")
    pipe = make_tiny_sd3_pipeline(root / "tiny-sd3")
    preset = root / "zero3_tiny.json"
    cfg = json.loads((Path(__file__).parents[1] / "configs" / "deepspeed" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard every parameter
    preset.write_text(json.dumps(cfg))
    cases = [{"name": name, "runs": [{}],
              "overrides": _base(pipe, pickapic_dir, root / f"ds-{name}", method,
                                 f"train.pairs_per_batch={PAIRS_PER_RANK}", "distributed.backend=deepspeed",
                                 f"distributed.deepspeed_config={preset}", *extra)}
             for name, (method, extra) in CASES.items()]
    spec, results = root / "spec.json", root / "results.json"
    spec.write_text(json.dumps({"cases": cases, "results": str(results)}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "tests.test_distributed", "--worker", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    found = json.loads(results.read_text()) if results.is_file() else {}
    errors = {k: v["error"] for k, v in found.items() if "error" in v}
    if proc.returncode != 0 or errors:
        pytest.fail(f"torchrun failed (rc {proc.returncode}):\n{json.dumps(errors, indent=1)[-6000:]}\n"
                    f"{proc.stderr[-6000:]}")
    singles, done = {}, {}
    for name, (method, extra) in CASES.items():
        kept = [e for e in extra if not e.startswith(SINGLE_ONLY_PREFIXES)]
        key = (method, *kept)
        if key not in done:  # cases that differ only in the distributed settings share one reference run
            done[key] = root / f"single-{name}"
            train(load_config(None, _base(pipe, pickapic_dir, done[key], method,
                                          f"train.pairs_per_batch={PAIRS_PER_RANK * WORLD}", *kept)))
        singles[name] = done[key]
    return {"root": root, "ds": found, "single": singles}


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_zero_equals_one_process(case, runs):
    from safetensors.torch import load_file

    from fastinpo.train import checkpoint as ckpt

    single_dir = runs["single"][case]
    ds, single = _metrics(runs["root"] / f"ds-{case}"), _metrics(single_dir)
    assert [r["step"] for r in ds] == [r["step"] for r in single] == [1, 2, 3]
    for a, b in zip(ds, single, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL * max(1.0, abs(b["loss"])), (case, a["loss"], b["loss"])
    if case.startswith("flow-inpo"):
        assert all(a["inversion_steps"] == b["inversion_steps"] for a, b in zip(ds, single, strict=True))
    summary = runs["ds"][case]["summary"]
    assert summary["zero_stage"] == (2 if case.endswith("zero2") else 3) and summary["world_size"] == WORLD
    # the final weights: the single run's checkpoint against the 2-rank run's consolidated export
    exported = runs["root"] / f"ds-{case}" / "export"
    assert exported.is_dir()
    if case.startswith("flow-dpo-full"):
        trained = load_file(next((exported / "transformer").glob("*.safetensors")))
        single_w = load_file(ckpt.list_checkpoints(single_dir)[-1][1] / ckpt.WEIGHTS)
        worst = max((trained[k] - v).abs().max().item() for k, v in single_w.items())
        assert worst <= WEIGHT_TOL, worst
    else:  # LoRA: the exported adapter against the one-process run's
        trained = load_file(exported / "lora" / "pytorch_lora_weights.safetensors")
        single_w = load_file(single_dir / "export" / "lora" / "pytorch_lora_weights.safetensors")
        assert trained.keys() == single_w.keys() and trained
        worst = max((trained[k] - v).abs().max().item() for k, v in single_w.items())
        assert worst <= WEIGHT_TOL, worst
