#!/usr/bin/env bash
# Reproduce the shipped tiny models: the benchmark's train split, then the three recipes
# (the largest-scale-only baseline shares the M3 run's vision tower; MQT starts from the
# whole M3 model, its latent queries fresh).
# Usage: scripts/train_defaults.sh [OUT_DIR]   (uses CUDA when present; resumes when re-run)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/train}"
bin=.venv/bin/adaptive-m3
# 64,000 train images: each stage reads the split's first 4,000, 16,000 or all of them ("images"
# in the recipes); images are seeded one by one, so those are the same in any larger split.
if [ -f "$out/bench/benchmark.json" ] && ! .venv/bin/python -c "import json, sys
sys.exit(json.load(open('$out/bench/benchmark.json'))['sizes'].get('train') != 64000)"; then
  echo "$out/bench holds a train split of another size; delete $out/bench or pass another OUT_DIR" >&2
  exit 1
fi
[ -d "$out/bench/train" ] || $bin make-benchmark --out "$out/bench" --sizes train=64000,calib=600
$bin train-lmm --config tiny-m3 --data "$out/bench/train" --eval-data "$out/bench/calib" \
  --out "$out/tiny-m3"
$bin train-lmm --config tiny-m3-largest-only --data "$out/bench/train" \
  --eval-data "$out/bench/calib" --out "$out/tiny-m3-largest-only" \
  --vision-from "$out/tiny-m3/00-vision/model"
$bin train-lmm --config tiny-mqt --data "$out/bench/train" --eval-data "$out/bench/calib" \
  --out "$out/tiny-mqt" --init-from "$out/tiny-m3/model"
