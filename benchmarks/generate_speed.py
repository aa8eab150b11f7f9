r"""Generation speed of the evaluator's decode path (`sampler.Generator`), random init is fine.

  # Gemma 2 9B, the 1,319 GSM8K test questions as 8-shot prompts (tokenised with --tokenizer; ids
  # beyond the model's vocabulary wrap around), 256 new tokens each, 128 decode slots.
  python benchmarks/generate_speed.py --config=configs/gemma2.py:size=9b,method=full \
      --config.model.checkpoint= --tokenizer=GGUF_OR_DIR --num_shots=8 \
      --output=results/eval/DATE-DEVICE-generate.jsonl
  # Random prompts instead: --tokenizer= --prefix=1058 --suffix=26,192

A random-init model never emits EOS, so every question decodes all --max_new_tokens tokens: the
worst case of a real evaluation. Prints (and with --output appends) one JSON line: end-to-end
seconds of the generate call, the XLA compilation seconds inside it, questions and generated
tokens per second, peak device memory, the prompt shape (shared prefix, suffix lengths) and the
settings. --repeat=2 times a second call of the same generator too (compiled programs reused).
"""

import datetime
import time

from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

from gemma_sft_jax import runner
from gemma_sft_jax.evaluation import evaluator as evaluate
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.training import metrics as metrics_lib
from gemma_sft_jax.weights import models
from gemma_sft_jax.weights import tokenizer as tokenizer_lib

_GIB = 2 ** 30


def _define_flags():
  holders = (
      config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=False),
      flags.DEFINE_string('tokenizer', '', 'Tokenise the real GSM8K prompts with this (a .gguf '
                          'or tokenizer directory); empty: random prompts (--prefix, --suffix).'),
      flags.DEFINE_integer('num_shots', 8, 'Exemplars per prompt (0: zero-shot prompts).'),
      flags.DEFINE_integer('prefix', 1058, 'Random prompts: shared prefix tokens.'),
      flags.DEFINE_string('suffix', '26,192', 'Random prompts: MIN,MAX own tokens per prompt.'),
      flags.DEFINE_integer('questions', 1319, 'Prompts to generate for.'),
      flags.DEFINE_integer('batch', 128, 'Decode slots.'),
      flags.DEFINE_integer('max_new_tokens', 256, 'Tokens per completion.'),
      flags.DEFINE_integer('repeat', 1, 'Calls of the same generator to time.'),
      flags.DEFINE_bool('unroll', True, 'Decode with unrolled layers (sampler.Generator).'),
      flags.DEFINE_string('output', None, 'Append the JSON line to this file.'),
      flags.DEFINE_string('tag', '', 'Free-form label stored in the JSON line.'))
  flags.mark_flag_as_required('config')
  return holders


def _prompts(vocab: int, tokenizer: str, num_shots: int, prefix: int, suffix: str,
             n: int) -> tuple[list[list[int]], str]:
  if tokenizer:
    tok = tokenizer_lib.load_tokenizer(tokenizer)
    spec = evaluate.PromptSpec(strategy='few_shot' if num_shots else 'zero_shot',
                               num_shots=num_shots)
    pool = gsm8k.load_split(gsm8k.BUNDLED_DIR, 'main', 'train')
    test = gsm8k.load_split(gsm8k.BUNDLED_DIR, 'main', 'test')[:n]
    ids = [[t % vocab for t in data_lib.tokenize_prompt(spec.build(q.question, pool),
                                                        tokenizer=tok)] for q in test]
    return ids, f'GSM8K test, {spec.name}, tokenised by {tokenizer}'
  rng = np.random.default_rng(0)
  lo, hi = (int(x) for x in suffix.split(','))
  shared = [2] + rng.integers(3, vocab, size=prefix).tolist()
  return ([shared + rng.integers(3, vocab, size=rng.integers(lo, hi + 1)).tolist()
           for _ in range(n)], f'random: {prefix}-token shared prefix + {lo}..{hi} own tokens')


def _bench(config, tokenizer, num_shots, prefix, suffix, questions, batch, max_new_tokens,
           repeat, unroll, output, tag):
  if not config.model.checkpoint:
    config.model.tokenizer = config.model.tokenizer or 'byte'
  mesh = sharding.make_mesh(**config.mesh)
  setup = models.model_setup(config, with_lora=False, mesh=mesh)
  params = models.init_params(setup, mesh=mesh, seed=0)
  prompts, source = _prompts(setup.config.vocab_size, tokenizer, num_shots, prefix, suffix,
                             questions)
  generate = sampler.Generator(setup.model, eos_id=-1, unroll=unroll,
                               sampling=sampler.SamplingParams(max_new_tokens=max_new_tokens))
  calls = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    done = [0]

    def progress(k, t0=t0, done=done):
      done[0] += k
      logging.info('%d/%d questions, %.1f s', done[0], len(prompts), time.perf_counter() - t0)

    with metrics_lib.CompileTimer() as compiling:
      out = generate(params, prompts, batch_size=batch, on_done=progress,
                     batch_sharding=sharding.batch_sharding(mesh))
    calls.append({'seconds': time.perf_counter() - t0, 'compile_seconds': compiling.seconds})
  lengths = np.array([len(p) for p in prompts])
  shared = sampler.common_prefix(prompts)
  first = calls[0]
  result = {
      'framework': 'gemma_sft_jax', 'what': 'generate', 'model': config.model.variant,
      'checkpoint': config.model.checkpoint or 'random init', 'prompts': source,
      'questions': len(prompts), 'slots': batch, 'max_new_tokens': max_new_tokens,
      'generated_tokens': sum(map(len, out)), 'shared_prefix_tokens': shared,
      'prompt_tokens': {'min': int(lengths.min()), 'mean': float(lengths.mean()),
                        'max': int(lengths.max())},
      'seconds': first['seconds'], 'compile_seconds': first['compile_seconds'],
      'questions_per_s': len(prompts) / first['seconds'],
      'questions_per_s_without_compile': len(prompts) / (first['seconds'] -
                                                           first['compile_seconds']),
      'generated_tokens_per_s': sum(map(len, out)) / first['seconds'], 'calls': calls,
      'peak_memory_gib': (metrics_lib.device_memory() or 0) / _GIB,
      'device': jax.devices()[0].device_kind, 'n_devices': mesh.size,
      'param_dtype': config.model.param_dtype, 'dtype': config.model.dtype,
      'scan_layers': config.model.scan_layers, 'unroll': unroll, 'jax': jax.__version__,
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(), 'tag': tag,
  }
  metrics_lib.emit_json_line(result, output)


if __name__ == '__main__':
  runner.run(_bench, _define_flags)
