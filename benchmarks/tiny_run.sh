#!/usr/bin/env bash
# The README's first command on this machine, timed: the tiny main job with an empty JAX
# compilation cache, then rerun (fresh workdir) with the cache it filled. One JSON line per run:
#   benchmarks/tiny_run.sh OUT.jsonl
set -euo pipefail
OUT=$1
CACHE=$(mktemp -d); WORK=$(mktemp -d)
for state in cold warm; do
  t0=$(date +%s.%N)
  JAX_COMPILATION_CACHE_DIR=$CACHE python -m gemma_sft_jax.main --config=configs/tiny.py \
    --workdir="$WORK/$state" > "$WORK/$state.log" 2>&1
  t1=$(date +%s.%N)
  python - "$WORK/$state" "$state" "$t0" "$t1" >> "$OUT" <<'PY'
import datetime, json, os, sys
workdir, state, t0, t1 = sys.argv[1:]
with open(os.path.join(workdir, 'metrics.jsonl')) as f:
  rows = [json.loads(line) for line in f if line.strip()]
losses = [r for r in rows if 'loss' in r]
with open(os.path.join(workdir, 'results.json')) as f:
  results = json.load(f)
print(json.dumps({
    'command': 'python -m gemma_sft_jax.main --config=configs/tiny.py --workdir=DIR',
    'compilation_cache': state, 'wall_s': round(float(t1) - float(t0), 2),
    'train_seconds': results['train']['train_seconds'],
    'loss_first': losses[0]['loss'], 'loss_last': losses[-1]['loss'],
    'step_last': losses[-1]['step'],
    'base_flexible_accuracy': results['base']['flexible_accuracy'],
    'sft_flexible_accuracy': results['sft']['flexible_accuracy'],
    'load_average': os.getloadavg()[0], 'cpus': os.cpu_count(),
    'date': datetime.date.today().isoformat()}))
PY
  tail -1 "$OUT"
done
