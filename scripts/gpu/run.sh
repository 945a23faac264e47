#!/usr/bin/env bash
# The GPU kit: one call that builds, checks and measures fastinpo on an H100/H200 (docs/GPU.md).
#
#   bash scripts/gpu/run.sh            # on the GPU machine, in the repository root, with .gpu-wheels carried
#   bash scripts/gpu/run.sh --dry-run  # on a CPU machine: every stage that needs no CUDA, at tiny sizes (CI)
#
# Stages run in order, each under its own time budget (and never past the kit's total, 8 minutes by its own
# clock). Each writes its log and result rows under $OUT as soon as it finishes — logs.tar.gz, results.tar.gz,
# stages.tsv, summary.txt: at most 8 files — so a call cut short still returns everything done so far. A failing
# stage is recorded and the kit goes on (a correctness mismatch must not hide the measurements). The summary table
# is printed last: the end of the output is what comes back first.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
DRY=0
ONLY=""
TOTAL_S=${KIT_TOTAL_S:-}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --total-s=*) TOTAL_S=${arg#*=} ;;
    --only=*) ONLY=${arg#*=} ;;  # e.g. --only=build,train-step,e2e or --only=build,train-step-sd3
    *) echo "run.sh: unknown option $arg (use --dry-run, --total-s=N, --only=STAGE,...)" >&2; exit 2 ;;
  esac
done
[ -z "$TOTAL_S" ] && { [ $DRY -eq 1 ] && TOTAL_S=900 || TOTAL_S=480; }  # the GPU call: <= 8 minutes
KIT_START=$(date +%s)
if [ -z "${OUT:-}" ]; then OUT="$REPO/.gpu-out"; [ $DRY -eq 1 ] && OUT="$REPO/.gpu-dry-run"; fi
mkdir -p "$OUT"
SCRATCH=$(mktemp -d /tmp/fastinpo-kit.XXXXXX)
LOGS="$SCRATCH/logs"; RES="$SCRATCH/results"; SITE="$SCRATCH/site"
mkdir -p "$LOGS" "$RES"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 FASTINPO_KIT_DRY_RUN=$DRY
if [ $DRY -eq 1 ]; then
  PY=${PY:-$REPO/.venv/bin/python}
  export DS_ACCELERATOR=cpu
else
  PY=${PY:-python3}  # the GPU image's python3 holds torch
fi
FASTINPO=("$PY" -m fastinpo)
printf 'stage\tstatus\tseconds\tbudget_s\tnote\n' > "$OUT/stages.tsv"

elapsed() { echo $(( $(date +%s) - KIT_START )); }

publish() {  # logs and rows of the finished stages, under $OUT (few files: tarred)
  tar -czf "$OUT/logs.tar.gz" -C "$SCRATCH" logs 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$SCRATCH" results 2>/dev/null
}

stage() {  # stage NAME BUDGET_S FUNCTION: run FUNCTION under min(budget, what is left of the total)
  local name=$1 budget=$2 fn=$3 left start rc status note=""
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    printf '%s\tnot-selected\t0\t%s\t--only=%s\n' "$name" "$budget" "$ONLY" >> "$OUT/stages.tsv"
    return
  fi
  left=$(( TOTAL_S - $(elapsed) - 10 ))  # 10 s kept for the summary
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t0\t%s\tout of time (%ss of %ss used)\n' "$name" "$budget" "$(elapsed)" "$TOTAL_S" \
      >> "$OUT/stages.tsv"
    echo "== [$name] skipped: out of time"
    return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== [$name] start (budget ${budget}s, at ${TOTAL_S}s total: $(elapsed)s used)"
  start=$(date +%s)
  STAGE_BUDGET=$budget timeout -k 5 "$budget" bash -c "set -o pipefail; $fn" > "$LOGS/$name.log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - start ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="stopped at its ${budget}s budget" ;;
    *) status=failed; note="exit $rc" ;;
  esac
  [ -f "$LOGS/$name.note" ] && note="${note:+$note; }$(tr '\n' ' ' < "$LOGS/$name.note")"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$budget" "$note" >> "$OUT/stages.tsv"
  tail -n 25 "$LOGS/$name.log" | sed "s/^/   [$name] /"
  echo "== [$name] $status in ${secs}s ${note:+($note)}"
  publish
}

