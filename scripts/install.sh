#!/usr/bin/env bash
# Create .venv and install adaptive-m3 with the given extras (e.g. "test").
#
# torch, the way PyTorch's own instructions install it:
#   - a torch the venv (or the machine's python, e.g. a CUDA build) already has is kept;
#   - a machine whose nvidia-smi sees a GPU gets PyPI's default build (CUDA on Linux);
#   - any other machine gets the CPU build, torch==VERSION+cpu, from a local wheel folder when
#     pip is configured with one (PIP_FIND_LINKS or pip config's find-links), else from
#     PyTorch's CPU wheel index. Where neither holds it the script stops before installing
#     anything and says how to go on: it never falls back to the CUDA build (several GB).
# ONNX Runtime: the GPU build where nvidia-smi sees a GPU, else the CPU build, never both.
#
# Settings (environment): PYTHON (default python3), TORCH_VERSION (2.13.0), TORCH_INDEX_URL
# (PyTorch's CPU index, or a mirror of it), ALLOW_CUDA_TORCH=1 (take PyPI's default build on a
# machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv=.venv
py="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
cpu_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

say() { echo "install: $*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1 ort=gpu
else
  gpu=0 ort=cpu
fi

if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    say "creating $venv on $("$py" --version 2>&1), reusing its torch"
    "$py" -m venv --system-site-packages "$venv"
  else
    say "creating $venv on $("$py" --version 2>&1)"
    "$py" -m venv "$venv"
  fi
fi
python="$venv/bin/python"
pip=("$python" -m pip --disable-pip-version-check)
if ! "$python" -c "import sys, pip; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) < (22, 2))"; then
  "${pip[@]}" install -q --upgrade "pip>=22.2"  # --dry-run and --report, used below
fi

# Where pip would take torch==VERSION+cpu from (extra pip arguments: "$@"), asked of pip itself
# so that every place pip reads find-links from counts; prints the wheel's URL, or pip's last
# complaint and fails.
cpu_torch_source() {
  local out err
  err=$(mktemp)
  if out=$("${pip[@]}" install -q --dry-run --no-deps --ignore-installed --retries 0 --timeout 20 \
    --report - "$@" "torch==$torch_version+cpu" 2>"$err"); then
    rm -f "$err"
    echo "$out" | "$python" -c "import json, sys; print(json.load(sys.stdin)['install'][0]['download_info']['url'])"
  else
    grep -v '^WARNING' "$err" | tail -n 1
    rm -f "$err"
    return 1
  fi
}

torch_args=()
if "$python" -c "import torch" 2>/dev/null; then
  say "keeping the installed $("$python" -c 'import torch; print("torch", torch.__version__)')"
elif [ "$gpu" = 1 ] || [ "$(uname -s)" = Darwin ] || [ "${ALLOW_CUDA_TORCH:-0}" = 1 ]; then
  # a GPU machine, macOS (PyPI's build has no CUDA there), or asked for: PyPI's default build
  torch_args=("torch==$torch_version")
  say "torch $torch_version: PyPI's default build"
elif source=$(cpu_torch_source); then  # a wheel folder (or index) pip is configured with
  torch_args=("torch==$torch_version+cpu")
  say "torch $torch_version+cpu (CPU build: no GPU here) from $source"
elif source=$(cpu_torch_source --extra-index-url "$cpu_index"); then
  torch_args=("torch==$torch_version+cpu" --extra-index-url "$cpu_index")
  say "torch $torch_version+cpu (CPU build: no GPU here) from $source"
else
  cat >&2 <<EOF
install: this machine has no GPU, and no CPU build of torch $torch_version is within reach:
  - PyTorch's CPU wheel index $cpu_index did not answer or lacks it, and
  - no wheel folder configured for pip (PIP_FIND_LINKS, pip config's find-links) holds
    torch-$torch_version+cpu for this Python.
  pip said: ${source:-nothing}
No package was installed. To go on, one of:
  PIP_FIND_LINKS=/folder/with/wheels make ...       a folder holding torch-$torch_version+cpu-*.whl
  TORCH_INDEX_URL=https://your-mirror/whl/cpu make ...   a mirror of PyTorch's CPU index
  ALLOW_CUDA_TORCH=1 make ...       PyPI's default build: CUDA, several GB of nvidia-* packages
EOF
  exit 1
fi

say "installing adaptive-m3[${ort}${extras:+,$extras}]${torch_args:+ with ${torch_args[0]}}"
"${pip[@]}" install -q ${torch_args[@]+"${torch_args[@]}"} -e ".[${ort}${extras:+,$extras}]"
case ",$extras," in *,eval,*) "${pip[@]}" install -q --no-deps "lmms-eval==0.7.3" ;; esac  # its deps: the eval extra
"$python" - <<'EOF'
import torch

build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"install: done: torch {torch.__version__} ({build} build) in .venv")
EOF
if [ "$gpu" = 0 ] && "$python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  echo "install: note: this torch is a CUDA build on a machine without a GPU;" \
    "delete .venv and run again for the CPU build" >&2
fi
