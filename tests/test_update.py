"""The fused training update (gemma_sft_jax.training.update) against the optimizer chain, and the
stochastic rounding of bf16 params it writes with (gemma_sft_jax.training.rounding)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma_sft_jax.training import optimizer as opt
from gemma_sft_jax.training import rounding
from gemma_sft_jax.training import update as update_lib


# ---- 5. bf16 params: stochastic rounding. -------------------------------------------------------

def test_random_bits16_are_uniform_and_seeded():
  index = rounding.element_index((256, 256))
  assert index.dtype == jnp.uint32 and int(index[3, 5]) == 3 * 256 + 5
  a = np.asarray(rounding.random_bits16(index, jnp.uint32(1)))
  b = np.asarray(rounding.random_bits16(index, jnp.uint32(2)))
  assert a.max() < 2 ** 16 and a.dtype == np.uint32
  # 65,536 draws into 64 buckets of 1024 expected: a chi-square with 63 degrees of freedom has
  # mean 63 and std 11.2; 150 is ~8 sigma.
  for bits in (a, b, a ^ b):
    counts = np.bincount(bits.ravel() >> 10, minlength=64)
    assert ((counts - 1024.0) ** 2 / 1024.0).sum() < 150, counts
  assert np.mean(a == b) < 0.01  # another seed, other bits
  # The same element index and seed give the same bits, whatever block they are computed in.
  np.testing.assert_array_equal(
      np.asarray(rounding.random_bits16(rounding.element_index((128, 256), 128 * 256),
                                        jnp.uint32(1))), a[128:])


def _round_steps(w0, step_size, steps):
  def body(p, k):
    bits = rounding.random_bits16(rounding.element_index(p.shape), rounding.fold_seed(7, k))
    return rounding.stochastic_round_to_bf16(p.astype(jnp.float32) + step_size, bits), None
  return jax.jit(lambda p: jax.lax.scan(body, p, jnp.arange(steps))[0])(w0)


def test_stochastic_rounding_accumulates_small_updates():
  """1000 Adam-sized steps of 1e-5 on bf16 weights of 0.02 (bf16 spacing there: 2^-13 ≈ 1.2e-4).

  Each step moves a weight up one bf16 ulp with probability ≈ 0.08, so the final value of one
  weight has std ≈ sqrt(1000 · 0.08 · 0.92) ulp ≈ 1.06e-3 ≈ 3.5% of the fp32 result 0.03. We run
  4096 independent weights: their mean must be within 0.5% (≈ 9 standard errors of the mean),
  ≥ 75% of them within 5% of fp32 (expected 85%), every one within 25% (> 6 sigma), and the
  spread must match the binomial prediction within 20%.
  """
  n, steps, step_size = 4096, 1000, 1e-5
  w0 = jnp.full((n,), 0.02, jnp.bfloat16)
  final = _round_steps(w0, step_size, steps)
  nearest = jax.jit(lambda p: jax.lax.scan(
      lambda p, _: ((p.astype(jnp.float32) + step_size).astype(jnp.bfloat16), None), p, None,
      length=steps)[0])(w0)
  fp32 = jax.lax.fori_loop(0, steps, lambda _, x: x + jnp.float32(step_size),
                           jnp.float32(w0[0]))

  assert final.dtype == jnp.bfloat16
  np.testing.assert_array_equal(nearest, w0)  # round-to-nearest never moves
  final = np.asarray(final, np.float32)
  fp32 = float(fp32)
  assert abs(final.mean() - fp32) <= 0.005 * fp32, (final.mean(), fp32)
  assert np.mean(np.abs(final - fp32) <= 0.05 * fp32) >= 0.75
  assert np.all(np.abs(final - fp32) <= 0.25 * fp32)
  ulp = 2.0 ** -13
  p_up = step_size / ulp
  predicted_std = math.sqrt(steps * p_up * (1 - p_up)) * ulp
  assert abs(final.std() / predicted_std - 1) <= 0.2, (final.std(), predicted_std)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(sign):
  lo = float(jnp.bfloat16(0.02))
  ulp = 2.0 ** -13
  x = np.float32(sign * (lo + 0.3 * ulp))
  n = 20000
  # Over elements (one seed) and over seeds (one element).
  over_elements = rounding.stochastic_round_to_bf16(
      jnp.full((n,), x), rounding.random_bits16(rounding.element_index((n,)), jnp.uint32(3)))
  over_seeds = jax.vmap(lambda s: rounding.stochastic_round_to_bf16(
      jnp.full((), x), rounding.random_bits16(jnp.uint32(0), s)))(jnp.arange(n, dtype=jnp.uint32))
  for samples in (over_elements, over_seeds):
    samples = np.asarray(samples, np.float64)
    assert set(np.unique(samples)) <= {sign * lo, sign * (lo + ulp)}  # the two neighbours only
    se = samples.std() / math.sqrt(n)
    assert abs(samples.mean() - x) <= 4 * se, (samples.mean(), x, se)
    np.testing.assert_allclose(np.mean(np.abs(samples) > lo), 0.3, atol=0.02)


def test_stochastic_rounding_special_values():
  special = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0])
  r = rounding.stochastic_round_to_bf16(special, jnp.full((4,), 0xFFFF, jnp.uint32))
  assert np.isnan(r[0]) and r[1] == jnp.inf and r[2] == -jnp.inf and r[3] == 0


@pytest.mark.parametrize('sr', [True, False])
def test_bf16_moments_follow_the_gradients_when_rounded_stochastically(sr):
  """bf16 Adam moments (optim.state_dtype='bfloat16'), 1000 steps of a constant gradient 1 with
  b2 = 0.999: the exact second moment is 1 - 0.999^1000 = 0.632. Rounded to nearest it stalls at
  0.25, where a step adds less than half a bf16 ulp (what torch's AdamW does with bf16 moments);
  rounded stochastically (the default) the mean over 8192 elements lands within 1% of 0.632
  (measured 0.6325; one element's spread is ~0.02, so the mean's standard error is ~2e-4), and
  the first moment within 1% of 1. The params are fp32, so only the moments' rounding differs."""
  params = {'w': jnp.zeros((8192,), jnp.float32)}
  mask = opt.default_decay_mask(params)
  tx, schedule = opt.make_optimizer(lr=1e-3, min_lr=1e-3, warmup_steps=0, decay_steps=1000,
                                    weight_decay=0.0, clip_norm=None, state_dtype='bfloat16',
                                    decay_mask=mask)
  update = update_lib.make_update(schedule=schedule, weight_decay=0.0, clip_norm=None,
                                  decay_mask=mask, chunks=update_lib.chunk_plan(params),
                                  stochastic_rounding=sr)
  grads = {'w': jnp.ones((8192,), jnp.float32)}

  def body(i, carry):
    p, s = carry
    p, s, _ = update(p, grads, s, divisor=1.0, seed=i.astype(jnp.uint32))
    return p, s
  _, state = jax.jit(lambda s: jax.lax.fori_loop(0, 1000, body, (params, s)))(tx.init(params))
  adam = state[1]
  assert adam.mu['w'].dtype == adam.nu['w'].dtype == jnp.bfloat16
  nu = float(jnp.mean(adam.nu['w'].astype(jnp.float32)))
  mu = float(jnp.mean(adam.mu['w'].astype(jnp.float32)))
  exact_nu = 1.0 - 0.999 ** 1000
  if sr:
    assert abs(nu - exact_nu) < 0.01 * exact_nu, nu
    assert abs(mu - 1.0) < 0.01, mu
    assert float(jnp.std(adam.nu['w'].astype(jnp.float32))) > 0  # elements round apart
  else:
    assert nu < 0.3, nu  # stalled: the stochastic run's closeness is not a given


# ---- 6. The fused update (what training runs) against the chain. --------------------------------

def _fused_problem(state_dtype, param_dtype=jnp.float32):
  k = jax.random.split(jax.random.key(11), 4)
  params = {'layers': {'w': jax.random.normal(k[0], (6, 48, 512)).astype(param_dtype) * 0.05,
                       'norm': jnp.zeros((6, 48), param_dtype)},
            'embed': jax.random.normal(k[1], (96, 256)).astype(param_dtype) * 0.05,
            'bias': jnp.zeros((7,), param_dtype)}
  grads = lambda i: jax.tree.map(  # noqa: E731
      lambda p: (jax.random.normal(jax.random.fold_in(k[2], i), p.shape) * 30).astype(p.dtype),
      params)
  hp = dict(b1=0.9, b2=0.95, eps=1e-8)
  mask = opt.default_decay_mask(params)
  tx, schedule = opt.make_optimizer(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=10,
                                    weight_decay=0.1, clip_norm=1.0, state_dtype=state_dtype,
                                    decay_mask=mask, **hp)
  make = lambda chunks, sr=True, two_pass=True: update_lib.make_update(  # noqa: E731
      schedule=schedule, weight_decay=0.1, clip_norm=1.0, decay_mask=mask, chunks=chunks,
      stochastic_rounding=sr, two_pass=two_pass, **hp)
  return params, grads, tx, make


def _run_fused(update, params, grads, state, steps, divisor=64.0):
  step = jax.jit(lambda p, g, s, i: update(p, g, s, divisor=divisor, seed=i.astype(jnp.uint32)))
  norms = []
  for i in range(steps):
    params, state, norm = step(params, grads(i), state, jnp.int32(i))
    norms.append(float(norm))
  return params, state, norms


@pytest.mark.parametrize('state_dtype', ['float32', 'int8'])
def test_fused_update_equals_the_chain(state_dtype):
  """fp32 params: the fused update is the chain's maths (clip after dividing the gradient sums,
  Adam, masked decay, LR, apply). Clipping is active (norms ~ 15 > 1). fp32 moments agree to
  float rounding; with 8-bit moments a requantised code may differ by one step of the map where
  an fp32 value falls on a midpoint, so we compare the weights after 6 steps loosely."""
  params, grads, tx, make = _fused_problem(state_dtype)
  ours, state, norms = _run_fused(make(update_lib.chunk_plan(params)), params, grads, tx.init(params), 6)
  ref, ref_state = params, tx.init(params)
  for i in range(6):
    g = jax.tree.map(lambda x: x / 64.0, grads(i))
    np.testing.assert_allclose(norms[i], float(optax.global_norm(g)), rtol=1e-6)
    u, ref_state = jax.jit(tx.update)(g, ref_state, ref)
    ref = optax.apply_updates(ref, u)
  assert min(norms) > 1.0  # clipping was active
  tol = 1e-6 if state_dtype == 'float32' else 2e-3
  for a, b, p0 in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(params)):
    travel = float(jnp.linalg.norm(b - p0)) or 1.0
    assert float(jnp.linalg.norm(a - b)) <= tol * max(travel, float(jnp.linalg.norm(b))), (a, b)
  assert int(state[1].count) == 6 and int(state[3].count) == 6
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)


