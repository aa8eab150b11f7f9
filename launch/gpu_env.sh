# The environment gemma_sft_jax runs with on NVIDIA GPUs. Source it before a run (the GPU
# launchers here do):
#   source launch/gpu_env.sh && python -m gemma_sft_jax.main --config=... --config.mesh.fsdp=2
# - NCCL's NVLink multicast (NVLS) off: it can wedge the GPUs on some drivers and buys nothing here.
# - JAX may take 92% of each GPU's memory (unless XLA_PYTHON_CLIENT_MEM_FRACTION is set).
# - XLA's collective overlap for FSDP and data parallelism: the latency-hiding scheduler, the next
#   scanned layer's all-gather / reduce-scatter / all-reduce started inside the previous iteration,
#   double-buffered loops and larger combined collectives (BENCHMARKS.md, "Two GPUs": Gemma 2 2B
#   full SFT at fsdp=2 keeps 89.5% of one GPU's tokens/s per GPU with them, 84.8% without).
#   Flags already in XLA_FLAGS come after these, so they win.
export NCCL_NVLS_ENABLE=0
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
GEMMA_SFT_JAX_OVERLAP_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true --xla_gpu_enable_while_loop_double_buffering=true \
--xla_gpu_all_gather_combine_threshold_bytes=536870912 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=536870912"
export XLA_FLAGS="$GEMMA_SFT_JAX_OVERLAP_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
