"""Tests for the chunked cross-entropy: parity with the naive loss, normalisation, memory, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma_sft_jax.model import loss
from gemma_sft_jax.model import transformer as model

# Prime-ish sizes ease shape tracing; V = 391 = 17 · 23 has divisors to chunk by.
B, T, D, V = 3, 7, 13, 391


def _inputs(seed=0, b=B, t=T, d=D, v=V, dtype=jnp.float32, scale=1.0):
  k = jax.random.split(jax.random.key(seed), 4)
  hidden = (scale * jax.random.normal(k[0], (b, t, d))).astype(dtype)
  embedding = jax.random.normal(k[1], (v, d)).astype(dtype)
  targets = jax.random.randint(k[2], (b, t), 0, v)
  weights = (jax.random.uniform(k[3], (b, t)) > 0.4).astype(jnp.float32)
  weights = weights.at[0].set(0.0)  # A row with no supervised token at all (e.g. padding).
  return hidden, embedding, targets, weights


def _mean_loss_and_grads(fn, hidden, embedding, targets, weights, *, jit=True, **kw):
  """Mean loss and its gradients w.r.t. hidden, embedding and weights."""

  def mean_loss(h, e, w):
    loss_sum, weight_sum = fn(h, e, targets, w, **kw)
    return loss_sum / weight_sum

  value_and_grad = jax.value_and_grad(mean_loss, argnums=(0, 1, 2))
  if not jit:  # Op by op: each op keeps its own output dtype (see the bf16 test).
    with jax.disable_jit():
      return value_and_grad(hidden, embedding, weights)
  return jax.jit(value_and_grad)(hidden, embedding, weights)


def _assert_close(actual, expected, rtol):
  """Elementwise closeness relative to the largest reference entry (gradients have tiny entries)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_naive_matches_model_head_and_optax():
  """The reference itself: model.output_logits then optax's integer-label cross-entropy."""
  hidden, embedding, targets, weights = _inputs()
  for softcap in (None, 5.0):
    logits = model.output_logits(hidden, embedding, softcap)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss_sum, weight_sum = loss.naive_cross_entropy(hidden, embedding, targets, weights,
                                                    softcap=softcap)
    np.testing.assert_allclose(loss_sum, jnp.sum(weights * ce), rtol=1e-6)
    assert float(weight_sum) == float(weights.sum())


@pytest.mark.parametrize('softcap', [None, 5.0])
@pytest.mark.parametrize('chunk_size', [17, 23, 50, 391, 1000])  # Divides V, or not, or >= V.
def test_chunked_matches_naive(softcap, chunk_size):
  inputs = _inputs(scale=3.0)  # Large logits, so the softcap bends them and the max matters.
  value, grads = _mean_loss_and_grads(loss.chunked_cross_entropy, *inputs, softcap=softcap,
                                      chunk_size=chunk_size)
  ref_value, ref_grads = _mean_loss_and_grads(loss.naive_cross_entropy, *inputs, softcap=softcap)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for name, g, ref in zip(('hidden', 'embedding', 'weights'), grads, ref_grads):
    assert g.shape == ref.shape and g.dtype == ref.dtype, name
    assert np.abs(np.asarray(ref)).max() > 0, name  # The comparison is not between zeros.
    _assert_close(g, ref, rtol=1e-5)
  # Unsupervised positions get no gradient into the hidden states.
  assert not np.any(np.asarray(grads[0])[np.asarray(inputs[3]) == 0])


