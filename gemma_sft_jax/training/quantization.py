"""8-bit blockwise quantisation of optimizer moments (bitsandbytes' dynamic maps).

A moment of shape [..., n] is stored as int8 (signed map, first moment) or uint8 (unsigned map,
second moment) codes of the same shape, plus an fp32 absmax per block of 256 elements along the
LAST axis ([..., ceil(n / 256)]), so codes and scales shard like the param. The maps follow
Dettmers et al. 2022: seven decades of ~constant relative precision, which suits Adam moments
spread over orders of magnitude within a block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 256

# ---- Dynamic quantisation maps. ------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def dynamic_map(*, signed: bool) -> np.ndarray:
  """The 256 sorted code values of bitsandbytes' dynamic map, in [-1, 1] (signed) or [0, 1].

  A code is a decimal exponent e in {-6..0} plus a linear fraction: the values 10^e · mid, where
  `mid` runs over the midpoints of an even split of [0.1, 1] into 2^(e+6) parts (signed, with both
  signs) or 2^(e+7) parts (unsigned: the sign bit buys one more fraction bit). Plus 0 and 1.0.
  So the map covers seven decades with ~constant relative precision, which suits Adam moments
  spread over orders of magnitude within a block. The signed map has 1.0 but not -1.0.

  Args:
    signed: the signed map (first moment) or the unsigned one (second moment).

  Returns:
    A read-only float32 array of 256 increasing values.
  """
  values = [0.0, 1.0]
  for i in range(7):
    parts = 2 ** i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, parts + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
    values.extend(mids)
    if signed:
      values.extend(-mids)
  table = np.sort(np.asarray(values, np.float32))
  assert table.size == 256 and np.all(np.diff(table) > 0), table
  table.flags.writeable = False
  return table


def code_offset(signed: bool) -> int:
  # int8 codes are table indices shifted by -128 (so they fit a signed byte); uint8 codes are
  # the indices themselves.
  return 128 if signed else 0


class QuantizedArray(NamedTuple):
  """An 8-bit blockwise-quantised array: x[..., j] ≈ map[codes[..., j]] · scales[..., j // 256]."""
  codes: jax.Array   # [..., n] int8 (signed map) or uint8 (unsigned map)
  scales: jax.Array  # [..., ceil(n / block)] float32 absmax per block


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


class CodeSegments(NamedTuple):
  """The non-negative half of a dynamic map as nine linear segments, for `nearest_code_index`.

  Segment s holds the values in (thresholds[s - 1], thresholds[s]] (s = 0: from 0; s = 8: up to
  1): the zero code, the seven decades, the top code 1.0. The thresholds are the midpoints
  between segments, so every value of a segment has its nearest code there: the code at index
  first(s) + min(floor(value · slope[s] + offset[s]), last[s]), where first(s) is the segment's
  first index (`segment_first_index`).
  """
  thresholds: np.ndarray  # [8] float32
  tables: np.ndarray      # [3, 16] float32: slope, offset, last per segment (9 used)


@functools.lru_cache(maxsize=2)
def code_segments(*, signed: bool) -> CodeSegments:
  """`CodeSegments` of `dynamic_map(signed)`."""
  table = dynamic_map(signed=signed)
  mids = (table[:-1] + table[1:]) / 2
  zero = 127 if signed else 0
  slope, offset, last = np.zeros((3, 16), np.float64)
  thresholds = [mids[zero]]
  for i in range(7):  # decade i: codes 10^(i-6) · [0.1, 1), `parts` of them
    parts = 2 ** (i + (0 if signed else 1))
    per_unit = parts / 0.9
    slope[i + 1] = 10.0 ** (6 - i) * per_unit
    offset[i + 1] = -0.1 * per_unit
    last[i + 1] = parts - 1
    first = segment_first_index(i + 1, signed=signed)
    thresholds.append(mids[first + parts - 1])  # to the next decade's first code (or to 1.0)
  return CodeSegments(np.asarray(thresholds, np.float32),
                      np.stack([slope, offset, last]).astype(np.float32))


def segment_first_index(s, *, signed: bool):
  """Index of segment s's first code: the zero code, decade s - 1's smallest code, 1.0. The
  signed map's positive half has 2^i codes in decade i from 128, the unsigned map 2^(i+1) from
  1, so this is arithmetic in s (int or int32 array)."""
  if signed:
    return 127 + ((1 << s) >> 1)
  return (1 << s) - 1


def nearest_code_index(normed: jax.Array, *, signed: bool, lookup=None) -> jax.Array:
  """Index (into `dynamic_map(signed)`) of the code nearest to each value in [-1, 1] / [0, 1].

  `searchsorted(midpoints, normed, side='left')` (the tested reference) computed in a few
  operations: eight comparisons with the `code_segments` thresholds give the segment s a value
  lies in (the zero code, one of the seven decades, the top code); the segment's three
  constants then give the index with one multiply-add, a floor and a min. Equal to the
  reference except within float rounding of a midpoint (ties included), where either
  neighbour may come out.

  Args:
    normed: values divided by their block absmax.
    signed: which map.
    lookup: how the constants are found. None: each selected by the comparisons (XLA keeps
      that inside the update's elementwise fusion, where a table lookup would split it).
      Otherwise `lookup(k, s)` -> row k (0: slope, 1: offset, 2: last) of `code_segments(signed)
      .tables` at the int32 segments s: the Pallas kernel loads them from a small table, which
      costs fewer operations than the selects.

  Returns:
    int32 indices in [0, 255].
  """
  segments = code_segments(signed=signed)
  a = jnp.abs(normed) if signed else normed
  above = [a > t for t in segments.thresholds]
  s = sum(x.astype(jnp.int32) for x in above)
  if lookup is None:
    consts = []
    for row in segments.tables:
      c = jnp.float32(row[0])
      for j, x in enumerate(above):
        c = jnp.where(x, row[j + 1], c)
      consts.append(c)
    slope, offset, last = consts
  else:
    slope, offset, last = (lookup(k, s) for k in range(3))
  index = (segment_first_index(s, signed=signed)
           + jnp.minimum(jnp.floor(a * slope + offset), last).astype(jnp.int32))
  if signed:
    # Negative codes mirror the positive ones around 0 (index 127), except that there is no
    # -1.0: the most negative code is the mirror of 0.99297.
    index = jnp.where(normed < 0, 254 - jnp.minimum(index, 254), index)
  return index


def block_absmax(x: jax.Array, *, block_size: int = BLOCK_SIZE) -> jax.Array:
  """max |x| per block of `block_size` along the last axis: [..., n] -> [..., ceil(n / block)]."""
  return jnp.max(jnp.abs(_blocks(x.astype(jnp.float32), block_size)), axis=-1)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  *lead, n = x.shape
  nb = num_blocks(n, block_size)
  xb = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block_size - n)])
  return xb.reshape(*lead, nb, block_size)


