r"""PyTorch/transformers train-step baseline, the reference `python -m gemma_sft_jax.benchmark` is
compared against.

A standalone torch-only script (it does not import gemma_sft_jax or jax). It builds a randomly
initialised Gemma 2 in bf16 straight on the device (no hub access: the config is built in code),
optionally wraps it in a peft LoRA, and times the plain eager training step on random full-length
rows: forward with labels, loss.backward(), optimizer.step(), zero_grad(set_to_none=True).

Needs `pip install -e '.[bench]'` (torch, peft, bitsandbytes, accelerate) on a CUDA machine:

  # Full SFT of Gemma 2 2B, the settings of the JAX benchmark's default run.
  python benchmarks/hf_baseline.py --model gemma2_2b --method full --batch 8 --seq_len 512 \
      --output results/hf_baseline.jsonl
  # LoRA (r=16, alpha=32, all attention and MLP projections) of Gemma 2 9B.
  python benchmarks/hf_baseline.py --model gemma2_9b --method lora --output results/hf_baseline.jsonl
  # Full SFT of 9B with 8-bit AdamW states and activation checkpointing.
  python benchmarks/hf_baseline.py --model gemma2_9b --method full --optimizer adamw_8bit \
      --gradient_checkpointing --output results/hf_baseline.jsonl
  # CPU smoke run on a tiny random Gemma 2.
  python benchmarks/hf_baseline.py --model tiny --device cpu --batch 2 --seq_len 16 --steps 2

Prints one JSON line (and appends it to --output): the median step time over --steps timed steps
after 2 warm-up steps, tokens/s (batch * seq_len / median step; like the JAX benchmark it counts
every input position, although transformers' shifted loss scores seq_len - 1 of them), the first
step's time, peak allocated CUDA memory (torch.cuda.max_memory_allocated; 0 on CPU; the states of
paged_adamw_8bit live in CUDA unified memory and are not counted there), the parameter counts, the
last loss, the dtype the optimizer stores its moments in (`state_dtype`, read from its state after
the steps) and the library versions.

Attention: transformers' Gemma 2 applies the attention-logit softcap (50) only in its eager,
flex_attention and flash-attention kernels. transformers 5 refuses `sdpa` for Gemma 2 outright, so
`--attn eager` is the default; `--attn flex_attention` is the fused softcapping kernel on CUDA (its
first step includes torch.compile). A kernel this transformers does not support for Gemma 2 is a
one-line error.

Optimizers: `adamw_fused` is torch.optim.AdamW(fused=True), whose moments take their parameter's
dtype: bf16 moments of the bf16 params, rounded to nearest; `adamw_8bit` is
bitsandbytes.optim.AdamW8bit (8-bit block-wise moments in device memory, not paged);
`paged_adamw_8bit` is bitsandbytes.optim.PagedAdamW8bit (the same, its states in CUDA unified
memory that can page out to host). All run with weight_decay 0 and betas (0.9, 0.999).
Full SFT trains every parameter in bf16, as the PyTorch recipe does; peft keeps the LoRA factors in
fp32 (its default autocast_adapter_dtype) over the frozen bf16 base.

Bad combinations (a missing peft or bitsandbytes, CUDA requested but absent, a paged optimizer or
flex_attention backward on CPU, an unsupported attention kernel) exit with status 2 and one line on
stderr.
"""

import argparse
import datetime
import importlib
import json
import math
import statistics
import sys
import time

import torch
import transformers

