r"""The 8-bit update kernel against XLA's update on a GPU, on one large leaf.

  python benchmarks/kernel_parity.py [--shape 42,3584,14336] [--steps 3] [--output OUT.jsonl]

Both updates (`optim.update_kernel` 'auto' and 'xla') start from the same bf16 leaf and 8-bit
state and take the same random gradients (clipping, warmup and weight decay on, stochastic
rounding on). Prints (and appends) one JSON line: the share of bf16 weights and of each moment's
codes that differ between the two, the largest relative difference of the block scales, and
whether every value is finite. The tests check the same in the Pallas interpreter on CPU; this
checks the compiled Triton kernel, including leaves of 2^31 elements or more (the default shape
is Gemma 2 9B's stacked gate kernel, 2.16e9 elements).
"""

import argparse
import datetime
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma_sft_jax.training import metrics
from gemma_sft_jax.training import optimizer
from gemma_sft_jax.training import update as update_lib


def _share_differing(a: jax.Array, b: jax.Array) -> float:
  return float(jax.jit(lambda x, y: jnp.mean((x != y).astype(jnp.float32)))(a, b))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='42,3584,14336')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--output')
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(','))
  init = {'w': jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02
                                  ).astype(jnp.bfloat16))(jax.random.key(0))}
  tx, schedule = optimizer.make_optimizer(
      lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=100, weight_decay=0.01, clip_norm=1.0,
      state_dtype='int8')
  grad = jax.jit(lambda i: {'w': (jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                    shape, jnp.float32) * 1e-3 * 4096
                                  ).astype(jnp.bfloat16)})
  out = {}
  for mode in ('auto', 'xla'):
    params = jax.tree.map(jnp.copy, init)
    update = update_lib.make_update(
        schedule=schedule, weight_decay=0.01, clip_norm=1.0,
        decay_mask=optimizer.default_decay_mask(params), chunks=update_lib.chunk_plan(params),
        kernels=update_lib.kernel_plan(params, mode))
    fn = jax.jit(lambda p, g, s: update(p, g, s, divisor=4096.0, seed=jnp.uint32(7)),
                 donate_argnums=(0, 2))
    state = jax.jit(tx.init)(params)
    for i in range(args.steps):
      params, state, _ = fn(params, grad(i), state)
    out[mode] = jax.device_get((params['w'], state[1].mu['w'], state[1].nu['w']))
    del params, state
  (pk, mk, vk), (px, mx, vx) = out['auto'], out['xla']
  finite = bool(np.isfinite(np.asarray(pk, np.float32)).all()
                and np.isfinite(mk.scales).all() and np.isfinite(vk.scales).all())
  rel = lambda a, b: float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))  # noqa: E731
  metrics.emit_json_line({
      'bench': 'kernel_parity', 'shape': list(shape), 'elements': math.prod(shape),
      'steps': args.steps, 'kernel_used': update_lib.kernel_plan(init)['w'] is not None,
      'weights_differing': _share_differing(pk, px),
      'mu_codes_differing': _share_differing(mk.codes, mx.codes),
      'nu_codes_differing': _share_differing(vk.codes, vx.codes),
      'mu_scales_max_rel': rel(mk.scales, mx.scales), 'nu_scales_max_rel': rel(vk.scales, vx.scales),
      'weights_changed': _share_differing(pk, jax.device_get(init['w'])),
      'finite': finite, 'device': jax.devices()[0].device_kind,
      'date': datetime.date.today().isoformat(), 'jax': jax.__version__}, args.output)


if __name__ == '__main__':
  main()
