#!/usr/bin/env bash
# The train-step comparison on one host with two H200s, in one go:
#   benchmarks/compare_x2.sh OUT.jsonl
# 1. gemma_sft_jax on GPU 0 and transformers on GPU 1 at the same time (compare.sh ours / hf: each
#    framework has a GPU of its own, same machine, same run).
# 2. gemma_sft_jax at mesh.fsdp=2 over both GPUs (compare.sh fsdp2).
# (For results/bench/2026-11-30-h200.jsonl it also ran the 9B generation benchmark on GPU 1
# first, stacked then unrolled decode; generate_9b_gpu.sh does that now.)
set -uo pipefail
OUT=$1
HERE=$(dirname "$0")
CUDA_VISIBLE_DEVICES=1 bash "$HERE/compare.sh" "$OUT" hf &
CUDA_VISIBLE_DEVICES=0 bash "$HERE/compare.sh" "$OUT" ours
wait
bash "$HERE/compare.sh" "$OUT" fsdp2
