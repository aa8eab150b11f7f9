"""Stochastic rounding of fp32 values to bf16, with counter-based random bits.

An Adam step of lr·O(1) = 1e-5 is far below bf16's resolution (2^-8 ≈ 3.9e-3 relative), so
`p + u` rounded to nearest leaves most bf16 weights unchanged and training silently stalls.
Rounding up or down with probability proportional to proximity is unbiased, so small updates
accumulate in expectation.

The same holds for Adam's moments stored in bf16: b2 = 0.999 adds a thousandth of the new
squared gradient to the second moment, under half a bf16 ulp (2^-9 relative), so a moment
rounded to nearest stops following the gradients; rounded stochastically it follows them in
expectation.

The random bits are a hash of (element index, seed) rather than a PRNG stream: 16 bits per element,
computed inside the same fused loop as the optimizer update (no whole-model buffer of random bits),
and the same for an element whichever block of the update loop or device shard computes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash with low bias (xor-shift-multiply, constants 0x7feb352d and
  0x846ca68b): each output bit depends on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def random_bits16(index: jax.Array, seed: jax.Array) -> jax.Array:
  """16 pseudo-random bits (uint32 in [0, 2^16)) for each element index under a uint32 seed.

  Two hash rounds, so the sequences of different seeds are unrelated. Indices are taken modulo
  2^32 (tensors of more than 4.3e9 elements reuse bits at that distance, which is harmless for
  rounding noise).
  """
  index = index.astype(jnp.uint32)
  return _mix(_mix(index) ^ seed.astype(jnp.uint32)) >> 16


def random_bits16x3(index: jax.Array, seed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Three independent sets of 16 random bits per element: `random_bits16(index, seed)` first
  (a bf16 param's, unchanged), then both halves of one more hash round of the same 32-bit hash
  (two bf16 Adam moments')."""
  h = _mix(_mix(index.astype(jnp.uint32)) ^ seed.astype(jnp.uint32))
  more = _mix(h)
  return h >> 16, more >> 16, more & jnp.uint32(0xFFFF)


def fold_seed(seed: jax.Array, index: int) -> jax.Array:
  """A uint32 seed for stream `index` (e.g. a parameter leaf) derived from a step's seed."""
  return _mix(_mix(jnp.asarray(seed, jnp.uint32)) ^ jnp.uint32(index))


def stochastic_round_to_bf16(x: jax.Array, bits16: jax.Array) -> jax.Array:
  """Rounds float32 x to bfloat16 up or down with probability proportional to proximity.

  bf16 is the top 16 bits of an fp32 pattern. Adding uniform random bits in [0, 2^16) to the
  pattern and truncating the low 16 bits rounds the *magnitude* up with probability equal to the
  truncated fraction, so E[result] = x for either sign (fp32 is sign-magnitude, so the same
  integer addition works for negatives). Carries into the exponent are correct rounding up to the
  next binade. NaNs are passed through (a NaN whose payload is only in the low bits would
  otherwise truncate to inf).

  Args:
    x: values to round (cast to float32 first).
    bits16: uint32 random bits in [0, 2^16), shaped like x (`random_bits16`).

  Returns:
    bfloat16 array shaped like x.
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + bits16.astype(jnp.uint32)) & jnp.uint32(0xFFFF0000)
  # Exact: the low 16 bits are zero, so the fp32 value is representable in bf16.
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), y)


def strides(shape: tuple[int, ...]) -> list[int]:
  """Row-major element strides of `shape`, modulo 2^32 (element indices are uint32)."""
  out, stride = [], 1
  for n in reversed(shape):
    out.append(stride % (1 << 32))
    stride *= n
  return out[::-1]


def element_index(shape: tuple[int, ...], offset: jax.Array | int = 0) -> jax.Array:
  """uint32 row-major element indices of an array of `shape`, plus `offset`.

  Built from one broadcasted iota per axis (not a reshaped flat iota), so it partitions like any
  elementwise op when the array is sharded.
  """
  index = jnp.asarray(offset, jnp.uint32)
  for axis, stride in enumerate(strides(shape)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
  return jnp.broadcast_to(index, shape)
