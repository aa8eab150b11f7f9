"""Next-token cross-entropy through the tied output head, in vocabulary chunks.

Gemma's vocabulary is 256k, so the full fp32 logits of one batch are huge: 2048 tokens x 262,144
columns x 4 bytes = 2 GiB, and autodiff would keep them (and their cotangent) alive for the backward
pass. `chunked_cross_entropy` never forms them: it walks the vocabulary in chunks of `chunk_size`
rows of the embedding, keeping per-token running statistics (a logsumexp shifted by the running
maximum, or by the softcap that bounds every logit: one pass per chunk), and its custom VJP
recomputes each chunk's logits in the backward pass. Peak extra memory is a few [tokens, chunk]
fp32 blocks instead of several [tokens, V] ones. Where memory allows, `save_logits` keeps the
chunks' matmul outputs ([tokens, V] in the logits dtype, e.g. bf16) for the backward pass instead.

Both functions return sufficient statistics, `(loss_sum, weight_sum)`, not a mean: the train step
divides the sum of `loss_sum` by the sum of `weight_sum` over every microbatch and process, so the
loss is the same number for any accumulation count, packing layout or process count.

Axis names follow transformer.py: N tokens (B·T flattened), D model dim, V vocabulary, C vocab chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# A softcap up to this shifts the logsumexp by the cap in one pass (`_forward_stats`): the
# smallest term, exp(-2 cap) = 1.8e-35 at 40, stays a normal fp32 number (>= 1.2e-38), so it is
# neither flushed to zero on GPUs nor less exact than the others. Gemma 2's cap is 30.
MAX_SHIFT_CAP = 40.0


def _raw_logits(hidden_ND: Array, embedding_CD: Array, logits_dtype: Any) -> Array:
  """The chunk matmul's output [N, C] in `logits_dtype` (accumulated in fp32 inside the dot)."""
  return jnp.einsum('ND,CD->NC', hidden_ND, embedding_CD.astype(hidden_ND.dtype),
                    preferred_element_type=logits_dtype)


def _capped(raw_NC: Array, softcap: float | None) -> Array:
  """fp32 logits from the matmul's output, softcapped when the model says so."""
  logits_NC = raw_NC.astype(jnp.float32)
  if softcap is not None:
    logits_NC = jnp.tanh(logits_NC / softcap) * softcap
  return logits_NC


def _logits(hidden_ND: Array, embedding_CD: Array, softcap: float | None,
            logits_dtype: Any) -> Array:
  """fp32 logits [N, C] of one vocabulary chunk, softcapped when the model says so.

  The matmul runs in the activation dtype and emits `logits_dtype` (accumulation is fp32 inside
  the dot either way); everything after it is fp32.
  """
  return _capped(_raw_logits(hidden_ND, embedding_CD, logits_dtype), softcap)


def _over_chunks(fn, carry, vocab_size: int, chunk_size: int, unroll: bool = False):
  """Folds `fn(carry, start, width)` over the vocabulary: the full chunks, then the remainder as
  one narrower chunk of static width, so no padded copy of the embedding is made and no columns
  need masking. The full chunks run in a loop, or, with `unroll`, as straight-line code with
  static starts: then `fn` may change the carry's structure (e.g. append each chunk's matmul
  output to a tuple), and each chunk's ops are XLA's own (no loop buffers to fill and copy
  into). Either way one chunk runs at a time."""
  num_full, rem = divmod(vocab_size, chunk_size)
  if unroll:
    for i in range(num_full):
      # The whole carry (the step's inputs too) passes a barrier between chunks, so each chunk
      # starts after the previous one ends, as in the loop. Without it XLA hoisted chunks' work
      # ahead and held more at once: +4 GiB for Gemma 2 2B full SFT and 9B LoRA on an H200.
      carry = fn(jax.lax.optimization_barrier(carry) if i else carry, i * chunk_size, chunk_size)
    if rem and num_full:
      carry = jax.lax.optimization_barrier(carry)
  elif num_full:
    carry = jax.lax.fori_loop(0, num_full, lambda i, c: fn(c, i * chunk_size, chunk_size), carry)
  return fn(carry, num_full * chunk_size, rem) if rem else carry


def _is_target(targets_N: Array, start: Any, width: int) -> Array:
  """[N, width] bool: column j of the chunk starting at `start` is the token's target."""
  return (targets_N - start)[:, None] == jnp.arange(width, dtype=targets_N.dtype)[None, :]