# Gemma 2 sizes from the published config.json of google/gemma-2-2b and google/gemma-2-9b (the same
# numbers as VARIANTS['gemma2_2b'/'gemma2_9b'] in gemma_sft_jax/model/architecture.py). Shared by all
# of them: vocab 256000, head_dim 256, attention/final logit softcaps 50/30, sliding window 4096 on
# every other layer (starting with the first), RoPE base 10000, RMSNorm eps 1e-6, GELU (tanh),
# tied embeddings. `tiny` is a small random Gemma 2 for CPU tests; its window 8 is shorter than
# the test's rows, so the sliding-window path runs too.
_COMMON = dict(vocab_size=256_000, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
               rope_parameters={'rope_type': 'default', 'rope_theta': 10_000.0},
               hidden_activation='gelu_pytorch_tanh', max_position_embeddings=8192,
               tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
MODELS = {
    'gemma2_2b': dict(_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4),
    'gemma2_9b': dict(_COMMON, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8),
    'tiny': dict(_COMMON, vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 query_pre_attn_scalar=16, sliding_window=8),
}
LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
WARMUP_STEPS = 2


class BenchError(Exception):
  """A bad combination of options or a missing dependency; main() prints it and exits 2."""


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', choices=sorted(MODELS), default='gemma2_2b')
  p.add_argument('--method', choices=['full', 'lora'], default='full')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=512)
  p.add_argument('--steps', type=int, default=8,
                 help=f'timed steps, after {WARMUP_STEPS} warm-up steps')
  p.add_argument('--optimizer', choices=['adamw_fused', 'adamw_8bit', 'paged_adamw_8bit'],
                 default='adamw_fused')
  p.add_argument('--gradient_checkpointing', action='store_true',
                 help='recompute each decoder layer in the backward pass (non-reentrant)')
  p.add_argument('--attn', choices=['eager', 'sdpa', 'flex_attention'], default='eager',
                 help='transformers attn_implementation (Gemma 2 in transformers 5 refuses sdpa)')
  p.add_argument('--lora_rank', type=int, default=16)
  p.add_argument('--lora_alpha', type=int, default=32)
  p.add_argument('--lr', type=float, default=1e-5)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--device', choices=['cuda', 'cpu'],
                 default='cuda' if torch.cuda.is_available() else 'cpu')
  p.add_argument('--output', default=None, help='append the JSON line to this file')
  args = p.parse_args(argv)
  for name in ('batch', 'seq_len', 'steps', 'lora_rank'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be positive')
  return args


def _optional(name):
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def _version(module):
  return getattr(module, '__version__', None) if module is not None else None


def _check(args, peft, bnb):
  if args.device == 'cuda' and not torch.cuda.is_available():
    raise BenchError('--device cuda: no CUDA device is available to torch '
                     f'{torch.__version__} (use --device cpu)')
  if args.method == 'lora' and peft is None:
    raise BenchError('--method lora needs peft (pip install peft)')
  if args.optimizer != 'adamw_fused' and bnb is None:
    raise BenchError(f'--optimizer {args.optimizer} needs bitsandbytes (pip install bitsandbytes)')
  if args.optimizer == 'paged_adamw_8bit' and args.device != 'cuda':
    raise BenchError('--optimizer paged_adamw_8bit pages through CUDA unified memory: needs '
                     '--device cuda')
  if args.attn == 'flex_attention' and args.device != 'cuda':
    raise BenchError('--attn flex_attention: torch has no flex_attention backward on CPU')


def _build_model(args, peft):
  config = transformers.Gemma2Config(use_cache=False, **MODELS[args.model])
  try:
    with torch.device(args.device):
      model = transformers.AutoModelForCausalLM.from_config(
          config, dtype=torch.bfloat16, attn_implementation=args.attn)
  except (ValueError, ImportError) as e:  # An attention kernel transformers refuses here.
    raise BenchError(f'--attn {args.attn}: {str(e).split(". ")[0]}') from e
  model.train()
  if args.gradient_checkpointing:
    kwargs = {'use_reentrant': False}
    if hasattr(model, 'activation_checkpointing_enable'):  # Newer name; the old one is deprecated.
      model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
      model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
  if args.method == 'lora':
    lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                           target_modules=LORA_TARGETS, task_type='CAUSAL_LM')
    model = peft.get_peft_model(model, lora)
  return model


def _build_optimizer(args, params, bnb):
  kw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  if args.optimizer == 'adamw_fused':
    return torch.optim.AdamW(params, fused=True, **kw)
  if args.optimizer == 'adamw_8bit':
    return bnb.optim.AdamW8bit(params, **kw)
  return bnb.optim.PagedAdamW8bit(params, **kw)


def _state_dtype(optimizer) -> str:
  """The dtype(s) of the optimizer's moments: its state tensors as large as their parameter
  (torch AdamW's exp_avg/exp_avg_sq, bitsandbytes' state1/state2), e.g. 'bfloat16' or 'uint8'."""
  dtypes = {str(t.dtype).removeprefix('torch.') for p, state in optimizer.state.items()
            for t in state.values() if torch.is_tensor(t) and t.numel() == p.numel() > 1}
  return ','.join(sorted(dtypes))


def run(args: argparse.Namespace) -> dict:
  """Builds, times and reports one configuration; returns the JSON record (see the docstring)."""
  peft = _optional('peft')
  bnb = _optional('bitsandbytes')
  _check(args, peft, bnb)
  cuda = args.device == 'cuda'
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()

  torch.manual_seed(args.seed)
  model = _build_model(args, peft)
  trainable = [p for p in model.parameters() if p.requires_grad]
  n_trainable = sum(p.numel() for p in trainable)
  n_total = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once.
  optimizer = _build_optimizer(args, trainable, bnb)

  vocab = MODELS[args.model]['vocab_size']
  gen = torch.Generator().manual_seed(args.seed)
  input_ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
  # labels = inputs: transformers shifts them inside the loss.

  times, loss = [], None
  for _ in range(WARMUP_STEPS + args.steps):
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    times.append(time.perf_counter() - t0)
    loss = out.loss.detach()
    del out
  step_s = statistics.median(times[WARMUP_STEPS:])

  result = {
      'framework': 'transformers', 'model': args.model, 'method': args.method,
      'batch': args.batch, 'seq_len': args.seq_len, 'n_devices': 1,
      'device': torch.cuda.get_device_name() if cuda else 'cpu',
      'optimizer': args.optimizer, 'gradient_checkpointing': args.gradient_checkpointing,
      'attn_implementation': model.config._attn_implementation,  # pylint: disable=protected-access
      'param_dtype': 'bfloat16', 'state_dtype': _state_dtype(optimizer),
      'lora_rank': args.lora_rank if args.method == 'lora' else None,
      'lora_alpha': args.lora_alpha if args.method == 'lora' else None,
      'lr': args.lr, 'trainable_params': n_trainable, 'total_params': n_total,
      'steps': args.steps, 'step_s_median': step_s, 'first_step_s': times[0],
      'tokens_per_s': args.batch * args.seq_len / step_s,
      'peak_memory_gib': torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0,
      'last_loss': float(loss),
      'versions': {'torch': torch.__version__, 'transformers': transformers.__version__,
                   'peft': _version(peft), 'bitsandbytes': _version(bnb)},
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
  }
  if not math.isfinite(result['last_loss']):
    print(f'warning: non-finite last loss {result["last_loss"]}', file=sys.stderr)
  line = json.dumps(result)
  print(line, flush=True)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(line + '\n')
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    run(args)
  except BenchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
