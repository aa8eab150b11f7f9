r"""The fused AdamW update alone (update.make_update), on one large leaf, in variants.

  python benchmarks/update_speed.py [--shape 26,2304,9216] [--output OUT.jsonl] [--profile DIR]
      [--root DIR --tag NAME]

A bf16 leaf (default: Gemma 2 2B's stacked MLP kernels, 552M elements), random bf16 gradients,
blocks from `update.chunk_plan`. Variants: 8-bit moments in one pass or two, without stochastic
rounding, as one Pallas kernel (GPUs; `int8_kernel`, and `int8_kernel_t<T>_w<W>` for each
`--kernel-shapes TxW`: T rows of 256 per program, W warps), and bf16 / fp32 moments (no
quantisation) for reference. For each prints (and appends)
one JSON line: median seconds per update and the bytes that variant must move at least (params,
gradients, moments in and out) per second, against which the GPU's ~4.8 TB/s is the ceiling.
--root times the package found in DIR instead (e.g. an older revision exported with `git archive`).
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='26,2304,9216')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--output')
  parser.add_argument('--chunks', type=int, help='blocks per leaf (default: update.chunk_plan)')
  parser.add_argument('--profile', help='trace each variant into DIR/<variant> (jax.profiler)')
  parser.add_argument('--root', default='.', help='directory holding the gemma_sft_jax/ to time')
  parser.add_argument('--tag', default='', help='free-form label stored in each JSON line')
  parser.add_argument('--variants', help='comma-separated subset of the variants')
  parser.add_argument('--kernel-shapes', default='',
                      help='comma-separated TxW: more kernel variants (T rows per program, W warps)')
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.root))
  import functools  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.training import update as update_lib  # pylint: disable=g-import-not-at-top
  shape = tuple(int(s) for s in args.shape.split(','))
  grads = {'w': (jax.random.normal(jax.random.key(0), shape, jnp.float32) * 1e-3
                 ).astype(jnp.bfloat16)}
  n = math.prod(shape)
  int8 = 2 + 2 * 4 / 256
  # name: (state_dtype, two_pass, stochastic_rounding, moment bytes per element, kernel shape)
  variants = {
      'int8_two_pass': ('int8', True, True, int8, None),
      'int8_one_pass': ('int8', False, True, int8, None),
      'int8_no_sr': ('int8', True, False, int8, None),
      'int8_kernel': ('int8', True, True, int8, ()),
      'bfloat16': ('bfloat16', True, True, 4, None),
      'float32': ('float32', True, True, 8, None),
  }
  for tw in filter(None, args.kernel_shapes.split(',')):
    t, w = (int(x) for x in tw.split('x'))
    variants[f'int8_kernel_t{t}_w{w}'] = ('int8', True, True, int8, (t, w))
  if args.variants:
    variants = {k: variants[k] for k in args.variants.split(',')}
  kernel_fn = getattr(update_lib, 'adam_kernel', None)
  kernel_fn = kernel_fn and kernel_fn.update_leaf
  for name, (state_dtype, two_pass, sr, moment_bytes, kernel) in variants.items():
    params = {'w': jnp.zeros(shape, jnp.bfloat16)}
    chunks = {'w': args.chunks} if args.chunks else update_lib.chunk_plan(params)
    if kernel is not None:
      update_lib.adam_kernel.update_leaf = (
          functools.partial(kernel_fn, tile_rows=kernel[0], num_warps=kernel[1]) if kernel
          else kernel_fn)
    tx, schedule = optimizer.make_optimizer(
        lr=1e-5, min_lr=1e-6, warmup_steps=1, decay_steps=100, weight_decay=0.01,
        clip_norm=1.0, state_dtype=state_dtype)
    update = update_lib.make_update(
        schedule=schedule, weight_decay=0.01, clip_norm=1.0,
        decay_mask=optimizer.default_decay_mask(params), chunks=chunks,
        two_pass=two_pass, stochastic_rounding=sr,
        **({'kernels': update_lib.kernel_plan(params)} if kernel is not None else {}))
    fn = jax.jit(lambda p, g, s: update(p, g, s, divisor=1.0, seed=jnp.uint32(0)),
                 donate_argnums=(0, 2))
    p, s = params, jax.jit(tx.init)(params)

    def step():
      nonlocal p, s
      p, s, norm = fn(p, grads, s)
      jax.block_until_ready((p, s, norm))

    step()
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    if args.profile:
      with jax.profiler.trace(os.path.join(args.profile, name), create_perfetto_trace=True):
        for _ in range(3):
          step()
    sec = statistics.median(times)
    moved = n * (2 + 2 + 2 + 2 * moment_bytes)  # p in/out, g in, moments in/out
    line = json.dumps({'bench': 'update_speed', 'tag': args.tag, 'variant': name,
                       'shape': list(shape),
                       'chunks': 1 if kernel is not None else chunks['w'], 'update_s': sec,
                       'min_bytes_per_s': moved / sec, 'device': jax.devices()[0].device_kind,
                       'date': datetime.date.today().isoformat(), 'jax': jax.__version__})
    print(line, flush=True)
    if args.output:
      with open(args.output, 'a') as f:
        f.write(line + '\n')
    del p, s


if __name__ == '__main__':
  main()
