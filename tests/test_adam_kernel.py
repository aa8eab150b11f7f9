"""Tests for gemma_sft_jax.adam_kernel: the arithmetic dynamic maps against the tables, and the
Pallas kernel (in the Pallas interpreter on CPU) against the XLA update it replaces on GPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax import adam_kernel
from gemma_sft_jax import optimizer as opt
from gemma_sft_jax import quantization as quant


@pytest.mark.parametrize('signed', [True, False])
def test_code_value_is_the_table(signed):
  table = quant.dynamic_map(signed=signed)
  values = np.asarray(adam_kernel.code_value(jnp.arange(256), signed=signed))
  # Computed in float32 rather than rounded once from float64: within one ulp of the table.
  np.testing.assert_allclose(values, table, rtol=2.5e-7, atol=0)
  assert values[0 if not signed else 127] == 0 and values[255] == 1


@pytest.mark.parametrize('signed', [True, False])
def test_nearest_code_matches_the_table_path(signed):
  rng = np.random.default_rng(0)
  lo = -1.0 if signed else 0.0
  mag = 10.0 ** rng.uniform(-9, 0, 200_000)
  x = np.concatenate([np.linspace(lo, 1.0, 100_001), rng.uniform(lo, 1.0, 100_000),
                      mag * (rng.choice([-1, 1], mag.size) if signed else 1)]).astype(np.float32)
  ours = np.asarray(adam_kernel.nearest_code(jnp.asarray(x), signed=signed))
  ref = np.asarray(quant.nearest_code_index(jnp.asarray(x), signed=signed))
  # The midpoints are within an ulp of the table's: only values that fall right on one may round
  # to the other neighbour, and then the two codes are equally near.
  differ = ours != ref
  assert differ.mean() < 1e-4, differ.mean()
  table = quant.dynamic_map(signed=signed)
  np.testing.assert_allclose(np.abs(table[ours[differ]] - x[differ]),
                             np.abs(table[ref[differ]] - x[differ]), rtol=1e-5, atol=1e-12)


def _leaf_problem(param_dtype, shape=(3, 8, 512)):
  k = jax.random.split(jax.random.key(5), 3)
  p = (jax.random.normal(k[0], shape) * 0.05).astype(param_dtype)
  tx, schedule = opt.make_optimizer(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=10,
                                    weight_decay=0.1, clip_norm=1.0, state_dtype='int8')
  params = {'w': p}
  grads = lambda i: {'w': (jax.random.normal(jax.random.fold_in(k[1], i), shape) * 30  # noqa: E731
                           ).astype(param_dtype)}
  return params, grads, tx, schedule


_GPU = jax.default_backend() == 'gpu'


@pytest.mark.parametrize('mode', ['interpret'] + (['pallas'] if _GPU else []))
@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16])
def test_kernel_matches_the_xla_update(param_dtype, mode):
  """Three steps through `make_update` with the kernel (interpreted; compiled too on a GPU)
  and with XLA: the same
  weights within float rounding (bf16: the same stochastic rounding bits, so at most rare flips
  at a boundary), codes equal but for rare midpoint ties, scales within float rounding."""
  params, grads, tx, schedule = _leaf_problem(param_dtype, (3, 40, 1024) if mode == 'pallas'
                                              else (3, 8, 512))
  kw = dict(schedule=schedule, weight_decay=0.1, clip_norm=1.0, decay_mask={'w': True},
            chunks={'w': 1})
  xla = opt.make_update(**kw)
  kernel = opt.make_update(**kw, kernel=mode)
  results = []
  for update in (xla, kernel):
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, g, s: update(p, g, s, divisor=64.0, seed=jnp.uint32(9)))
    for i in range(3):
      p, s, _ = step(p, grads(i), s)
    results.append((p, s))
  (pa, sa), (pb, sb) = results
  a, b = np.asarray(pa['w'], np.float32), np.asarray(pb['w'], np.float32)
  if param_dtype == jnp.float32:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  else:
    assert np.mean(a != b) < 0.01
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype in (np.int8, np.uint8):
      assert np.mean(x != y) < 1e-3, np.mean(x != y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5)
  assert not np.array_equal(a, np.asarray(params['w'], np.float32))  # it did train


def test_applicable():
  q = quant.zero_quantized((4, 512), signed=True, block_size=256)
  assert adam_kernel.applicable(jnp.zeros((4, 512)), q)
  assert not adam_kernel.applicable(jnp.zeros((4, 500)), quant.zero_quantized(
      (4, 500), signed=True, block_size=256))
  assert not adam_kernel.applicable(jnp.zeros((4, 512)), jnp.zeros((4, 512)))
