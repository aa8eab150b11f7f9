#!/usr/bin/env bash
# Start-up on a GPU with the Gemma 3 270M base (the GGUF at $1, its tokenizer cache beside it):
#   benchmarks/startup_gpu.sh GGUF OUT.jsonl LOGDIR        (SKIP_EVAL=1: the SFT runs only)
# Runs, each as its own process, and appends one JSON line per run (command, JAX compilation
# cache state, wall seconds, exit status): the base evaluation of the full GSM8K test, 0-shot,
# with an empty compilation cache and again with it filled; then a 5-step full SFT with an empty
# cache and again filled (its first step, compilation included, is in the run's metrics and log).
set -uo pipefail
GGUF=$1; OUT=$2; LOGS=$3
mkdir -p "$LOGS"
CACHE=$(mktemp -d)
run() {  # run NAME CACHE_STATE ARGS...
  local name=$1 state=$2; shift 2
  local t0 t1 rc
  t0=$(date +%s.%N)
  JAX_COMPILATION_CACHE_DIR=$CACHE python3 "$@" > "$LOGS/$name.log" 2>&1; rc=$?
  t1=$(date +%s.%N)
  python3 - "$name" "$state" "$rc" "$t0" "$t1" "$*" >> "$OUT" <<'PY'
import datetime, json, sys
name, state, rc, t0, t1, cmd = sys.argv[1:]
print(json.dumps({'run': name, 'compilation_cache': state, 'rc': int(rc),
                  'wall_s': round(float(t1) - float(t0), 2), 'command': 'python3 ' + cmd,
                  'date': datetime.date.today().isoformat(), 'device': 'NVIDIA H200'}))
PY
  tail -1 "$OUT"
}
EVAL="-m gemma_sft_jax.eval --config=configs/gemma3.py:size=270m --config.model.checkpoint=$GGUF --base"
if [ "${SKIP_EVAL:-0}" != 1 ]; then
run eval_cold cold $EVAL --workdir=/tmp/startup_eval_cold
run eval_warm warm $EVAL --workdir=/tmp/startup_eval_warm
fi
SFT="-m gemma_sft_jax.main --config=configs/gemma3.py:size=270m,method=full --config.model.checkpoint=$GGUF --config.train.steps=5 --config.optim.warmup_steps=1 --config.eval.run_base=false --config.eval.run_sft=false"
run sft_cold cold $SFT --workdir=/tmp/startup_sft_cold
run sft_warm warm $SFT --workdir=/tmp/startup_sft_warm
for d in /tmp/startup_sft_cold /tmp/startup_sft_warm; do
  grep -h '"step": 1,' "$d/metrics.jsonl" | head -1
done
