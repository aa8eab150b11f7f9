#!/usr/bin/env bash
# Gemma 3 270M fine-tunes from a plan file, several at once per GPU:
#   benchmarks/sweep_270m.sh PLAN GGUF OUTDIR [RUNS_PER_GPU=4] [SEED=0]
# PLAN: one run per line, "NAME METHOD OVERRIDES..." (# starts a comment; an override
# --config.train.seed=S replaces SEED). Each run is
#   python -m gemma_sft_jax.main --config=configs/gemma3.py:size=270m,method=METHOD \
#       --config.model.checkpoint=GGUF --config.eval.run_base=false --config.train.seed=SEED \
#       OVERRIDES --workdir=OUTDIR/NAME
# with its log in OUTDIR/NAME/NAME.log. Runs share the GPUs (XLA_PYTHON_CLIENT_PREALLOCATE=false),
# so their step times are not speeds. The weights (final/, checkpoints) are deleted at the end;
# metrics.jsonl, results.json, final.json, the evaluation JSON and predictions stay.
set -uo pipefail
PLAN=$1; GGUF=$2; OUT=$3; PER=${4:-4}; SEED=${5:-0}
NGPU=$(nvidia-smi -L | wc -l)
mkdir -p "$OUT"
i=0
while read -r name method overrides; do
  case "$name" in ''|'#'*) continue ;; esac
  gpu=$(( i % NGPU ))
  seed="--config.train.seed=$SEED"; [[ "$overrides" == *--config.train.seed=* ]] && seed=
  mkdir -p "$OUT/$name"
  ( CUDA_VISIBLE_DEVICES=$gpu XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m gemma_sft_jax.main \
      --config=configs/gemma3.py:size=270m,method=$method --config.model.checkpoint="$GGUF" \
      --config.eval.run_base=false $seed $overrides \
      --workdir="$OUT/$name" > "$OUT/$name/$name.log" 2>&1 < /dev/null
    echo "$name gpu=$gpu rc=$?" ) &
  i=$(( i + 1 ))
  if (( i % (PER * NGPU) == 0 )); then wait; fi
done < "$PLAN"
wait
for d in "$OUT"/*/; do rm -rf "$d/final" "$d/checkpoints"; done