@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16])
def test_fused_update_blocks_do_not_change_the_result(param_dtype):
  """Splitting a leaf's update into blocks along axis 0 (in place, in a loop) gives the same
  weights and states up to float rounding (XLA may contract the loop body's arithmetic
  differently: ~1e-6 relative), stochastic rounding included, since its bits depend on element
  indices only: were they drawn per block, half of the bf16 roundings would differ. A rounding
  difference can flip a requantised 8-bit code or a bf16 rounding at a boundary: under 1%."""
  params, grads, tx, make = _fused_problem('int8', param_dtype)
  whole = jax.tree.map(lambda _: 1, params)
  split = {'layers': {'w': 3, 'norm': 6}, 'embed': 4, 'bias': 1}
  a, sa, _ = _run_fused(make(whole), params, grads, tx.init(params), 3)
  b, sb, _ = _run_fused(make(split), params, grads, tx.init(params), 3)
  for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb))):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.float32:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)
    else:  # int8/uint8 codes, bf16 weights
      assert np.mean(x != y) < 0.01, np.mean(x != y)
  if param_dtype == jnp.bfloat16:
    nearest, _, _ = _run_fused(make(whole, sr=False), params, grads, tx.init(params), 3)
    assert jax.tree.map(lambda x: x.dtype, a) == jax.tree.map(lambda x: x.dtype, params)
    assert np.any(np.asarray(a['embed']) != np.asarray(nearest['embed']))