@pytest.mark.parametrize('chunk_size', [23, 50, 1000])  # Divides V, leaves a remainder, >= V.
@pytest.mark.parametrize('logits_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('unroll', [True, False])
def test_saved_logits_match_recomputed(chunk_size, logits_dtype, unroll):
  """Keeping the chunks' matmul outputs for the backward, unrolled or in a loop, gives the loss
  and gradients that recomputing them gives, with one matmul fewer per chunk in the backward."""
  inputs = _inputs(seed=4, scale=3.0, dtype=jnp.bfloat16)
  kw = dict(softcap=5.0, chunk_size=chunk_size, logits_dtype=logits_dtype)
  # bf16 logits op by op: under jit XLA:CPU would keep the recomputed ones unrounded (see the
  # bf16 test below), while a saved buffer is bf16.
  jit = logits_dtype == jnp.float32
  value, grads = _mean_loss_and_grads(loss.chunked_cross_entropy, *inputs, jit=jit, **kw)
  saved_value, saved_grads = _mean_loss_and_grads(loss.chunked_cross_entropy, *inputs, jit=jit,
                                                  save_logits=True, unroll_saved=unroll, **kw)
  np.testing.assert_allclose(saved_value, value, rtol=1e-6)
  for g, ref in zip(saved_grads, grads):
    assert g.dtype == ref.dtype and np.abs(np.asarray(ref, np.float32)).max() > 0
    _assert_close(g, ref, rtol=1e-6)

  def grad_jaxpr(save_logits):
    def mean_loss(h, e):
      loss_sum, weight_sum = loss.chunked_cross_entropy(h, e, *inputs[2:], save_logits=save_logits,
                                                        unroll_saved=unroll, **kw)
      return loss_sum / weight_sum
    return jax.make_jaxpr(jax.grad(mean_loss, argnums=(0, 1)))(*inputs[:2]).jaxpr

  def logits_matmuls(jaxpr):
    """(matmuls emitting a chunk's [N, C] logits in the step's jaxpr, of them inside loops)."""
    widths = {min(chunk_size, V), V % chunk_size} - {D, 0}
    found = [in_loop for eqn, in_loop in _dots(jaxpr)
             if len(eqn.outvars[0].aval.shape) == 2
             and eqn.outvars[0].aval.shape[0] == B * T and eqn.outvars[0].aval.shape[1] in widths]
    return len(found), sum(found)
  # Recomputed: the loop over the full chunks and the remainder chunk emit them in both passes.
  # Saved in a loop: in the forward pass only. Saved unrolled: one matmul per chunk, straight-line
  # (no loop, no buffer to copy them into).
  full, remainder = divmod(V, min(chunk_size, V))
  assert logits_matmuls(grad_jaxpr(False)) == (2 * (bool(full) + bool(remainder)), 2 * bool(full))
  saved = grad_jaxpr(True)
  if not unroll:
    assert logits_matmuls(saved) == (bool(full) + bool(remainder), bool(full))
    return
  assert logits_matmuls(saved) == (full + bool(remainder), 0)
  # One chunk at a time in each pass: a barrier between consecutive unrolled chunks.
  barriers = [e for e in saved.eqns if e.primitive.name == 'optimization_barrier']
  assert len(barriers) == 2 * (full + bool(remainder) - 1)


@pytest.mark.parametrize('softcap', [30.0, 60.0])  # Shifted by the cap, and by the running max.
def test_saturated_softcap_logits(softcap):
  """Every logit pushed near -cap, where the shifted exponentials are smallest: the loss and its
  gradients equal the naive loss's in both logsumexp shifts (a shift by a cap of 60 would
  underflow them to zero here)."""
  hidden, embedding, targets, weights = _inputs(seed=7)
  hidden = -10.0 * jnp.abs(hidden)
  embedding = jnp.abs(embedding)
  for save, unroll in ((False, True), (True, True), (True, False)):
    value, grads = _mean_loss_and_grads(loss.chunked_cross_entropy, hidden, embedding, targets,
                                        weights, softcap=softcap, chunk_size=50, save_logits=save,
                                        unroll_saved=unroll)
    ref_value, ref_grads = _mean_loss_and_grads(loss.naive_cross_entropy, hidden, embedding,
                                                targets, weights, softcap=softcap)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
      assert np.abs(np.asarray(ref)).max() > 0
      _assert_close(g, ref, rtol=1e-4)


def test_chunked_sums_match_naive_sums():
  """The two sufficient statistics themselves (not only their ratio) agree."""
  inputs = _inputs(seed=1)
  got = loss.chunked_cross_entropy(*inputs, softcap=5.0, chunk_size=50)
  want = loss.naive_cross_entropy(*inputs, softcap=5.0)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert float(got[1]) == float(want[1]) == float(inputs[3].sum())


def test_microbatches_sum_to_the_full_batch_loss():
  """Summing (loss_sum, weight_sum) over microbatches gives exactly the full-batch mean loss and
  gradient, even with a different number of supervised tokens per microbatch."""
  hidden, embedding, targets, weights = _inputs(seed=2, b=6)
  # Jitted: op by op, every primitive of the chunked loss would compile on its own per shape.
  fn = jax.jit(functools.partial(loss.chunked_cross_entropy, softcap=5.0, chunk_size=50))
  grad_fn = jax.jit(jax.grad(lambda e, h, t, w, n: fn(h, e, t, w)[0] / n))
  full_sum, full_count = fn(hidden, embedding, targets, weights)
  full_grad = grad_fn(embedding, hidden, targets, weights, full_count)

  for num_micro in (2, 3, 6):
    parts = [fn(h, embedding, t, w) for h, t, w in zip(
        *(jnp.split(x, num_micro) for x in (hidden, targets, weights)))]
    loss_sum = sum(p[0] for p in parts)
    weight_sum = sum(p[1] for p in parts)
    assert float(weight_sum) == float(full_count)
    np.testing.assert_allclose(loss_sum / weight_sum, full_sum / full_count, rtol=1e-6)
    # Accumulated gradients, each divided by the global token count, equal the full gradient.
    grad = sum(grad_fn(embedding, h, t, w, full_count)
               for h, t, w in zip(*(jnp.split(x, num_micro) for x in (hidden, targets, weights))))
    _assert_close(grad, full_grad, rtol=1e-5)

  # Averaging per-microbatch means would be a different (wrong) number here: the test can fail.
  per_micro = [fn(h, embedding, t, w) for h, t, w in zip(
      *(jnp.split(x, 3) for x in (hidden, targets, weights)))]
  mean_of_means = np.mean([float(s / c) for s, c in per_micro])
  assert abs(mean_of_means - float(full_sum / full_count)) > 1e-3


def _temp_bytes(fn, v, d, n, chunk_size):
  """Temporary buffer bytes XLA plans for jit(value_and_grad) of the mean loss (compile only)."""
  shape = jax.ShapeDtypeStruct
  args = (shape((2, n // 2, d), jnp.float32), shape((v, d), jnp.float32),
          shape((2, n // 2), jnp.int32), shape((2, n // 2), jnp.float32))

  def mean_loss(h, e, t, w):
    loss_sum, weight_sum = fn(h, e, t, w, softcap=30.0, chunk_size=chunk_size)
    return loss_sum / weight_sum

  compiled = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1))).lower(*args).compile()
  stats = compiled.memory_analysis()
  assert stats is not None, 'memory_analysis() is unavailable on this backend'
  return stats.temp_size_in_bytes


def test_peak_memory_is_far_below_naive():
  """Gemma 3's 256k vocabulary, D = 640 (270M), 2048 tokens: the naive forward + backward plans
  several [tokens, V] fp32 buffers (2 GiB each); the chunked one a few [tokens, chunk] blocks.

  fp32 inputs: on CPU, bf16 matmuls are emulated in fp32, which adds an fp32 copy of a bf16
  embedding that a GPU does not make.
  """
  v, d, n, chunk = 262_144, 640, 2048, 8192
  naive = _temp_bytes(loss.naive_cross_entropy, v, d, n, chunk)
  chunked = _temp_bytes(loss.chunked_cross_entropy, v, d, n, chunk)
  mib = 2 ** 20
  print(f'\ntemp bytes, value_and_grad, V={v} D={d} tokens={n} chunk={chunk}: '
        f'naive {naive / mib:.0f} MiB, chunked {chunked / mib:.0f} MiB')
  assert naive >= n * v * 4  # The measure does see the full fp32 logits.
  assert chunked < naive / 4
  # Neither pass holds [tokens, V] (2 GiB) nor a copy of the embedding (640 MiB).
  assert chunked <= 4 * n * chunk * 4


def test_bf16_logits_close_to_fp32():
  """bf16 logits round each logit to 8 bits of mantissa: |Δ logit| <= 2^-9·|logit|, so a token's
  CE (logsumexp minus target logit) moves by at most 2^-8·max|logit|. The mean loss must stay
  inside that bound, gradients within 1% of their largest entry, and each gradient keeps its
  input's dtype.

  Runs op by op: under jit, XLA:CPU folds dot(→bf16) + convert(→fp32) into one fp32 dot, so the
  rounding under test would vanish on CPU (XLA:GPU keeps it).
  """
  hidden, embedding, targets, weights = _inputs(seed=3, b=4, t=16, d=32, v=1009,
                                                dtype=jnp.bfloat16)
  embedding = embedding.astype(jnp.float32) * 0.5  # fp32 master weights, bf16 activations.
  softcap = 30.0
  kw = dict(softcap=softcap, chunk_size=128, jit=False)
  value32, grads32 = _mean_loss_and_grads(loss.chunked_cross_entropy, hidden, embedding, targets,
                                          weights, **kw)
  value16, grads16 = _mean_loss_and_grads(loss.chunked_cross_entropy, hidden, embedding, targets,
                                          weights, logits_dtype=jnp.bfloat16, **kw)
  max_logit = float(jnp.abs(model.output_logits(hidden, embedding, softcap)).max())
  bound = 2.0 ** -8 * max_logit
  print(f'\nmean CE fp32 {float(value32):.6f}, bf16 logits {float(value16):.6f}, '
        f'|Δ| {abs(float(value16 - value32)):.2e} <= bound {bound:.2e}')
  assert abs(float(value16 - value32)) <= bound
  assert float(value16) != float(value32)  # bf16 rounding really happened.
  assert grads16[0].dtype == jnp.bfloat16 and grads16[1].dtype == jnp.float32
  for g16, g32 in zip(grads16, grads32):
    _assert_close(g16, g32, rtol=1e-2)
  # With the same logits_dtype the chunked and naive losses still agree.
  naive16, _ = _mean_loss_and_grads(loss.naive_cross_entropy, hidden, embedding, targets, weights,
                                    logits_dtype=jnp.bfloat16, **kw)
  np.testing.assert_allclose(value16, naive16, rtol=1e-5)


def _dots(jaxpr, in_loop: bool = False) -> list:
  """(equation, inside a loop) for every dot_general of a jaxpr, its loops and calls included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append((eqn, in_loop))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _dots(inner, in_loop or eqn.primitive.name in ('scan', 'while'))
  return found


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """Operand dtypes of every dot_general in a jaxpr."""
  return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn, _ in _dots(jaxpr)]


@pytest.mark.parametrize('logits_dtype, want', [(jnp.bfloat16, {('bfloat16', 'bfloat16')}),
                                                (jnp.float32, {('bfloat16', 'bfloat16'),
                                                               ('float32', 'bfloat16'),
                                                               ('float32', 'float32')})])
def test_backward_matmuls_take_bf16_cotangents(logits_dtype, want):
  """With bf16 activations and bf16 logits, every matmul of forward and backward is bf16 x bf16
  (the fast path on H100); with fp32 logits the backward ones see an fp32 cotangent."""
  hidden, embedding, targets, weights = _inputs(dtype=jnp.bfloat16)

  def mean_loss(h, e):
    loss_sum, weight_sum = loss.chunked_cross_entropy(h, e, targets, weights, softcap=5.0,
                                                      chunk_size=50, logits_dtype=logits_dtype)
    return loss_sum / weight_sum

  dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(mean_loss, argnums=(0, 1)))(
      hidden, embedding).jaxpr)
  assert len(dots) >= 3  # Forward, and the two backward dots.
  assert set(dots) <= want
  if logits_dtype == jnp.float32:
    assert any('float32' in d for d in dots)


def _dot_outputs(jaxpr) -> list[tuple[tuple[int, ...], str]]:
  """(shape, dtype) of every dot_general's output in a jaxpr."""
  return [(tuple(eqn.outvars[0].aval.shape), str(eqn.outvars[0].aval.dtype))
          for eqn, _ in _dots(jaxpr)]


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_embedding_gradient_leaves_its_matmul_in_the_embedding_dtype(dtype):
  """Each chunk's embedding gradient [C, D] comes out of its matmul in the embedding's dtype, so
  under fsdp (tokens split over devices) its sum across devices moves bf16 for a bf16 model."""
  hidden, embedding, targets, weights = _inputs(dtype=dtype)

  def mean_loss(e):
    loss_sum, weight_sum = loss.chunked_cross_entropy(hidden, e, targets, weights, chunk_size=50,
                                                      logits_dtype=jnp.bfloat16)
    return loss_sum / weight_sum

  outputs = _dot_outputs(jax.make_jaxpr(jax.grad(mean_loss))(embedding).jaxpr)
  d_embedding = [o for o in outputs if o[0] in ((50, D), (V % 50, D))]
  assert sorted(o[0][0] for o in d_embedding) == [V % 50, 50]  # The loop's chunk and the rest.
  assert {o[1] for o in d_embedding} == {jnp.dtype(dtype).name}


def test_shape_errors_name_the_shapes():
  hidden, embedding, targets, weights = _inputs()
  with pytest.raises(ValueError, match=r'embedding \(391, 12\)'):
    loss.chunked_cross_entropy(hidden, embedding[:, :12], targets, weights)
  with pytest.raises(ValueError, match=r'targets \(3, 6\)'):
    loss.chunked_cross_entropy(hidden, embedding, targets[:, :6], weights)
  with pytest.raises(ValueError, match='chunk_size'):
    loss.chunked_cross_entropy(hidden, embedding, targets, weights, chunk_size=0)
