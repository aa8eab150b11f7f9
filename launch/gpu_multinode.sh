#!/usr/bin/env bash
# Multi-node GPU training without SLURM: run this on every node with the same arguments.
#   COORDINATOR=10.0.0.1:1234 NUM_NODES=2 NODE_RANK=0 launch/gpu_multinode.sh --config=... --workdir=...
# jax.distributed.initialize() picks these up from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID (see gemma_sft_jax/runner.py:setup_jax). --dry-run (first) prints the command.
set -euo pipefail
DRY_RUN=${DRY_RUN:-}; [ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
export JAX_NUM_PROCESSES=${NUM_NODES:?set NUM_NODES}
export JAX_PROCESS_ID=${NODE_RANK:?set NODE_RANK}
source "$(dirname "$0")/gpu_env.sh"  # NVLink multicast off, memory fraction, collective overlap.
cmd=(python -m gemma_sft_jax.main "$@")
if [ -n "$DRY_RUN" ]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
       "JAX_PROCESS_ID=$JAX_PROCESS_ID NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE" \
       "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS=${XLA_FLAGS@Q}" \
       "${cmd[*]@Q}"
  exit 0
fi
exec "${cmd[@]}"
