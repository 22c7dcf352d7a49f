#!/usr/bin/env bash
# Reproduce the shipped tiny models: the benchmark's train split, then the three recipes
# (M3, the largest-scale-only baseline and MQT share the M3 run's vision tower).
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
vision="$out/tiny-m3/00-vision/model"
for recipe in tiny-m3-largest-only tiny-mqt; do
  $bin train-lmm --config "$recipe" --data "$out/bench/train" --eval-data "$out/bench/calib" \
    --out "$out/$recipe" --vision-from "$vision"
done
