"""A random-init tiny Gemma that trains and evaluates on CPU in seconds, offline.

  python -m gemma_sft_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m gemma_sft_jax.main --config=configs/tiny.py:method=lora,family=gemma2 --workdir=/tmp/tiny_lora

Args: family=gemma3|gemma2, method=full|lora.
"""

import os

from gemma_sft_jax import config as config_lib

# A 64/32-problem slice of GSM8K shipped with the package, so this config runs anywhere offline.
_GSM8K_SAMPLE = os.path.join(os.path.dirname(config_lib.__file__), 'assets', 'gsm8k_sample')


def get_config(arg=None):
  args = config_lib.parse_arg(arg, family='gemma3', method='full')
  c = config_lib.base_config()
  c.model.checkpoint = ''  # random init
  c.model.variant = f'tiny_{args.family}'
  c.model.tokenizer = 'byte'  # a self-contained byte-level tokenizer: no download, no files
  c.tuning_method = args.method
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.data.source = _GSM8K_SAMPLE
  c.data.limit = 0
  c.optim.lr = 3e-3 if args.method == 'full' else 1e-2
  c.optim.min_lr = 3e-4
  c.optim.warmup_steps = 5
  c.optim.state_dtype = 'float32'
  c.train.steps = 40
  c.train.batch_size = 4
  c.train.seq_len = 512  # ~1 byte token per character: the sample's 64 problems all fit.
  c.train.log_every = 5
  c.checkpoint.every_steps = 20
  c.eval.limit = 8
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 32
  c.decode.max_new_tokens = 32
  c.mesh.fsdp = -1
  c.lock()
  return c
