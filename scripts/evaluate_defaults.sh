#!/usr/bin/env bash
# The README's granularity tables: label the quickstart's test split (600 images, 2,400
# questions, seed 0) at every scale with each model, then write the family x scale report.
# Usage: scripts/evaluate_defaults.sh [TRAIN_OUT_DIR] [EVAL_OUT_DIR]
#   models: the shipped tiny-m3 and tiny-mqt, and TRAIN_OUT_DIR/tiny-m3-largest-only/model
#   when scripts/train_defaults.sh has trained it.
set -euo pipefail
cd "$(dirname "$0")/.."
train="${1:-runs/train}"
out="${2:-runs/eval}"
bin=.venv/bin/adaptive-m3
images=600
if [ -f "$out/data/benchmark.json" ] && ! .venv/bin/python -c "import json, sys
sys.exit(json.load(open('$out/data/benchmark.json'))['sizes'] != {'test': $images})"; then
  echo "$out/data holds a test split of another size; delete $out or pass another EVAL_OUT_DIR" >&2
  exit 1
fi
[ -d "$out/data/test" ] || $bin make-benchmark --out "$out/data" --sizes test=$images --seed 0
models=(m3core/checkpoints/tiny-m3 m3core/checkpoints/tiny-mqt)
[ -d "$train/tiny-m3-largest-only/model" ] && models+=("$train/tiny-m3-largest-only/model")
for model in "${models[@]}"; do
  name=$(basename "$model")
  [ "$name" = model ] && name=$(basename "$(dirname "$model")")
  $bin label --model "$model" --data "$out/data/test" --out "$out/$name/labels" --workers 0
  $bin granularity --labels "$out/$name/labels" --out "$out/$name"
done
