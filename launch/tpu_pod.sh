#!/usr/bin/env bash
# Runs the same command on every worker of a TPU pod slice; jax.distributed.initialize() finds the
# coordinator itself on TPU VMs. Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config=configs/gemma2.py:size=9b,method=full --workdir=gs://bucket/run
# The repo must be at ~/gemma_sft_jax on each worker (the first command clones/updates it).
set -euo pipefail
TPU=$1; ZONE=$2; shift 2; [ "${1:-}" = "--" ] && shift
REPO=${REPO:-https://github.com/YOUR_ORG/gemma_sft_jax.git}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d ~/gemma_sft_jax ] || git clone $REPO ~/gemma_sft_jax
  cd ~/gemma_sft_jax && git pull -q
  python3 -m pip install -q -e '.[tpu]'
"
# Every worker runs the same program; each reads only its own slice of data and weights.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/gemma_sft_jax && HF_TOKEN=${HF_TOKEN:-} python3 -m gemma_sft_jax.main $*
"
