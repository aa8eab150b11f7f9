#!/usr/bin/env bash
# Variants of the JAX train step (random init, 512 tokens per row), one JSON line each:
#   benchmarks/variants.sh OUT.jsonl NAME...     NAME in the table below
# Each line carries the variant's name in "tag"; --breakdown adds forward+backward and update
# times. Variants ending in _fsdp2 use two GPUs (8 rows per GPU); the others one (8 rows).
# XLA_FLAGS of a variant (FLAGS below) are added to the environment's; ENVS sets other variables.
# Each run may take TIMEOUT seconds (default 300).
set -uo pipefail
OUT=$1; shift
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off.
COMMON="--config.model.checkpoint= --config.train.seq_len=512 --output=$OUT --steps=6"
B8="--config.train.batch_size=8"
B16="--config.train.batch_size=16 --config.mesh.fsdp=2"
G2B="--config=configs/gemma2.py:size=2b,method=full"
L9B="--config=configs/gemma2.py:size=9b,method=lora"
F9B="--config=configs/gemma2.py:size=9b,method=full"
# 9B full SFT as its config was before 2026-12-01's unrolled default (scanned, up_proj recomputed):
# the 9B full-SFT variants measured before then run on it, so they keep their meaning.
F9S="$F9B --config.model.scan_layers=true --config.model.remat_prevent_cse=true \
 --config.model.remat_after_cotangent=false --config.model.remat=save:q_proj,k_proj,v_proj,o_proj,down_proj,gate_proj"
UNROLLED="--config.model.scan_layers=false"
SAVE7="save:q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every projection's output (remat save:NAME,...)
# Collective overlap for FSDP: the latency-hiding scheduler, collectives of the next scanned layer
# started inside the previous iteration, and larger combined collectives.
OVERLAP="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true \
 --xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true \
 --xla_gpu_enable_pipelined_all_reduce=true --xla_gpu_enable_while_loop_double_buffering=true \
 --xla_gpu_all_gather_combine_threshold_bytes=536870912 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=536870912"
