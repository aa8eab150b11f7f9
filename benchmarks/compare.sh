#!/usr/bin/env bash
# The comparison behind BENCHMARKS.md: transformers and gemma_sft_jax on the same GPU, one run,
# batch 8 x 512, random init; JSON lines appended to OUT (see hf_baseline.py and
# gemma_sft_jax/benchmark.py for the fields).
#   benchmarks/compare.sh OUT.jsonl one        # both frameworks, one GPU (2B full, 9B LoRA, 9B full)
#   benchmarks/compare.sh OUT.jsonl hf|ours    # one framework only (e.g. each on its own GPU of a
#                                              # two-GPU host at the same time)
#   benchmarks/compare.sh OUT.jsonl fsdp2      # gemma_sft_jax on two GPUs, mesh.fsdp=2, 8 x 512 per GPU
set -uo pipefail
OUT=$1; MODE=$2
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off.
ours() {  # ours CONFIG_ARGS BATCH [more flags]
  local args=$1 batch=$2; shift 2
  timeout 300 python -m gemma_sft_jax.benchmark --config=configs/gemma2.py:$args \
    --config.model.checkpoint= --config.train.batch_size=$batch --config.train.seq_len=512 \
    --steps=6 --output="$OUT" "$@" 2>&1 | grep -E '^\{|Error' | cut -c1-400
}
hf() {  # hf ARGS...: sdpa where this transformers accepts it for Gemma 2, else eager
  local before; before=$(cat "$OUT" 2>/dev/null | wc -l)
  timeout 300 python benchmarks/hf_baseline.py --batch 8 --seq_len 512 --steps 6 --attn sdpa \
    --output "$OUT" "$@" 2>&1 | grep -E '^\{|error' | cut -c1-400
  if [ "$(cat "$OUT" 2>/dev/null | wc -l)" = "$before" ]; then
    timeout 300 python benchmarks/hf_baseline.py --batch 8 --seq_len 512 --steps 6 --attn eager \
      --output "$OUT" "$@" 2>&1 | grep -E '^\{|error' | cut -c1-400
  fi
}
if [ "$MODE" != fsdp2 ]; then
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  if [ "$MODE" != ours ]; then
    hf --model gemma2_2b --method full --optimizer adamw_fused
    hf --model gemma2_9b --method lora --gradient_checkpointing
    hf --model gemma2_9b --method full --optimizer adamw_8bit --gradient_checkpointing
  fi
  if [ "$MODE" != hf ]; then
    ours size=2b,method=full 8
    ours size=9b,method=lora 8
    ours size=9b,method=full 8
  fi
else
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
  for case in size=2b,method=full size=9b,method=lora size=9b,method=full; do
    ours $case 16 --config.mesh.fsdp=2
  done
fi
