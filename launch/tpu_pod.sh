#!/usr/bin/env bash
# Runs the same command on every worker of a TPU pod slice; jax.distributed.initialize() finds the
# coordinator itself on TPU VMs. Usage:
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- --config=configs/gemma2.py:size=9b,method=full \
#       --workdir=gs://bucket/run
# Each worker clones REPO (default: this checkout's `origin` remote) at REV (default: this
# checkout's commit) into ~/gemma_sft_jax and installs it. --dry-run prints the gcloud commands.
set -euo pipefail
DRY_RUN=${DRY_RUN:-}; [ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
TPU=${1:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- MAIN_ARGS}
ZONE=${2:?usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE -- MAIN_ARGS}
shift 2; [ "${1:-}" = "--" ] && shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPO=${REPO:-$(git -C "$HERE" remote get-url origin 2>/dev/null || true)}
REV=${REV:-$(git -C "$HERE" rev-parse HEAD 2>/dev/null || true)}
if [ -z "$REPO" ] || [ -z "$REV" ]; then
  echo "error: set REPO=<git URL the workers can clone> and REV=<commit> (this checkout has no" \
       "origin remote or commit to default to)" >&2
  exit 2
fi
run() {
  if [ -n "$DRY_RUN" ]; then echo "${*@Q}"; else "$@"; fi
}
setup="set -e; [ -d ~/gemma_sft_jax ] || git clone -q ${REPO@Q} ~/gemma_sft_jax;"
setup+=" cd ~/gemma_sft_jax && git fetch -q origin && git checkout -q ${REV@Q};"
setup+=" python3 -m pip install -q -e '.[tpu]'"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$setup"
# The local HF_TOKEN (gated checkpoints) goes with the command; a dry run does not print it.
token=${HF_TOKEN:-}; [ -n "$DRY_RUN" ] && [ -n "$token" ] && token='<HF_TOKEN>'
# Every worker runs the same program; each reads only its own slice of data and weights.
run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd ~/gemma_sft_jax && HF_TOKEN=${token@Q} python3 -m gemma_sft_jax.main ${*@Q}"
