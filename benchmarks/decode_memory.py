r"""Compiled memory of the sampler's decode program (compile only: nothing is allocated).

  python benchmarks/decode_memory.py --variant=gemma2_9b --slots=64 --length=1570 --dtype=float32 \
      --output=results/bench/DATE-cpu-decode-memory.jsonl [--root=OTHER_CHECKOUT]

Lowers `sampler._decode` for a scanned model of the named variant with `--slots` decode slots and
a `--length`-token cache, and prints (and with --output appends) one JSON line: the cache's size
and XLA's memory analysis of the compiled program (arguments, temporaries, outputs, aliased).
On a CPU use --dtype=float32: XLA:CPU converts bf16 scatters and dots to f32, whose copies would
swamp the temporaries. --root measures another checkout (its gemma_sft_jax) for before/after.
"""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--variant', default='gemma2_9b')
  p.add_argument('--slots', type=int, default=64)
  p.add_argument('--length', type=int, default=1570)
  p.add_argument('--max_new_tokens', type=int, default=256)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--unroll', action='store_true', help='unrolled layers, a cache per layer')
  p.add_argument('--root', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument('--output')
  args = p.parse_args()
  sys.path.insert(0, args.root)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.evaluation import sampler  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.model import architecture  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.model import transformer as model_lib  # pylint: disable=g-import-not-at-top

  dtype = jnp.float32 if args.dtype == 'float32' else jnp.bfloat16
  model = model_lib.Transformer(architecture.VARIANTS[args.variant], dtype=dtype,
                                param_dtype=dtype, scan_layers=not args.unroll)
  state = jax.eval_shape(functools.partial(
      sampler._empty_state, model, slots=args.slots, length=args.length, ring=False,  # pylint: disable=protected-access
      max_new_tokens=args.max_new_tokens))
  decode = jax.jit(functools.partial(
      sampler._decode, model, eos_id=1,  # pylint: disable=protected-access
      sampling=sampler.SamplingParams(max_new_tokens=args.max_new_tokens)),
      donate_argnames='state')
  compiled = decode.lower(model_lib.param_shapes(model), state, None,
                          jax.ShapeDtypeStruct((args.slots,), bool),
                          jax.ShapeDtypeStruct((), jnp.int32), jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  gib = 2 ** 30
  commit = subprocess.run(['git', '-C', args.root, 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True).stdout.strip()
  line = json.dumps({
      'what': 'decode program memory', 'variant': args.variant, 'slots': args.slots,
      'cache_length': args.length, 'dtype': args.dtype, 'commit': commit,
      'unroll': args.unroll,
      'cache_gib': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['cache'])) / gib,
      'arguments_gib': m.argument_size_in_bytes / gib, 'temporaries_gib': m.temp_size_in_bytes / gib,
      'outputs_gib': m.output_size_in_bytes / gib, 'aliased_gib': m.alias_size_in_bytes / gib,
      'backend': jax.default_backend(), 'jax': jax.__version__,
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat()})
  print(line)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(line + '\n')


if __name__ == '__main__':
  main()