def _forward_stats(hidden_ND, embedding_VD, targets_N, softcap, chunk_size, logits_dtype,
                   save=''):
  """Per-token logsumexp and target logit [N] in fp32, in one pass over the vocabulary chunks.

  The logsumexp subtracts a shift before exponentiating. Without a softcap the shift is the
  running maximum (an online logsumexp: the sum is rescaled when the maximum grows), which needs
  each chunk's maximum before its exponentials: two passes over the chunk's logits. With a
  softcap every logit lies in [-cap, cap], so for a cap up to `MAX_SHIFT_CAP` the shift is the
  constant cap: exp(logit - cap) lies in [e^-2cap, 1], never overflowing nor underflowing fp32
  (Gemma 2's cap of 30: e^-60 ~ 1e-26): one pass, whose terms are each as exact as the rescaled
  ones.

  `save` keeps every chunk's matmul output (`logits_dtype`) as the third result. 'unrolled':
  the chunks are unrolled (`_over_chunks(unroll=True)`) and the result is a tuple of them in
  vocabulary order, each kept as the matmul wrote it, with no buffer to fill or copy it into.
  'loop': the chunks stay in a loop, which writes the full chunks into one [full chunks, N,
  chunk_size] buffer; the result is (that buffer or None, the remainder or None). '': ().
  """
  n = hidden_ND.shape[0]
  constant_shift = softcap is not None and softcap <= MAX_SHIFT_CAP

  def step(carry, start, width):
    (hidden_ND, embedding_VD), (shift_N, sumexp_N, target_N), saved = carry
    raw_NC = _raw_logits(hidden_ND, jax.lax.dynamic_slice_in_dim(embedding_VD, start, width),
                         logits_dtype)
    logits_NC = _capped(raw_NC, softcap)
    if not constant_shift:
      new_shift_N = jnp.maximum(shift_N, logits_NC.max(axis=-1))
      # exp(-inf - finite) = 0 on the first chunk, so the -inf start needs no special case.
      sumexp_N = sumexp_N * jnp.exp(shift_N - new_shift_N)
    else:
      new_shift_N = shift_N
    sumexp_N += jnp.exp(logits_NC - new_shift_N[:, None]).sum(axis=-1)
    # Exactly one chunk holds each target: its logit is gathered (one per token) from the
    # matmul's output, so the chunk's only full pass is the sum of exponentials above. (A masked
    # sum over the chunk beside it made XLA write the chunk's fp32 logits out for both.)
    index_N = targets_N - start
    picked_N = jnp.take_along_axis(raw_NC, jnp.clip(index_N, 0, width - 1)[:, None], axis=1)[:, 0]
    target_N += jnp.where((index_N >= 0) & (index_N < width), _capped(picked_N, softcap), 0.0)
    if save == 'unrolled':
      saved += (raw_NC,)
    elif save and width == chunk_size:
      saved = (jax.lax.dynamic_update_index_in_dim(saved[0], raw_NC, start // chunk_size, 0),
               saved[1])
    elif save:
      saved = (saved[0], raw_NC)
    return (hidden_ND, embedding_VD), (new_shift_N, sumexp_N, target_N), saved

  shift = softcap if constant_shift else -jnp.inf
  init = (jnp.full((n,), shift, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32))
  num_full = embedding_VD.shape[0] // chunk_size
  saved = () if save != 'loop' else (
      jnp.zeros((num_full, n, chunk_size), logits_dtype) if num_full else None, None)
  _, (shift_N, sumexp_N, target_N), saved = _over_chunks(
      step, ((hidden_ND, embedding_VD), init, saved), embedding_VD.shape[0], chunk_size,
      unroll=save == 'unrolled')
  return shift_N + jnp.log(sumexp_N), target_N, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_ce(hidden_ND, embedding_VD, targets_N, weights_N, softcap, chunk_size, logits_dtype,
                save):
  del save  # Only the backward pass differs.
  lse_N, target_N, _ = _forward_stats(hidden_ND, embedding_VD, targets_N, softcap, chunk_size,
                                      logits_dtype)
  return jnp.sum(weights_N * (lse_N - target_N)), jnp.sum(weights_N)


def _chunked_ce_fwd(hidden_ND, embedding_VD, targets_N, weights_N, softcap, chunk_size,
                    logits_dtype, save):
  lse_N, target_N, saved = _forward_stats(hidden_ND, embedding_VD, targets_N, softcap,
                                          chunk_size, logits_dtype, save)
  ce_N = lse_N - target_N
  # Residuals are the inputs plus two [N] vectors, and the chunks' logits where they are kept
  # (else they are recomputed in the backward).
  residuals = (hidden_ND, embedding_VD, targets_N, weights_N, lse_N, ce_N, saved)
  return (jnp.sum(weights_N * ce_N), jnp.sum(weights_N)), residuals


def _chunked_ce_bwd(softcap, chunk_size, logits_dtype, save, residuals, cotangents):
  hidden_ND, embedding_VD, targets_N, weights_N, lse_N, ce_N, saved = residuals
  g_loss, g_weight_sum = cotangents
  coef_N = (g_loss * weights_N)[:, None]

  def step(carry, start, width):
    (hidden_ND, embedding_VD, saved), d_hidden_ND, d_embedding = carry
    embedding_CD = jax.lax.dynamic_slice_in_dim(embedding_VD, start, width)
    if save == 'unrolled':  # The chunks' logits in order; each is freed once used.
      raw_NC, saved = saved[0], saved[1:]
    elif save and width == chunk_size:
      raw_NC = jax.lax.dynamic_index_in_dim(saved[0], start // chunk_size, 0, keepdims=False)
    elif save:
      raw_NC = saved[1]
    else:  # Recompute the chunk's logits.
      raw_NC = _raw_logits(hidden_ND, embedding_CD, logits_dtype)
    logits_NC = _capped(raw_NC, softcap)
    # d CE / d logit = softmax - onehot(target), scaled by the token's weight.
    d_logits_NC = coef_N * (jnp.exp(logits_NC - lse_N[:, None])
                            - _is_target(targets_N, start, width).astype(jnp.float32))
    if softcap is not None:  # d/du cap·tanh(u/cap) = 1 - tanh² = 1 - (logit/cap)².
      d_logits_NC = d_logits_NC * (1.0 - jnp.square(logits_NC / softcap))
    # The cotangent enters the two matmuls in `logits_dtype`: bf16 keeps them at bf16 speed,
    # exactly as autodiff would through a matmul that emitted bf16.
    d_logits_NC = d_logits_NC.astype(logits_dtype)
    d_hidden_ND += jnp.einsum('NC,CD->ND', d_logits_NC, embedding_CD.astype(hidden_ND.dtype),
                              preferred_element_type=jnp.float32)
    # The chunk's embedding gradient leaves the matmul in the embedding's dtype (accumulated in
    # fp32 inside it): with tokens split over devices, the sum across them (a reduce-scatter per
    # chunk under fsdp) then moves bf16, not fp32, for a bf16 embedding.
    d_embedding_CD = jnp.einsum('NC,ND->CD', d_logits_NC, hidden_ND,
                                preferred_element_type=embedding_VD.dtype)
    # Each vocabulary row belongs to exactly one chunk, so a write (in place) suffices.
    d_embedding = jax.lax.dynamic_update_slice_in_dim(d_embedding, d_embedding_CD, start,
                                                      axis=0)
    return (hidden_ND, embedding_VD, saved), d_hidden_ND, d_embedding

  init = ((hidden_ND, embedding_VD, saved), jnp.zeros(hidden_ND.shape, jnp.float32),
          jnp.zeros_like(embedding_VD))
  _, d_hidden_ND, d_embedding_VD = _over_chunks(step, init, embedding_VD.shape[0], chunk_size,
                                                unroll=save == 'unrolled')
  d_weights_N = g_loss * ce_N + g_weight_sum
  return d_hidden_ND.astype(hidden_ND.dtype), d_embedding_VD, None, d_weights_N


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def _check_shapes(hidden: Array, embedding: Array, targets: Array, weights: Array) -> None:
  if hidden.ndim != 3 or embedding.ndim != 2 or hidden.shape[-1] != embedding.shape[-1]:
    raise ValueError(f'cross_entropy: hidden {hidden.shape} must be [B, T, D] and embedding '
                     f'{embedding.shape} [V, D] with the same D')
  if targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
    raise ValueError(f'cross_entropy: targets {targets.shape} and weights {weights.shape} must be '
                     f'[B, T] = {hidden.shape[:2]}')


def chunked_cross_entropy(hidden: Array, embedding: Array, targets: Array, weights: Array, *,
                          softcap: float | None = None, chunk_size: int = 8192,
                          logits_dtype: Any = jnp.float32,
                          save_logits: bool = False,
                          unroll_saved: bool = True) -> tuple[Array, Array]:
  """Weighted next-token cross-entropy through the tied head, without forming [B·T, V] fp32 logits.

  Logits are hidden · embeddingᵀ, then `tanh(z / softcap) · softcap` when `softcap` is given,
  then log-softmax, computed over vocabulary chunks with an online logsumexp (fp32 statistics).
  The backward pass (a custom VJP) recomputes each chunk's logits, so neither pass holds more
  than a few [B·T, chunk_size] fp32 blocks.

  Args:
    hidden: [B, T, D] final-normed hidden states (bf16 or fp32); the matmuls run in this dtype.
    embedding: [V, D] tied embedding (any dtype; cast to hidden's dtype for the matmul).
    targets: [B, T] int token each position predicts (already shifted), in [0, V).
    weights: [B, T] float loss weights; 0 = no loss (prompt, padding).
    softcap: Gemma's final logit softcap, or None.
    chunk_size: vocabulary rows per chunk. It need not divide V: the remainder is one narrower
      chunk. Memory scales with B·T·chunk_size.
    logits_dtype: dtype the chunk matmul emits (accumulation is fp32 inside the dot; the result
      is cast to fp32 for the statistics). bfloat16 makes the cotangent entering the backward
      matmuls bf16, which runs them at bf16 speed (an fp32 cotangent makes XLA run them in
      fp32) at the cost of rounding each logit to bf16; float32 (default) is exact. For Gemma 2
      2B full SFT on an H200 bfloat16 made the whole step 11% faster (BENCHMARKS.md, "Levers
      measured"). (Under jit, XLA:CPU fuses the bf16 output back into an fp32 dot, so on CPU the
      forward logits may stay unrounded.)
    save_logits: keep every chunk's matmul output ([B·T, V] in `logits_dtype`: 2 GiB for 4096
      tokens of a 256k vocabulary in bf16) for the backward pass instead of recomputing it,
      so the head's forward matmul runs once per step, not twice. Same values either way.
    unroll_saved: with `save_logits`, unroll the chunks, each keeping its logits as the matmul
      wrote them (no 2 GiB buffer to zero-fill and copy them into: Gemma 2 2B full SFT +2.7% on
      one H200); False keeps the chunks in a loop writing one buffer, where XLA gathers an
      embedding sharded over the devices once for the whole loop instead of chunk by chunk
      (the same 2B at fsdp=2: +2.7% per GPU that way). Same values either way.

  Returns:
    (loss_sum, weight_sum), fp32 scalars: the sum over tokens of weight · CE and the sum of
    weights. Divide the totals over all microbatches and processes, so the mean is over the
    global count of supervised tokens.
  """
  _check_shapes(hidden, embedding, targets, weights)
  if chunk_size < 1:
    raise ValueError(f'cross_entropy: chunk_size must be positive, got {chunk_size}')
  d = hidden.shape[-1]
  save = ('unrolled' if unroll_saved else 'loop') if save_logits else ''
  return _chunked_ce(hidden.reshape(-1, d), embedding, targets.reshape(-1).astype(jnp.int32),
                     weights.reshape(-1).astype(jnp.float32),
                     None if softcap is None else float(softcap),
                     min(int(chunk_size), embedding.shape[0]), jnp.dtype(logits_dtype), save)


def naive_cross_entropy(hidden: Array, embedding: Array, targets: Array, weights: Array, *,
                        softcap: float | None = None, chunk_size: int = 8192,
                        logits_dtype: Any = jnp.float32,
                        save_logits: bool = False,
                        unroll_saved: bool = True) -> tuple[Array, Array]:
  """The same loss as `chunked_cross_entropy`, forming the full [B, T, V] logits.

  The reference in tests, and fine for small vocabularies. Same arguments and result;
  `chunk_size`, `save_logits` and `unroll_saved` are accepted for a drop-in signature and
  ignored.
  """
  del chunk_size, save_logits, unroll_saved  # One chunk: the whole vocabulary, kept by autodiff.
  _check_shapes(hidden, embedding, targets, weights)
  logits_BTV = _logits(hidden.reshape(-1, hidden.shape[-1]), embedding, softcap,
                       logits_dtype).reshape(*hidden.shape[:2], -1)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * (lse_BT - target_BT)), jnp.sum(weights)
