#!/usr/bin/env bash
# Set up fastinpo on a fresh machine: a virtual environment (.venv) with torch, then fastinpo in editable mode
# with its dev extras. Safe to re-run.
#
# torch comes first and on its own: a bare `torch` requirement (or an isolated build environment) would pull a
# multi-GB CUDA build onto a CPU-only machine. Rules:
#   - a torch already importable (e.g. a GPU user's CUDA torch, visible through --system-site-packages) is kept;
#   - otherwise, with an NVIDIA driver present: `pip install torch` (PyPI's default CUDA build);
#   - otherwise (CPU only): torch==2.13.0 (the CPU build on this project's machines).
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

pip_q --upgrade pip setuptools wheel ninja
if "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_SPEC:-}" ]; then
  echo "[install] torch from TORCH_SPEC=$TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_q $TORCH_SPEC
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] NVIDIA GPU found: installing PyPI's CUDA torch"
  pip_q torch
else
  echo "[install] CPU-only machine: installing torch==2.13.0"
  pip_q torch==2.13.0
fi

# DeepSpeed (dev/deepspeed extras) compiles its ops just in time where they are used; building them at install
# needs CUDA. DS_BUILD_OPS=0 gives the pure-Python wheel (ZeRO runs on CPU with gloo, and on GPUs as usual).
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
# --no-build-isolation: setup.py builds against the torch installed above, never a fresh one.
echo "[install] fastinpo[$EXTRAS] (editable)"
pip_q --no-build-isolation -e ".[$EXTRAS]"
# The CLIP BPE vocabulary (for tokenizers built offline) ships in the open-clip-torch wheel; its own requirements
# (torchvision, timm) are not needed and torchvision would not import beside torch 2.13: --no-deps.
pip_q --no-deps open-clip-torch
"$PY" -c "import fastinpo, torch; print(f'[install] fastinpo {fastinpo.__version__} with torch {torch.__version__}')"
