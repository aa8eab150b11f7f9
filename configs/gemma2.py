"""Gemma 2 models (2B/9B/27B): full SFT or LoRA on GSM8K, as the transformers+peft recipe did.

  python -m gemma_sft_jax.main --config=configs/gemma2.py:size=9b,method=lora --workdir=runs/g2_9b_lora
  python -m gemma_sft_jax.main --config=configs/gemma2.py:size=9b,method=full \
      --config.model.checkpoint=/data/gemma-2-9b --workdir=runs/g2_9b_full

Hub ids need HF_TOKEN (Gemma is gated); a local HF directory works offline.
Args: size=2b|9b|27b, method=full|lora.
"""

from gemma_sft_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, size='9b', method='lora')
  if args.size not in ('2b', '9b', '27b'):
    raise ValueError(f'configs/gemma2.py: size={args.size!r} is not one of 2b, 9b, 27b')
  c = config_lib.base_config()
  c.model.checkpoint = f'google/gemma-2-{args.size}'
  c.model.variant = f'gemma2_{args.size}'
  c.model.dtype = 'bfloat16'
  # bf16 params with stochastically rounded updates, int8 Adam states: full SFT of 9B (batch
  # 8 x 512) fits one GPU with room (BENCHMARKS.md).
  c.model.param_dtype = 'bfloat16'
  # Measured on an H200 (BENCHMARKS.md): saving every projection's output ('dots', or by name)
  # is the fastest where it fits (2B full, int8 states: 21 GiB). LoRA saves each projection's
  # output by name instead: 'dots' would keep the base matmul's and the adapter's outputs apart,
  # twice the memory (9B LoRA: 49.2 GiB with 'dots', 35.1 GiB and 2% faster this way). 9B full
  # SFT with scanned layers could not keep them all within 64 GiB ('dots': 68.6 GiB); unrolled,
  # with each layer's backward pass held in its place (below), it keeps all seven at 54.8 GiB.
  # Full SFT keeps attention's output too (with the flash kernels, its log-sum-exp, so the
  # backward pass does not run the forward kernel again): 2B +1.7% for 0.4 GiB, 9B +1.1% and
  # +2.0% in two calls for 1.1 GiB (55.9 GiB). 9B LoRA gained 0.8% for 1.3 GiB that way (not
  # kept).
  projections = 'save:q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
  c.model.remat = {('2b', 'full'): projections + ',attention', ('2b', 'lora'): projections,
                   ('9b', 'lora'): projections, ('9b', 'full'): projections + ',attention',
                   }.get((args.size, args.method), 'full')
  # Logits of the chunked loss in bf16 (statistics in fp32): the head's backward matmuls take a
  # bf16 cotangent and run at bf16 speed (2B full SFT: 17,108 vs 15,448 tokens/s on an H200).
  c.model.logits_dtype = 'bfloat16'
  # The loss's bf16 logits (2 GiB per 4096 tokens) kept for the backward pass instead of running
  # the head's forward matmul again: 1-3% faster on an H200 (2B full, 9B LoRA, 9B full); 9B full
  # SFT's peak memory did not move (BENCHMARKS.md).
  c.model.save_loss_logits = True
  # One scanned layer instead of 26-46 unrolled ones: build and compile time stop growing with
  # depth. 2B full SFT unrolls its 26 layers, without jax.checkpoint's CSE barriers: no weight
  # slices copied out of stacked params, no stacked gradients zero-filled, XLA free to keep what
  # the policy would recompute. On an H200 (batch 8 x 512) 5-9% faster than scanned at 29.1
  # instead of 26.3 GiB, for ~50 s of compilation instead of ~10 (BENCHMARKS.md). 9B full SFT
  # unrolls its 42 layers too, each layer's backward pass held in its place
  # (model.remat_after_cotangent, docs/remat.md): 8,514-8,626 tokens/s at 54.8 GiB on an H200
  # (without attention's output kept) against 7,673-7,714 at 63.6 GiB scanned, for 70-110 s of
  # compilation instead of 6-8 (BENCHMARKS.md).
  unrolled = args.method == 'full' and args.size in ('2b', '9b')
  c.model.scan_layers = not unrolled
  c.model.remat_prevent_cse = not unrolled
  c.model.remat_after_cotangent = (args.size, args.method) == ('9b', 'full')
  c.tuning_method = args.method
  c.train.batch_size = 16
  c.train.seq_len = 512
  c.train.steps = 1000
  c.optim.warmup_steps = 50
  # int8 Adam states (bitsandbytes' 8-bit AdamW) where memory is what matters; 2B full SFT keeps
  # bf16 states, as torch's AdamW does for bf16 params (moments in the parameter's dtype), but
  # rounded stochastically (optim.stochastic_rounding) where torch rounds to nearest and its
  # second moment stalls: on an H200 (batch 8 x 512) 2-3% faster than fp32 states, at 26 GiB
  # instead of 36 (BENCHMARKS.md). `--config.optim.state_dtype=float32` keeps fp32 moments.
  c.optim.state_dtype = 'bfloat16' if (args.size, args.method) == ('2b', 'full') else 'int8'
  if args.method == 'full':
    c.optim.lr, c.optim.min_lr = 1e-5, 1e-6
  else:
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.optim.lr, c.optim.min_lr = 2e-4, 2e-5
  c.eval.batch_size = 64
  c.lock()
  return c
