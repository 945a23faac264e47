#!/usr/bin/env bash
# Build the wheel set the GPU machine lacks, into .gpu-wheels/ (ignored by git), on this CPU machine.
#
# The GPU image (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, ...) has no network and lacks
# diffusers, deepspeed (and its hjson, pydantic), and open-clip-torch (the CLIP BPE vocabulary file fastinpo's
# tokenizer maker reads). fastinpo itself imports neither datasets nor dacite, so they are not carried.
# Steps:
#   1. download the Python 3.12 manylinux wheels of exactly those packages (--no-deps: each need is named here);
#   2. build deepspeed's pure-Python wheel from its sdist (DS_BUILD_OPS=0: no op compiled at build time);
#   3. check with pip's resolver (--dry-run, Python 3.12, binary only) that the set installs together with the
#      GPU image's pinned versions (scripts/gpu/constraints-gpu-image.txt) and needs nothing else that the image
#      lacks;
#   4. fail past the size budget (default 40 MiB: the working tree that travels is 64 MiB in all);
#   5. print what to carry and the one command that fires the kit.
# Usage: bash scripts/gpu/prepare.sh [--budget-mib N]
set -euo pipefail
cd "$(dirname "$0")/../.."
BUDGET_MIB=40
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-mib) BUDGET_MIB=$2; shift 2 ;;
    *) echo "prepare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
DEST=.gpu-wheels
CONSTRAINTS=scripts/gpu/constraints-gpu-image.txt
# A Python with pip (the project's venv when there: it has torch, which deepspeed's setup.py wants to see).
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }
# Pure-Python and manylinux wheels for CPython 3.12 on x86-64 (the GPU machine's python3).
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any)
# What the GPU image lacks, pinned (the versions this project is tested with on the CPU machine).
WHEELS=(
  diffusers==0.42.1        # model classes, schedulers (pure Python)
  importlib_metadata==8.7.0  # diffusers needs it; the image has zipp but not importlib-metadata (9+ wants lazy-importer)
  hjson                    # deepspeed
  pydantic==2.12.5         # deepspeed's config classes
  pydantic-core==2.41.5
  annotated-types
  typing-inspection
  open-clip-torch==3.2.0   # only its bpe_simple_vocab_16e6.txt.gz (fastinpo never imports open_clip)
)
DEEPSPEED=deepspeed==0.19.8

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
echo "[prepare] downloading ${#WHEELS[@]} wheels for CPython 3.12 manylinux x86-64 into $DEST"
pip_ download --quiet --no-deps "${PLATFORM[@]}" -d "$DEST.tmp" "${WHEELS[@]}"
echo "[prepare] building the pure-Python $DEEPSPEED wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 pip_ wheel --quiet --no-deps --no-build-isolation -w "$DEST.tmp" "$DEEPSPEED"
# Keep one version of each package: two stop the install on the GPU machine.
dups=$(ls "$DEST.tmp" | sed -E 's/-[0-9].*//' | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "[prepare] FAIL: several versions of: $dups" >&2; exit 1; fi

echo "[prepare] resolver check against the GPU image's packages and versions (scripts/gpu/check_wheels.py)"
"$PY" scripts/gpu/check_wheels.py "$DEST.tmp" --no-deps-wheel open-clip-torch
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
size_mib=$(( (size_kib + 1023) / 1024 ))
ls -l "$DEST" | tail -n +2 | awk '{printf "  %8.2f MiB  %s\n", $5/1048576, $9}'
echo "[prepare] wheel set: ${size_mib} MiB (budget ${BUDGET_MIB} MiB)"
if [ "$size_kib" -gt $(( BUDGET_MIB * 1024 )) ]; then
  echo "[prepare] FAIL: the wheel set is over its ${BUDGET_MIB} MiB budget (the whole tree that travels is 64 MiB)" >&2
  exit 1
fi
cat <<MSG
[prepare] ready. Carry .gpu-wheels and fire the kit with ONE device-tool call:
  run(command="bash scripts/gpu/run.sh", carry=[".gpu-wheels"], timeout_s=600)
  (run.sh keeps itself under 8 minutes by its own clock; its summary table is printed last.)
MSG
