#!/usr/bin/env bash
# Per-GPU throughput of the train step at 1, 2, 4, 8 GPUs of one host, for several mesh layouts.
#   launch/scaling.sh [--dry-run] [OUT.jsonl] [MODEL_ARGS]   e.g. launch/scaling.sh scaling.jsonl size=9b,method=full
# Scaling efficiency = tokens/s/GPU at N / tokens/s/GPU at 1 (BENCHMARKS.md).
# On a CPU machine, CPU=1 fakes the devices: CPU=1 launch/scaling.sh /tmp/s.jsonl  (uses configs/tiny.py)
# --dry-run prints the benchmark commands instead of running them.
set -euo pipefail
DRY_RUN=${DRY_RUN:-}; [ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
OUT=${1:-scaling.jsonl}; ARGS=${2:-size=9b,method=full}
SEQ=${SEQ:-1024}; PER_GPU_BATCH=${PER_GPU_BATCH:-4}
export NCCL_NVLS_ENABLE=0  # NVLink multicast off.
run() {
  if [ -n "$DRY_RUN" ]; then echo "${*@Q}"; else "$@" | tail -1; fi
}
for n in 1 2 4 8; do
  # Layouts: all-FSDP, data x FSDP (FSDP inside pairs), FSDP x tensor (tensor=2).
  layouts="1,$n,1"
  [ $n -ge 4 ] && layouts="$layouts $((n / 2)),2,1 1,$((n / 2)),2"
  for layout in $layouts; do
    IFS=, read d f t <<< "$layout"
    mesh=(--config.mesh.data=$d --config.mesh.fsdp=$f --config.mesh.tensor=$t
          --config.train.batch_size=$((PER_GPU_BATCH * n)) --config.train.seq_len=$SEQ
          --output="$OUT")
    if [ -n "${CPU:-}" ]; then
      run env XLA_FLAGS="--xla_force_host_platform_device_count=$n" JAX_PLATFORMS=cpu \
        python -m gemma_sft_jax.benchmark --config=configs/tiny.py --steps=2 "${mesh[@]}"
    else
      run env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((n - 1)))" \
        python -m gemma_sft_jax.benchmark --config=configs/gemma2.py:$ARGS \
        --config.model.checkpoint= --steps=6 "${mesh[@]}"
    fi
  done
done
