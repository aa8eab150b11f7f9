#!/usr/bin/env bash
# The train-step comparison on one host with two H200s, in one go:
#   benchmarks/compare_x2.sh OUT.jsonl [GEN_OUT.jsonl]
# 1. gemma_sft_jax on GPU 0 and transformers on GPU 1 at the same time (compare.sh ours / hf: each
#    framework has a GPU of its own, same machine, same run); with GEN_OUT, the Gemma 2 9B 8-shot
#    generation benchmark (generate_speed.py) runs on GPU 1 first.
# 2. gemma_sft_jax at mesh.fsdp=2 over both GPUs (compare.sh fsdp2).
set -uo pipefail
OUT=$1; GEN=${2:-}
HERE=$(dirname "$0")
gen() {  # gen TAG FLAGS...: 9B, 8-shot-length random prompts, 256 new tokens, 128 slots
  local tag=$1; shift
  CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=.92 timeout 200 python3 \
    "$HERE/generate_speed.py" --config=configs/gemma2.py:size=9b,method=full \
    --config.model.checkpoint= --tokenizer= --prefix=1058 --suffix=26,192 --batch=128 \
    --output="$GEN" --tag="$tag" "$@" > "${GEN%.jsonl}_$tag.log" 2>&1
  echo "generate $tag rc=$?"; grep -E 'questions,' "${GEN%.jsonl}_$tag.log" | tail -1
}
(
  if [ -n "$GEN" ]; then
    gen 9b_8shot_stacked
    # The unrolled decode only if the stacked one did not finish.
    grep -q '9b_8shot_stacked' "$GEN" 2>/dev/null || gen 9b_8shot_unrolled --unroll
  fi
  CUDA_VISIBLE_DEVICES=1 bash "$HERE/compare.sh" "$OUT" hf
) &
CUDA_VISIBLE_DEVICES=0 bash "$HERE/compare.sh" "$OUT" ours
wait
bash "$HERE/compare.sh" "$OUT" fsdp2
