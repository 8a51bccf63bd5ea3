#!/usr/bin/env bash
# `make demo`: a real end-to-end run of what exists today on the built-in tiny preset.
# Random Llama (directly sharded init) -> export to HF safetensors -> import back -> logit check against
# transformers on a short and a 500-token prompt. Later issues extend this to data, training and evaluation.
set -euo pipefail
OUT=${1:-runs/demo}
OMNIMOL=${OMNIMOL:-.venv/bin/omnimol}
rm -rf "$OUT" && mkdir -p "$OUT"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=4}"

echo "== omnimol info (tiny preset, mesh data=2 fsdp=2)"
$OMNIMOL info --config configs/base.yaml mesh.data=2 mesh.fsdp=2 --shardings | tail -n 8
echo "== omnimol init: random tiny Llama, sharded over 4 CPU devices"
$OMNIMOL init --config configs/base.yaml mesh.data=2 mesh.fsdp=2 model.rope_type=llama3 model.rope_factor=8.0 \
  model.rope_original_max_position_embeddings=64 --out "$OUT/random_ckpt"
echo "== omnimol export-hf"
$OMNIMOL export-hf --checkpoint "$OUT/random_ckpt" --out "$OUT/hf" --max-shard-size 200KB
echo "== omnimol import-hf"
$OMNIMOL import-hf --hf "$OUT/hf" --out "$OUT/reimported_ckpt"
echo "== omnimol check-hf: our logits vs transformers.LlamaForCausalLM"
$OMNIMOL check-hf --checkpoint "$OUT/reimported_ckpt" --hf "$OUT/hf" --tolerance 1e-4 | tee "$OUT/logit_check.json"
echo "demo outputs in $OUT: random_ckpt/ hf/ reimported_ckpt/ logit_check.json"
