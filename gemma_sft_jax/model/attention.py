"""Attention arithmetic for transformer.py's Attention layer: rotary embeddings, the mask, and
scores -> softmax -> weighted values over keys and values already in the KV cache's layout.

Axis names follow transformer.py: B batch, T queries, S keys, K kv heads, G query heads per kv
head, H head dim, P a shared prefix's keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma_sft_jax.model import architecture

Array = jax.Array

NEG_INF = -2.3819763e38  # Finite, so fully masked rows (padding) give a uniform softmax, not NaN.
NO_WINDOW = 1 << 30  # A traced window of a global layer: farther than any sequence.


def rope(x: Array, positions: Array, base: float, scale: float) -> Array:
  """Rotary embedding on the last axis of x [B, T, N, H], halves-rotation as in Gemma/transformers."""
  h = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)) / scale
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_pos: Array, q_seg: Array, k_pos: Array, k_seg: Array,
                   window: int | None) -> Array:
  """[B, T, S] True where query t may attend key s: same segment, causal, inside the window."""
  q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos <= q_pos)
  if window is not None:
    mask &= q_pos - k_pos < window
  return mask


def layer_window(c: architecture.ModelConfig, local: Any) -> Any:
  """A layer's sliding window for `attention_mask`: `local` is a Python bool, a traced bool
  (scanned layers: the window is then NO_WINDOW where it is False) or None (global)."""
  if c.sliding_window is None or local is None or local is False:
    return None
  if local is True:
    return c.sliding_window
  return jnp.where(local, c.sliding_window, NO_WINDOW)


def scale_queries(c: architecture.ModelConfig, q: Array) -> Array:
  """Queries scaled by query_pre_attn_scalar^-1/2, in their dtype."""
  return q * jnp.asarray(c.query_pre_attn_scalar ** -0.5, q.dtype)


def attend(c: architecture.ModelConfig, q: Array, key: Array, val: Array, positions: Array,
           segment_ids: Array, k_pos: Array, k_seg: Array, local: Any,
           shared: dict[str, Array] | None, *, dtype: Any) -> Array:
  """Softcapped, masked dot-product attention with grouped kv heads.

  Args:
    c: the model config (heads, softcap, sliding window, query scaling).
    q: [B, T, N, H] queries (rotated); key, val: [B, K, S, H].
    positions, segment_ids: [B, T] of the queries; k_pos, k_seg: [B, S] of the keys.
    local: a Python bool (this layer is sliding-window or not), or a traced bool (scanned
      layers), or None (global).
    shared: optional one-row cache {'k', 'v': [1, K, P, H], 'pos', 'seg': [1, P]} of a prefix
      every row continues; attended before `key`.
    dtype: the compute dtype of the probabilities and the output.

  Returns:
    [B, T, N, H].
  """
  b, t, n, h = q.shape
  k = c.num_kv_heads
  q = scale_queries(c, q).reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
  # Scores as [B, K, T, G, S]: the order a batched matmul over (B, K) yields (the query's free
  # axes, then the key's), so the softmax runs over the minor axis and nothing is transposed.
  logits = jnp.einsum('BTKGH,BKSH->BKTGS', q, key, preferred_element_type=jnp.float32)
  if shared is not None:
    # A prefix every row shares (one copy, [1, K, P, H]): its scores come first, from one
    # matmul over all rows, and its keys are read once per step instead of once per row.
    shared_k, shared_v = shared['k'][0].astype(dtype), shared['v'][0].astype(dtype)
    logits = jnp.concatenate([jnp.einsum('BTKGH,KSH->BKTGS', q, shared_k,
                                         preferred_element_type=jnp.float32), logits], axis=-1)
    rows = lambda a: jnp.broadcast_to(a, (b, a.shape[1])).astype(jnp.int32)
    k_pos = jnp.concatenate([rows(shared['pos']), k_pos], axis=1)
    k_seg = jnp.concatenate([rows(shared['seg']), k_seg], axis=1)
  if c.attn_logit_softcap is not None:
    logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
  mask = attention_mask(positions, segment_ids, k_pos, k_seg, layer_window(c, local))
  logits = jnp.where(mask[:, None, :, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  if shared is not None:  # The two parts of the weighted sum, added in fp32.
    split = shared_k.shape[1]
    out = (jnp.einsum('BKTGS,KSH->BTKGH', probs[..., :split], shared_v,
                      preferred_element_type=jnp.float32) +
           jnp.einsum('BKTGS,BKSH->BTKGH', probs[..., split:], val,
                      preferred_element_type=jnp.float32)).astype(dtype)
  else:
    out = jnp.einsum('BKTGS,BKSH->BTKGH', probs, val)
  return out.reshape(b, t, n, h)
