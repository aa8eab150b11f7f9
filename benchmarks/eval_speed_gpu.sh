#!/usr/bin/env bash
# Evaluation speed on a two-GPU host, gemma_sft_jax on GPU 0 and transformers `generate` on GPU 1
# at the same time (same machine, same questions, greedy, 256 new tokens, batch 128):
#   benchmarks/eval_speed_gpu.sh base GGUF OUTDIR [OLD_TREE]
#       the Gemma 3 270M base (the GGUF, its tokenizer cache beside it), 0-shot and 8-shot; with
#       OLD_TREE (a checkout of an earlier gemma_sft_jax) also the earlier evaluator, for before/after
#   benchmarks/eval_speed_gpu.sh sft GGUF OUTDIR RUNDIR
#       a fine-tune in RUNDIR (trained here first if RUNDIR/final is missing): our 0/8-shot
#       evaluations, its `export --format=hf`, and transformers on that export (its 0-shot on
#       GPU 1 beside ours, its 8-shot on GPU 0 after ours)
# Each evaluation's JSON (seconds, compile_seconds, accuracies, lm_eval) and predictions land in
# OUTDIR/<name>/; transformers appends JSON lines to OUTDIR/hf_generate.jsonl; logs in OUTDIR/*.log.
set -uo pipefail
MODE=$1; GGUF=$2; OUT=$3; EXTRA=${4:-}
mkdir -p "$OUT"
CFG="--config=configs/gemma3.py:size=270m --config.model.checkpoint=$GGUF --config.eval.batch_size=128 --config.eval.max_new_tokens=256"
FEW="--config.eval.prompt_strategy=few_shot --config.eval.num_shots=8"
ours() {  # ours NAME ARGS...: one evaluation on GPU 0
  local name=$1; shift
  local t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=0 python3 -m gemma_sft_jax.eval $CFG "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")" | tee -a "$OUT/wall.txt"
}
hf() {  # hf GPU MODEL NAME ARGS...: transformers generate
  local gpu=$1 model=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/hf_generate.py --model="$model" --batch=128 \
      --max_new_tokens=256 --output="$OUT/hf_generate.jsonl" --predictions="$OUT/hf_$name.jsonl" \
      "$@" > "$OUT/hf_$name.log" 2>&1
  echo "hf_$name rc=$?" | tee -a "$OUT/wall.txt"
}
if [ "$MODE" = base ]; then
  (hf 1 "$GGUF" base_0shot; hf 1 "$GGUF" base_8shot --strategy=few_shot --num_shots=8) &
  ours base_0shot --base --workdir="$OUT/base_0shot"
  ours base_8shot --base --workdir="$OUT/base_8shot" $FEW
  # The same evaluations again in new processes: the compilation cache is now warm.
  ours base_0shot_warm --base --workdir="$OUT/base_0shot_warm"
  ours base_8shot_warm --base --workdir="$OUT/base_8shot_warm" $FEW
  if [ -n "$EXTRA" ]; then
    PYTHONPATH=$EXTRA:${PYTHONPATH:-} ours before_base_0shot --base --workdir="$OUT/before_base_0shot"
    PYTHONPATH=$EXTRA:${PYTHONPATH:-} ours before_base_8shot --base --workdir="$OUT/before_base_8shot" $FEW
  fi
  wait
else
  RUN=$EXTRA
  if [ ! -d "$RUN/final" ]; then
    CUDA_VISIBLE_DEVICES=0 python3 -m gemma_sft_jax.main \
        --config=configs/gemma3.py:size=270m,method=full --config.model.checkpoint="$GGUF" \
        --config.eval.run_base=false --config.eval.run_sft=false --workdir="$RUN" \
        > "$OUT/train.log" 2>&1
    echo "train rc=$?" | tee -a "$OUT/wall.txt"
  fi
  CUDA_VISIBLE_DEVICES=0 python3 -m gemma_sft_jax.export \
      --config=configs/gemma3.py:size=270m,method=full --config.model.checkpoint="$GGUF" \
      --workdir="$RUN" --format=hf --output="$RUN/hf" --dtype=bfloat16 > "$OUT/export.log" 2>&1
  echo "export rc=$?" | tee -a "$OUT/wall.txt"
  # transformers 0-shot on GPU 1 while ours run on GPU 0; then transformers 8-shot on GPU 0.
  hf 1 "$RUN/hf" sft_0shot &
  ours sft_0shot --workdir="$RUN"
  ours sft_8shot --workdir="$RUN" $FEW
  hf 0 "$RUN/hf" sft_8shot --strategy=few_shot --num_shots=8
  wait
  cp "$RUN"/eval_*.json "$RUN"/predictions_* "$RUN"/results.json "$RUN"/metrics.jsonl "$OUT"/ 2>/dev/null
fi