def quantize_blockwise(x: jax.Array, *, signed: bool, block_size: int = BLOCK_SIZE,
                       absmax: jax.Array | None = None) -> QuantizedArray:
  """Quantises x along its last axis in blocks, to the nearest code of the dynamic map.

  Args:
    x: an array of rank >= 1; the last axis is padded (with zeros) to a multiple of block_size.
    signed: the signed map and int8 codes, or the unsigned map and uint8 codes (x >= 0).
    block_size: elements per absmax block.
    absmax: x's `block_absmax`, if already computed (then quantising is elementwise).

  Returns:
    QuantizedArray with codes shaped like x and scales [..., ceil(n / block_size)].
  """
  *lead, n = x.shape
  nb = num_blocks(n, block_size)
  xb = _blocks(x.astype(jnp.float32), block_size)
  if absmax is None:
    absmax = block_absmax(x, block_size=block_size)
  normed = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  index = nearest_code_index(normed, signed=signed)
  index = index.reshape(*lead, nb * block_size)[..., :n]
  codes = (index - code_offset(signed)).astype(jnp.int8 if signed else jnp.uint8)
  return QuantizedArray(codes=codes, scales=absmax)


def dequantize_blockwise(q: QuantizedArray, *, block_size: int = BLOCK_SIZE) -> jax.Array:
  """The float32 values of a QuantizedArray (the map follows from the code dtype)."""
  signed = q.codes.dtype == jnp.int8
  table = jnp.asarray(dynamic_map(signed=signed))
  values = table[q.codes.astype(jnp.int32) + code_offset(signed)]
  n = q.codes.shape[-1]
  return values * jnp.repeat(q.scales, block_size, axis=-1)[..., :n]


def zero_quantized(shape: tuple[int, ...], *, signed: bool, block_size: int) -> QuantizedArray:
  zero_code = int(np.searchsorted(dynamic_map(signed=signed), 0.0)) - code_offset(signed)
  return QuantizedArray(
      codes=jnp.full(shape, zero_code, jnp.int8 if signed else jnp.uint8),
      scales=jnp.zeros((*shape[:-1], num_blocks(shape[-1], block_size)), jnp.float32))


