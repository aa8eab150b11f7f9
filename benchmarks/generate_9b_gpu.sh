#!/usr/bin/env bash
# Gemma 2 9B generation speed on a two-GPU host (random init, 1,319 prompts of the 8-shot
# length: a 1,058-token shared prefix + 26..192 own tokens, 256 new tokens each):
#   benchmarks/generate_9b_gpu.sh OUTDIR
# GPU 0: scanned decode (--nounroll), 128 slots, twice (the second with a warm compilation cache).
# GPU 1: unrolled decode (the default), 128 then 256 slots. One JSON line per run in
# OUTDIR/generate.jsonl (generate_speed.py), logs beside it.
set -uo pipefail
OUT=$1; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=.92
G() {
  timeout 150 python3 "$(dirname "$0")/generate_speed.py" --config=configs/gemma2.py:size=9b,method=full \
    --config.model.checkpoint= --tokenizer= --prefix=1058 --suffix=26,192 \
    --output="$OUT/generate.jsonl" "$@"
}
(export CUDA_VISIBLE_DEVICES=0
 G --batch=128 --nounroll --tag=shared_stacked_128_cold > "$OUT/s1.log" 2>&1; echo "s1 rc=$?"
 G --batch=128 --nounroll --tag=shared_stacked_128_warm > "$OUT/s2.log" 2>&1; echo "s2 rc=$?") &
(export CUDA_VISIBLE_DEVICES=1
 G --batch=128 --tag=shared_unrolled_128_cold > "$OUT/u1.log" 2>&1; echo "u1 rc=$?"
 G --batch=256 --tag=shared_unrolled_256_cold > "$OUT/u2.log" 2>&1; echo "u2 rc=$?") &
wait