@pytest.mark.parametrize('split', [False, True])
def test_two_pass_update_equals_one_pass(split):
  """Computing the new moments' block absmax in a pass of its own and recomputing the moments
  in the elementwise pass gives the one-pass update's weights, codes and scales (bf16 params,
  stochastic rounding on), whole or in blocks."""
  params, grads, tx, make = _fused_problem('int8', jnp.bfloat16)
  chunks = ({'layers': {'w': 3, 'norm': 6}, 'embed': 4, 'bias': 1} if split
            else jax.tree.map(lambda _: 1, params))
  a, sa, na = _run_fused(make(chunks), params, grads, tx.init(params), 3)
  b, sb, nb = _run_fused(make(chunks, two_pass=False), params, grads, tx.init(params), 3)
  assert na == nb
  for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb))):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.float32:
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12)
    else:  # int8/uint8 codes, bf16 weights: a recomputed moment may round differently
      assert np.mean(x != y) < 1e-3, np.mean(x != y)


def test_chunk_plan():
  big = jax.ShapeDtypeStruct((42, 3584, 1024), jnp.bfloat16)  # 154M elements
  tree = {'stacked': big, 'small': jax.ShapeDtypeStruct((8, 64), jnp.float32),
          'flat': jax.ShapeDtypeStruct((update_lib.CHUNK_ELEMENTS + 1,), jnp.float32),
          'embed': jax.ShapeDtypeStruct((256000, 2304), jnp.bfloat16)}
  plan = update_lib.chunk_plan(tree, whole_leaf_bytes=4 * update_lib.CHUNK_ELEMENTS)
  assert plan == {'stacked': 3, 'small': 1, 'flat': 1, 'embed': 10}
  assert 42 * 3584 * 1024 // 3 <= update_lib.CHUNK_ELEMENTS
  assert 256000 * 2304 // 10 <= update_lib.CHUNK_ELEMENTS
  # Leaves that fit the whole-leaf budget (here 1 GiB: 268M elements) are updated whole.
  plan = update_lib.chunk_plan(tree, whole_leaf_bytes=1 << 30)
  assert plan == {'stacked': 1, 'small': 1, 'flat': 1, 'embed': 10}
  # Without a budget, the device's memory sets it (CPUs report none: 4 * CHUNK_ELEMENTS bytes).
  assert update_lib.chunk_plan(tree) == update_lib.chunk_plan(
      tree, whole_leaf_bytes=4 * update_lib.CHUNK_ELEMENTS)


