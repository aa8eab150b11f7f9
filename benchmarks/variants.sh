#!/usr/bin/env bash
# Variants of the JAX train step on one GPU (batch 8 x 512, random init), one JSON line each:
#   benchmarks/variants.sh OUT.jsonl NAME...     NAME in the table below
# Each line carries the variant's name in "tag"; --breakdown adds forward+backward and update times.
set -uo pipefail
OUT=$1; shift
COMMON="--config.model.checkpoint= --config.train.batch_size=8 --config.train.seq_len=512 --output=$OUT"
declare -A V=(
  [2b_full_none_f32]="--config=configs/gemma2.py:size=2b,method=full --config.model.remat=none --config.model.logits_dtype=float32 --breakdown"
  [2b_full_none_bf16]="--config=configs/gemma2.py:size=2b,method=full --config.model.remat=none --config.model.logits_dtype=bfloat16 --breakdown"
  [2b_full_dots_bf16]="--config=configs/gemma2.py:size=2b,method=full --config.model.remat=dots --config.model.logits_dtype=bfloat16"
  [9b_full_full_bf16]="--config=configs/gemma2.py:size=9b,method=full --config.model.remat=full --config.model.logits_dtype=bfloat16 --breakdown --steps=6"
  [9b_full_dots_bf16]="--config=configs/gemma2.py:size=9b,method=full --config.model.remat=dots --config.model.logits_dtype=bfloat16 --steps=6"
  [9b_lora_dots_bf16]="--config=configs/gemma2.py:size=9b,method=lora --config.model.remat=dots --config.model.logits_dtype=bfloat16 --breakdown --steps=6"
  [9b_lora_none_bf16]="--config=configs/gemma2.py:size=9b,method=lora --config.model.remat=none --config.model.logits_dtype=bfloat16 --steps=6"
)
for name in "$@"; do
  echo "== $name" >&2
  timeout 240 python -m gemma_sft_jax.benchmark ${V[$name]} $COMMON --tag=$name 2>&1 | grep -E '^\{|compiled step|Error|error|RESOURCE' | cut -c1-600
done

