#!/usr/bin/env bash
# Where a train step's device time goes, with the optimized HLO to name each fusion:
#   benchmarks/profile_gpu.sh OUTDIR CASE [CASE...]     CASE: 2b_full | 9b_lora | 9b_full
# For each case: one benchmark JSON line (OUTDIR/bench.jsonl), a 3-step trace summed by kernel
# (OUTDIR/trace.jsonl, benchmarks/trace_top.py) and the step's optimized HLO
# (OUTDIR/hlo_CASE.txt.gz), which benchmarks/fusion_table.py joins with the trace.
# Extra benchmark flags go in BENCH_FLAGS (e.g. a variant to profile, or --config.mesh.fsdp=2),
# the global batch in BATCH (default 8), a label in TAG. The trace is read for device 0.
set -uo pipefail
OUT=$1; shift
mkdir -p "$OUT"
declare -A CFG=(
  [2b_full]="size=2b,method=full"
  [9b_lora]="size=9b,method=lora"
  [9b_full]="size=9b,method=full"
)
for case in "$@"; do
  dump=$(mktemp -d); trace=$(mktemp -d)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
    timeout 400 python3 -m gemma_sft_jax.benchmark --config=configs/gemma2.py:${CFG[$case]} \
      --config.model.checkpoint= --config.train.batch_size=${BATCH:-8} --config.train.seq_len=512 --steps=6 \
      --profile="$trace" --tag="${TAG:-profile}_$case" --output="$OUT/bench.jsonl" ${BENCH_FLAGS:-} \
      2>&1 | grep -E '^\{|compiled step|Error|error' | cut -c1-300
  python3 benchmarks/trace_top.py "$trace" --top 25 --tag="${TAG:-profile}_$case" --device 0 \
    --json "$OUT/trace.jsonl"
  hlo=$(ls -S "$dump"/*after_optimizations.txt 2>/dev/null | head -1)
  [ -n "$hlo" ] && gzip -c "$hlo" > "$OUT/hlo_${TAG:-profile}_$case.txt.gz"
  rm -rf "$dump" "$trace"
done
