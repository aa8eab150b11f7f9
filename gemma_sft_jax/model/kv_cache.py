"""The explicit KV cache: {'layer_i': {'k', 'v', 'pos', 'seg'}} per layer, or {'layers': ...} with a
leading [L] axis for scanned layers. A token goes to slot `position % slots`, so a sliding-window
layer may keep a ring of window size; segment id 0 marks an empty slot.

Keys and values are stored [B, K, S, H] (batch, kv heads, slots, head dim), `pos` and `seg`
[B, S]: the layout the attention matmul reads (batched over B and K, contracting H), so the cache
is read as it lies instead of being transposed at every decode step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma_sft_jax.model import architecture

Array = jax.Array
Cache = dict[str, dict[str, Array]]


def write_cache(cache: dict[str, Array], key: Array, val: Array, positions: Array,
                segment_ids: Array, *, layer: Array | None = None) -> dict[str, Array]:
  """One layer's cache with this call's tokens written, each at slot `position % slots`.

  Padding (segment 0) is not written. A cache shorter than the sequence is thus a ring that
  holds the latest positions (a sliding-window layer's whole view when it has window-many
  slots); of a call's tokens only those within `slots` of the row's last position are kept.
  With `layer`, `cache` is stacked ([L, B, S, ...]) and only that layer is written.
  """
  lead = () if layer is None else (layer,)
  size = cache['pos'].shape[-1]
  positions = positions.astype(jnp.int32)
  slots = positions % size
  rows = jnp.arange(key.shape[0])[:, None]
  if key.shape[1] > 1:  # A prefill: padding and positions a ring has no room for are dropped.
    last = jnp.max(jnp.where(segment_ids > 0, positions, -1), axis=1, keepdims=True)
    slots = jnp.where((segment_ids > 0) & (positions > last - size), slots, size)
  # One scatter per array, indexed by (layer,) row, slot: it updates the cache in place. For
  # keys and values the kv-head axis sits between row and slot; the indexed result is then
  # [B, T, K, H] (NumPy puts index axes first when a slice separates them), as `key` is.
  put = lambda a, new, *mid: a.at[(*lead, rows, *mid, slots)].set(
      new.astype(a.dtype), mode='drop', unique_indices=True)
  every = slice(None)
  return {'k': put(cache['k'], key, every), 'v': put(cache['v'], val, every),
          'pos': put(cache['pos'], positions), 'seg': put(cache['seg'], segment_ids)}


def cache_lengths(config: architecture.ModelConfig, length: int, *, ring: bool) -> list[int]:
  """Slots per layer for a cache covering `length` tokens: with `ring`, sliding-window layers
  keep only a window's worth (their keys further back are never attended again)."""
  window = config.sliding_window
  return [min(length, window) if ring and window and kind == architecture.SLIDING else length
          for kind in config.layer_types]


def init_cache(config: architecture.ModelConfig, batch_size: int, length: int,
               dtype: Any = jnp.bfloat16, *, stacked: bool = False, ring: bool = False) -> Cache:
  """An empty KV cache of `length` slots per layer (segment id 0 marks a slot as empty).

  `stacked` (for scan_layers models): one {'layers': ...} entry with a leading [L] axis.
  `ring`: sliding-window layers get a ring of window size instead (unrolled layers only, as the
  layers' caches then differ in length; see `cache_lengths`).
  """
  if stacked and ring:
    raise ValueError('a ring cache needs unrolled layers (its layers differ in length)')

  def layer(lead, n):
    k_shape = (*lead, batch_size, config.num_kv_heads, n, config.head_dim)
    return {'k': jnp.zeros(k_shape, dtype), 'v': jnp.zeros(k_shape, dtype),
            'pos': jnp.zeros((*lead, batch_size, n), jnp.int32),
            'seg': jnp.zeros((*lead, batch_size, n), jnp.int32)}

  if stacked:
    return {'layers': layer((config.num_layers,), length)}
  return {f'layer_{i}': layer((), n)
          for i, n in enumerate(cache_lengths(config, length, ring=ring))}