def test_fused_update_temporaries_stay_blockwise():
  """The compiled update of a stacked [8, 256, 2048] leaf with 8-bit moments: in blocks of one
  layer, XLA's temporaries stay under a quarter of what the whole-leaf update needs (which holds
  several fp32 copies of the 4M-element leaf, 16 MiB each). fp32 params here: XLA:CPU computes
  bf16 in fp32 and would add whole-leaf conversions that a GPU does not make."""
  params = {'layers': {'w': jnp.zeros((8, 256, 2048), jnp.float32)}}
  tx, schedule = opt.make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=10,
                                    weight_decay=0.1, clip_norm=1.0, state_dtype='int8')
  state = tx.init(params)

  def temp_bytes(n):
    update = update_lib.make_update(schedule=schedule, weight_decay=0.1, clip_norm=1.0,
                             decay_mask=opt.default_decay_mask(params),
                             chunks={'layers': {'w': n}})
    fn = jax.jit(lambda p, g, s: update(p, g, s, divisor=1.0, seed=jnp.uint32(0)),
                 donate_argnums=(0, 2))
    compiled = fn.lower(params, params, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, blocked = temp_bytes(1), temp_bytes(8)
  print('temporaries: whole leaf', whole, 'per layer', blocked)
  assert whole >= 2 * 4 * 8 * 256 * 2048  # at least two fp32 copies of the leaf
  assert blocked < whole / 4, (blocked, whole)  # measured: 16.1 MB vs 128.0 MB


def test_large_leaves_are_updated_in_order():
  """Each leaf of ORDERED_LEAF_ELEMENTS or more passes its inputs through a barrier with the
  previous large leaf's new param (so XLA cannot merge their updates into one kernel); small
  leaves pass no barrier."""
  n = update_lib.ORDERED_LEAF_ELEMENTS
  params = {'a': jnp.zeros((n // 256, 256)), 'b': jnp.zeros((n // 256, 256)), 'c': jnp.zeros((n,)),
            'small': jnp.zeros((8,))}
  tx, schedule = opt.make_optimizer(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=10,
                                    weight_decay=0.1, clip_norm=1.0, state_dtype='float32')
  update = update_lib.make_update(schedule=schedule, weight_decay=0.1, clip_norm=1.0,
                                  decay_mask=opt.default_decay_mask(params),
                                  chunks=jax.tree.map(lambda _: 1, params))
  closed = jax.make_jaxpr(lambda p, g, s: update(p, g, s, divisor=1.0, seed=jnp.uint32(0)))(
      params, params, tx.init(params))
  jaxpr = closed.jaxpr
  barriers = [e for e in jaxpr.eqns if e.primitive.name == 'optimization_barrier']
  assert len(barriers) == 2
  param_in = dict(zip('abc', jaxpr.invars[:3]))  # the params' leaves, in tree order
  param_out = dict(zip('abc', jaxpr.outvars[:3]))
  for barrier, (before, this) in zip(barriers, ('ab', 'bc')):
    assert barrier.invars[0] is param_in[this]
    assert barrier.invars[-1] is param_out[before]
