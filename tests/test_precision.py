"""Policy and reference are evaluated identically when their weights are equal, in every precision: at step 1
(θ = θ_ref) the DPO logits are 0 and the loss is ln 2 — for LoRA (the reference is the adapter-disabled policy) and
full fine-tuning with a float32 reference, under fp32, fp16 and bf16 autocast. (Before, the LoRA reference ran in
float32 outside the policy's autocast: fp16 gave 0.7150 on the tiny pipeline.) A float16/bfloat16 reference copy is
another evaluation by design (model.reference_dtype, the official InPO / Inversion-DPO choice)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from fastinpo.config import load_config
from fastinpo.train import train

# fp16 with full fine-tuning: the float32 reference copy was in eval() mode while the policy trains; on the CPU's
# fp16 convolutions that gave other memory layouts, other rounding and 0.7059 (build_models says more).
# A LoRA base in the autocast's half dtype (model.base_dtype) keeps the invariant: policy and reference share the
# same half-precision base weights and both run under the one autocast.
CASES = [("no", False, "auto"), ("no", True, "auto"), ("bf16", False, "auto"), ("bf16", True, "auto"),
         ("fp16", False, "auto"), ("fp16", True, "auto"), ("bf16", True, "bfloat16"), ("fp16", True, "float16")]


@pytest.mark.parametrize("precision,lora,base_dtype", CASES)
def test_step_one_loss_is_ln2_in_every_precision(tiny_pipelines, pickapic_dir, tmp_path, precision, lora,
                                                 base_dtype):
    over = [f"model.path={tiny_pipelines['sd15']}", f"data.path={pickapic_dir}", "data.resolution=32",
            "method.name=diffusion-dpo", "train.max_steps=1", "train.pairs_per_batch=2",
            f"train.output_dir={tmp_path}", "train.log_every=1", "train.progress=false", "train.device=cpu",
            f"train.mixed_precision={precision}", "model.reference_dtype=float32",
            f"model.base_dtype={base_dtype}"] + (["lora.rank=4"] if lora else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU warns that it is slow: expected here
        train(load_config(None, over))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["loss"] - math.log(2)) <= 1e-6, row["loss"]