# ---------------------------------------------------------------------------------------------------- stages
# Each stage is a function exported to the `bash -c` that `timeout` runs; they read PY, REPO, RES, LOGS, DRY.
wheels() {
  if [ -d .gpu-wheels ] && ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    if [ "$DRY" = 1 ]; then  # CPU: check that the set installs for the GPU's CPython 3.12 (not used here)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 .gpu-wheels/*.whl
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu-wheels/*.whl
    fi
    ls "$SITE" | sed 's/^/installed: /'
    echo "$(ls .gpu-wheels/*.whl | wc -l) wheels into a scratch target" > "$LOGS/wheels.note"
  else
    echo "no .gpu-wheels/ (bash scripts/gpu/prepare.sh makes it)" | tee "$LOGS/wheels.note"
    [ "$DRY" = 1 ] || exit 1
  fi
  echo "$(date +%T) --- fastinpo env of the plain copy (before the build)"
  "${FASTINPO[@]}" env
}

build() {
  if [ "$DRY" = 1 ]; then
    # the CPU machine: the extension is built by `make install`; compile-check the CUDA source for sm_90
    if command -v nvcc >/dev/null; then
      inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
      nvcc -c -std=c++17 -gencode=arch=compute_90,code=sm_90 -Xptxas -v $inc csrc/ddim_step_cuda.cu \
        -o "$LOGS/ddim_step_cuda.o" 2>&1 | tail -n 20 || echo "nvcc compile-check failed (CPU torch headers)" \
        > "$LOGS/build.note"
      rm -f "$LOGS/ddim_step_cuda.o"
    fi
  else
    nv=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    tc=$("$PY" -c "import torch; print((torch.version.cuda or '').split('.')[0])")
    echo "nvcc CUDA major $nv, torch CUDA major $tc"
    [ "$nv" = "$tc" ] || { echo "nvcc ($nv) and torch ($tc) CUDA majors differ" > "$LOGS/build.note"; exit 1; }
    # GPU review item 2: a plain copy cannot import fastinpo.kernels; the editable install maps it and builds _C
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
      2>&1 | tail -n 30
  fi
  "$PY" - <<'PYEOF'
import torch, fastinpo, fastinpo.kernels
from fastinpo import extension
print("fastinpo.kernels from", fastinpo.kernels.__file__)
reason = extension.available_reason([torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")])
print("fastinpo._C:", "loaded" if reason is None else f"NOT usable: {reason}")
assert reason is None, reason
PYEOF
  "${FASTINPO[@]}" env --json > "$RES/env.json" && "${FASTINPO[@]}" env
}

correctness() {
  # GPU review item 1: compiled Triton (the conftest skips CPU-tensor kernel tests and checks gpu tests ran
  # compiled); the op tests on CUDA tensors; the extension's GPU tests. A mismatch fails the stage only.
  if [ "$DRY" = 1 ]; then
    TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -rs \
      --junitxml="$RES/correctness-junit.xml"
  else
    TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/triton tests/test_extension.py -rs \
      --junitxml="$RES/correctness-gpu-junit.xml"; a=$?
    TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -rs \
      --junitxml="$RES/correctness-ops-junit.xml"; b=$?
    [ $a -eq 0 ] && [ $b -eq 0 ]
  fi
}

kernels() {
  if [ "$DRY" = 1 ]; then "$PY" benchmarks/bench_sdxl_kernels.py --smoke --out "$RES"
  else "$PY" benchmarks/bench_sdxl_kernels.py --out "$RES"; fi
}

train_step() {
  if [ "$DRY" = 1 ]; then
    # the UNet smoke (tiny-sd3 has its own stage, train-step-sd3)
    "$PY" benchmarks/bench_train_step.py --smoke --model tiny-sdxl --out "$RES" --pipeline-dir "$SCRATCH/pipes" \
      --repeats 1 --num-steps 2
  else
    # real size (random weights from the real configs), bf16 autocast, SDPA; fastinpo vs the reference step
    common=(--out "$RES" --pipeline-dir "$SCRATCH/pipes" --pairs 1 --repeats 3 --warmup 1 --no-variants)
    "$PY" benchmarks/bench_train_step.py --model sdxl --modes full --methods inpo diffusion-dpo \
      --gradient-checkpointing --tag sdxl-full "${common[@]}"
    "$PY" benchmarks/bench_train_step.py --model sdxl --modes lora --methods inpo inversion-dpo --num-steps 20 \
      --compile --tag sdxl-lora "${common[@]}"
    "$PY" benchmarks/bench_train_step.py --model sd15 --modes full lora --num-steps 20 --tag sd15 "${common[@]}"
  fi
}

train_step_sd3() {
  # SD3.5-medium (the `--arch sd3 --size full` structure: MM-DiT 2.5B, CLIP-L, CLIP-G, no T5; random weights) at
  # 1024 px, B = 1: one Flow-DPO LoRA training step, fastinpo vs the public-structure reference — step time, peak
  # memory (max_memory_allocated above the resident models), and the policy fwd+bwd MFU row. Dry run: tiny-sd3.
  local model=sd3 extra=(--repeats 3 --warmup 1)
  [ "$DRY" = 1 ] && { model=tiny-sd3; extra=(--repeats 1 --warmup 0); }
  "$PY" benchmarks/bench_train_step.py --model $model --modes lora --methods diffusion-dpo --pairs 1 --no-variants \
    --out "$RES" --pipeline-dir "$SCRATCH/pipes" --tag sd3-lora "${extra[@]}"
}

e2e() {
  local w="$SCRATCH/e2e" pipe data res dev
  mkdir -p "$w"
  if [ "$DRY" = 1 ]; then
    pipe="$w/tiny-sdxl"; res=32; dev=cpu
    "${FASTINPO[@]}" make-tiny-pipeline "$pipe" --arch sdxl --resolution $res
  else
    pipe="$SCRATCH/pipes/sdxl"; res=1024; dev=cuda
    [ -f "$pipe/model_index.json" ] || "${FASTINPO[@]}" make-tiny-pipeline "$pipe" --size full --arch sdxl \
      --dtype bfloat16 --device cuda
  fi
  data="$w/data"
  "${FASTINPO[@]}" make-tiny-data "$data" --rows 16 --resolution $((res + 8))
  local prec=bf16; [ "$DRY" = 1 ] && prec='"no"'
  # steps: LoRA to S1 (checkpoint every 2), resume to S2, full and ZeRO-3 S3 each (the dry run: process start-up
  # dominates on the CPU, so fewer)
  local S1=3 S2=4 S3=2; [ "$DRY" = 1 ] && { S1=2; S2=3; S3=1; }
  set_common=(--set "model.path=$pipe" --set "data.path=$data" --set "data.resolution=$res"
              --set "train.mixed_precision=$prec" --set "train.log_every=1" --set "train.progress=false"
              --set "train.device=$dev" --set "method.name=inpo")
  echo "$(date +%T) --- LoRA InPO: $S1 steps, checkpoint every 2"
  "${FASTINPO[@]}" train "${set_common[@]}" --set "lora.rank=4" --set "train.max_steps=$S1" \
    --set "train.checkpoint_every=2" --set "train.output_dir=$w/lora" || exit 1
  ls "$w/lora/checkpoints"
  echo "$(date +%T) --- resume latest to step $S2"
  "${FASTINPO[@]}" train "${set_common[@]}" --set "lora.rank=4" --set "train.max_steps=$S2" \
    --set "train.checkpoint_every=2" --set "train.output_dir=$w/lora" --resume latest || exit 1
  ls "$w/lora/export" || exit 1
  echo "$(date +%T) --- full fine-tuning with gradient checkpointing: $S3 steps (bf16 reference on the GPU)"
  "${FASTINPO[@]}" train "${set_common[@]}" --set "train.max_steps=$S3" --set "model.gradient_checkpointing=true" \
    --set "model.reference_dtype=$([ "$DRY" = 1 ] && echo float32 || echo bfloat16)" \
    --set "train.output_dir=$w/full" || exit 1
  ls "$w/full/export" || exit 1
  echo "$(date +%T) --- DeepSpeed ZeRO-3, world size 1 ($([ "$DRY" = 1 ] && echo gloo || echo NCCL)), LoRA InPO: $S3 steps"
  # one process, no launcher: init_distributed makes the 1-rank group (NCCL on CUDA, gloo on the CPU), on a free
  # port (the default one may be held by another job on a shared machine: the rendezvous then waits forever)
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$port RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  "${FASTINPO[@]}" train "${set_common[@]}" \
    --set "lora.rank=4" --set "train.max_steps=$S3" --set "distributed.backend=deepspeed" \
    --set "distributed.deepspeed_config=zero3" --set "train.output_dir=$w/zero3" || exit 1
  ls "$w/zero3/export" || exit 1
  for d in lora full zero3; do [ -f "$w/$d/metrics.jsonl" ] && cp "$w/$d/metrics.jsonl" "$RES/e2e-$d-metrics.jsonl"; done
  true
}

memory() {
  # issue 15: peak memory of one training step (one pair, gradient checkpointing, Adafactor, float16 reference for
  # full fine-tuning, latents cached first) per model, method, LoRA/full and precision, each case a fresh process:
  # docs/MEMORY.md's GPU rows. SDXL first, its LoRA before/after model.base_dtype (auto = the bf16 base on CUDA vs a
  # float32 base) leading; rows are written as each case finishes. Dry run: tiny pipelines on the CPU.
  local w="$SCRATCH/memory" a
  mkdir -p "$w"
  if [ "$DRY" = 1 ]; then
    "${FASTINPO[@]}" make-tiny-pipeline "$w/tiny-sdxl" --arch sdxl --resolution 32 || exit 1
    "$PY" benchmarks/measure_memory.py table --device cpu --resolution 32 --work "$w" --out "$RES" \
      --pipeline "sdxl=$w/tiny-sdxl" --reference-dtype float32 \
      --cases sdxl:diffusion-dpo:lora:bf16:bfloat16 sdxl:diffusion-dpo:lora:no sdxl:inpo:full:no
    return
  fi
  # per model: its resolution and cases ("method:mode:precision[:base dtype]"), SDXL first
  local -A res=([sdxl]=1024 [sd15]=512)
  local -A cases=(
    [sdxl]="diffusion-dpo:lora:bf16 diffusion-dpo:lora:bf16:float32 diffusion-dpo:full:bf16 inpo:lora:bf16
            diffusion-dpo:lora:fp16 inpo:full:bf16 diffusion-dpo:lora:no diffusion-dpo:full:no"
    [sd15]="diffusion-dpo:lora:bf16 diffusion-dpo:full:bf16 inpo:full:bf16 diffusion-dpo:lora:fp16
            diffusion-dpo:full:fp16 diffusion-dpo:lora:no diffusion-dpo:full:no")
  local failed=0 c
  for a in sdxl sd15; do  # a failed case fails the stage at the end, after the other model's rows
    [ -f "$SCRATCH/pipes/$a/model_index.json" ] || "${FASTINPO[@]}" make-tiny-pipeline "$SCRATCH/pipes/$a" \
      --size full --arch $a --dtype bfloat16 --device cuda || { failed=1; continue; }
    "$PY" benchmarks/measure_memory.py table --device cuda --resolution "${res[$a]}" --work "$w" --out "$RES" \
      --pipeline "$a=$SCRATCH/pipes/$a" --cases $(for c in ${cases[$a]}; do printf '%s ' "$a:$c"; done) || failed=1
  done
  return $failed
}

export -f wheels build correctness kernels train_step train_step_sd3 e2e memory
export PY REPO RES LOGS SITE SCRATCH DRY OUT
# arrays do not cross `bash -c`: each stage re-creates FASTINPO from PY
# (the dry run installs the cp312 wheels only to check them: they are not put on the CPU Python's path)
PRELUDE='FASTINPO=("$PY" -m fastinpo); [ "$DRY" = 1 ] || export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}";'

echo "fastinpo GPU kit: $([ $DRY = 1 ] && echo 'DRY RUN (CPU, tiny sizes)' || echo 'GPU run'), total budget ${TOTAL_S}s, out $OUT"
# budgets: GPU run / dry run (the dry run's are for a loaded 2-core CPU machine)
b() { [ $DRY = 1 ] && echo "$2" || echo "$1"; }
stage wheels      "$(b 40 60)"   "$PRELUDE wheels"
stage build       "$(b 150 120)" "$PRELUDE build"
stage correctness "$(b 100 120)" "$PRELUDE correctness"
stage kernels     "$(b 80 60)"   "$PRELUDE kernels"
stage train-step  "$(b 170 150)" "$PRELUDE train_step"
stage e2e         "$(b 150 360)" "$PRELUDE e2e"
stage memory      "$(b 150 180)" "$PRELUDE memory"  # issue 15: docs/MEMORY.md's GPU rows
stage train-step-sd3 "$(b 150 240)" "$PRELUDE train_step_sd3"  # new (issue 19): last, so it never costs the others

# ---------------------------------------------------------------------------------------------------- summary
{
  echo "fastinpo GPU kit summary ($([ $DRY = 1 ] && echo dry run || echo GPU)) — $(elapsed)s of ${TOTAL_S}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"
  for f in "$RES"/*.csv; do [ -f "$f" ] && echo "rows: $(basename "$f") ($(( $(wc -l < "$f") - 1 )))"; done
  for f in "$RES"/memory-*.md; do [ -f "$f" ] && { echo "$(basename "$f"):"; cat "$f"; }; done
} > "$OUT/summary.txt"
publish
rm -rf "$SCRATCH"
echo
cat "$OUT/summary.txt"
! grep -qP '\t(failed|timeout|skipped)\t' "$OUT/stages.tsv"
