#!/usr/bin/env bash
# Create .venv and install adaptive-m3 with the given extras (e.g. "test").
# torch: an existing torch (a CUDA build on a GPU machine) is kept; otherwise the CPU wheel
# 2.13.0 is installed, so a CPU machine never pulls CUDA packages. ONNX Runtime: the GPU build
# where nvidia-smi sees a GPU, else the CPU build, never both.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv=.venv
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    "$py" -m venv --system-site-packages "$venv"   # reuse the machine's torch build
  else
    "$py" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ort=gpu; else ort=cpu; fi
"${pip[@]}" -e ".[${ort}${extras:+,$extras}]"
case ",$extras," in *,eval,*) "${pip[@]}" --no-deps "lmms-eval==0.7.3" ;; esac  # deps: the eval extra
