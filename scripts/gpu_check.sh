#!/usr/bin/env bash
# What each scale costs on LLaVA-1.5-7B- and LLaVA-NeXT-7B-shaped models with random weights
# (real widths and depths, nothing downloaded): encode + generate at every scale in bfloat16 on
# CUDA, the ONNX router on onnxruntime's CUDA provider, per-scale latency and throughput, and
# the quickstart's routed scale mix as a ratio to the largest scale. Without a GPU it runs at
# reduced depth on the CPU and says so (FLOPs are still given for the full depth).
# Usage: scripts/gpu_check.sh [--quickstart runs/quickstart] [bench/gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" bench/gpu_check.py "$@"