declare -A V=(
  # 2026-11-29 levers (results/bench/2026-11-29-h200-variants.jsonl).
  [2b_full_none_f32]="$G2B $B8 --config.model.remat=none --config.model.logits_dtype=float32 --breakdown"
  [2b_full_none_bf16]="$G2B $B8 --config.model.remat=none --config.model.logits_dtype=bfloat16 --breakdown"
  [2b_full_dots_bf16]="$G2B $B8 --config.model.remat=dots --config.model.logits_dtype=bfloat16"
  [9b_full_full_bf16]="$F9S $B8 --config.model.remat=full --config.model.logits_dtype=bfloat16 --breakdown"
  [9b_full_dots_bf16]="$F9S $B8 --config.model.remat=dots --config.model.logits_dtype=bfloat16"
  [9b_lora_dots_bf16]="$L9B $B8 --config.model.remat=dots --config.model.logits_dtype=bfloat16 --breakdown"
  [9b_lora_none_bf16]="$L9B $B8 --config.model.remat=none --config.model.logits_dtype=bfloat16"
  # The configs' defaults, and single levers on them.
  [2b_full]="$G2B $B8 --breakdown"
  [2b_full_unrolled]="$G2B $B8 $UNROLLED"
  [2b_full_no_triton_gemm]="$G2B $B8"
  [9b_lora]="$L9B $B8"
  [9b_lora_unrolled]="$L9B $B8 $UNROLLED"
  # Unrolled layers without jax.checkpoint's CSE barriers (model.remat_prevent_cse=false; the
  # 2B full-SFT default since 2026-12-01, which 2b_full_scanned undoes).
  [2b_full_scanned]="$G2B $B8 --config.model.scan_layers=true --config.model.remat_prevent_cse=true"
  [2b_full_unrolled_nocse]="$G2B $B8 $UNROLLED --config.model.remat_prevent_cse=false"
  [9b_full_unrolled]="$F9S $B8 $UNROLLED"
  [9b_full_unrolled_nocse]="$F9S $B8 $UNROLLED --config.model.remat_prevent_cse=false"
  [9b_lora_unrolled_nocse]="$L9B $B8 $UNROLLED --config.model.remat_prevent_cse=false"
  # Unrolled 9B full SFT, each layer's backward pass held in its place (model.remat_after_cotangent),
  # with the policy 9B full SFT had scanned (up_proj recomputed) or saving all seven projections
  # (since 2026-12-01 the 9B full default, which 9b_full runs).
  [9b_full_unrolled_after_cotangent]="$F9S $B8 $UNROLLED --config.model.remat_after_cotangent=true"
  [9b_full_unrolled_after_cotangent_save_projections]="$F9S $B8 $UNROLLED --config.model.remat_after_cotangent=true --config.model.remat=$SAVE7"
  # Unrolled 9B full SFT with remat_after_cotangent and all seven projections saved, keeping
  # attention's output and log-sum-exp too (the default since the side-by-side call final15) or
  # not (the default before it).
  [9b_full_save_attention_after_cotangent]="$F9B $B8 --config.model.remat=$SAVE7,attention"
  [9b_full_save_projections_after_cotangent]="$F9B $B8 --config.model.remat=$SAVE7"
  # Unrolled 9B full SFT without the barriers, XLA's scheduler told to aim at less memory
  # (xla_gpu_memory_limit_slop_factor: percent of the device's memory left after the arguments).
  [9b_full_unrolled_nocse_slop30]="$F9S $B8 $UNROLLED --config.model.remat_prevent_cse=false"
  [9b_full]="$F9B $B8 --breakdown"
  # Attention: the einsum path instead of the flash kernels ('auto' takes them on GPU).
  [2b_full_einsum]="$G2B $B8 --config.model.attention=einsum --breakdown"
  [9b_lora_einsum]="$L9B $B8 --config.model.attention=einsum"
  [9b_full_einsum]="$F9S $B8 --config.model.attention=einsum --breakdown"
  # Attention's output (and the flash kernels' log-sum-exp) kept for the backward pass.
  [9b_lora_save_attention]="$L9B $B8 --config.model.remat=$SAVE7,attention"
  [2b_full_save_projections]="$G2B $B8 --config.model.remat=$SAVE7"
  [2b_full_save_attention]="$G2B $B8 --config.model.remat=$SAVE7,attention"
  [9b_full_save_attention]="$F9S $B8 --config.model.remat=save:q_proj,k_proj,v_proj,o_proj,down_proj,gate_proj,attention"
  [2b_full_fsdp2]="$G2B $B16"
  [2b_full_fsdp2_overlap]="$G2B $B16"
  [9b_lora_fsdp2]="$L9B $B16"
  [9b_lora_fsdp2_overlap]="$L9B $B16"
  [9b_full_fsdp2_overlap]="$F9S $B16"
  # 9B full SFT as configured since 2026-12-01 (unrolled, remat_after_cotangent) at fsdp=2, with
  # the overlap flags (9b_full_fsdp2_overlap keeps the scanned config it was measured with).
  [9b_full_unrolled_fsdp2_overlap]="$F9B $B16"
  [2b_full_fsdp2_nccl_simple]="$G2B $B16"
  [2b_full_data2]="$G2B --config.train.batch_size=16 --config.mesh.data=2 --config.mesh.fsdp=1"
  [2b_full_data2_overlap]="$G2B --config.train.batch_size=16 --config.mesh.data=2 --config.mesh.fsdp=1"
  [9b_lora_slice_fusion]="$L9B $B8"
  [9b_lora_fsdp2_base_fsdp]="$L9B $B16 --config.lora.base_sharding=fsdp"
  # Adam moments in fp32, in bf16 (as torch's AdamW keeps them for bf16 params; the 2B full
  # default), or in int8.
  [2b_full_f32_states]="$G2B $B8 --config.optim.state_dtype=float32 --breakdown"
  [2b_full_bf16_states]="$G2B $B8 --config.optim.state_dtype=bfloat16 --breakdown"
  [2b_full_int8_states]="$G2B $B8 --config.optim.state_dtype=int8 --breakdown"
  # The 8-bit update in XLA instead of the Pallas kernel (optim.update_kernel).
  [9b_full_xla_update]="$F9S $B8 --config.optim.update_kernel=xla --breakdown"
  # 9B full SFT saving one of the two widest projections too (the scanned default of the day recomputed both).
  [9b_full_save_gate]="$F9S $B8 --config.model.remat=save:q_proj,k_proj,v_proj,o_proj,down_proj,gate_proj --breakdown"
  [9b_full_save_up]="$F9S $B8 --config.model.remat=save:q_proj,k_proj,v_proj,o_proj,down_proj,up_proj --breakdown"
  # LoRA saving each projection's output (base + adapter) by name, not every dot ('dots' keeps
  # the base matmul's and the adapter's outputs apart: twice the memory).
  [9b_lora_save_projections]="$L9B $B8 --config.model.remat=$SAVE7 --breakdown"
  [9b_lora_dots]="$L9B $B8 --config.model.remat=dots --breakdown"
  [2b_lora]="--config=configs/gemma2.py:size=2b,method=lora $B8"
  [2b_lora_dots]="--config=configs/gemma2.py:size=2b,method=lora $B8 --config.model.remat=dots"
  [2b_full_int8_states_xla_update]="$G2B $B8 --config.optim.state_dtype=int8 --config.optim.update_kernel=xla --breakdown"
  # The loss's logits recomputed in the backward pass (the default before save_loss_logits), or
  # kept where the config recomputes them.
  [2b_full_recompute_logits]="$G2B $B8 --config.model.save_loss_logits=false"
  [9b_lora_recompute_logits]="$L9B $B8 --config.model.save_loss_logits=false"
  [9b_full_save_logits]="$F9S $B8 --config.model.save_loss_logits=true"
  [9b_full_recompute_logits]="$F9S $B8 --config.model.save_loss_logits=false"
  # launch/gpu_env.sh's collective-overlap flags on one GPU (where there is nothing to overlap).
  [2b_full_overlap]="$G2B $B8"
  [9b_lora_overlap]="$L9B $B8"
  [9b_full_overlap]="$F9S $B8"
  # cuBLAS's legacy gemm instead of cuBLASLt, alone and with XLA's dynamic-slice fusion (which
  # only takes legacy gemms): a scanned layer's weight slice read in place instead of copied.
  [2b_full_legacy_gemm]="$G2B $B8"
  [2b_full_legacy_slice_fusion]="$G2B $B8"
  [9b_lora_legacy_gemm]="$L9B $B8"
  [9b_lora_legacy_slice_fusion]="$L9B $B8"
)
# Environment of a variant.
declare -A ENVS=(
  [2b_full_fsdp2_nccl_simple]="NCCL_PROTO=Simple"
)
declare -A FLAGS=(
  [2b_full_no_triton_gemm]="--xla_gpu_enable_triton_gemm=false"
  [9b_full_unrolled_nocse_slop30]="--xla_gpu_memory_limit_slop_factor=30"
  [2b_full_fsdp2_overlap]="$OVERLAP"
  [9b_lora_fsdp2_overlap]="$OVERLAP"
  [9b_full_fsdp2_overlap]="$OVERLAP"
  [9b_full_unrolled_fsdp2_overlap]="$OVERLAP"
  [2b_full_data2_overlap]="$OVERLAP"
  [2b_full_overlap]="$OVERLAP"
  [9b_lora_overlap]="$OVERLAP"
  [9b_full_overlap]="$OVERLAP"
  [9b_lora_slice_fusion]="--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_while_loop_double_buffering=true"
  [2b_full_legacy_gemm]="--xla_gpu_enable_cublaslt=false"
  [2b_full_legacy_slice_fusion]="--xla_gpu_enable_cublaslt=false --xla_gpu_enable_dynamic_slice_fusion=true"
  [9b_lora_legacy_gemm]="--xla_gpu_enable_cublaslt=false"
  [9b_lora_legacy_slice_fusion]="--xla_gpu_enable_cublaslt=false --xla_gpu_enable_dynamic_slice_fusion=true"
)
for name in "$@"; do
  echo "== $name" >&2
  (  # XLA_FLAGS must be unset rather than blank: XLA reads a blank value as a file name.
    xla_flags=$(echo ${XLA_FLAGS:-} ${FLAGS[$name]:-})
    unset XLA_FLAGS
    if [ -n "$xla_flags" ]; then export XLA_FLAGS="$xla_flags"; fi
    env ${ENVS[$name]:-} timeout ${TIMEOUT:-300} python -m gemma_sft_jax.benchmark ${V[$name]} $COMMON --tag=$name 2>&1 \
      | grep -E '^\{|^F[0-9]{4}|compiled step|Error|error|RESOURCE' | cut -c1-600
  )
done
