"""One leaf's 8-bit AdamW step as a single Pallas (Triton) kernel, for GPUs.

XLA runs the 8-bit update (`update.make_update`) in two passes per block of a leaf, because the
new moments' block absmax is a reduction: one pass computes the moments to reduce them, the next
recomputes them to requantise them and write the params. Large leaves go in blocks along axis 0,
each written into place after it. This kernel does the whole step in one pass over rows of 256
elements (one quantisation block per row): it reads the param, the gradient and both moments'
codes and scales once, reduces each row's absmax in registers, and writes the new param, codes
and scales in place. No temporaries, no blocks, no second pass.

The maths is `update.make_update`'s, through the same functions: the moments are
dequantised by looking the codes up in `quantization.dynamic_map` (passed in as two 256-entry
tables), updated with `optimizer.new_moments`, `direction` and `apply_direction`, requantised
with `quantization.nearest_code_index` (its per-segment constants loaded from a third small
table, which takes fewer operations than XLA's selects: the search was half the kernel's time
before), and bf16 params are rounded with `rounding.stochastic_round_to_bf16` under the bits
of `rounding.random_bits16` of each element's row-major index, so the random bits are those of
the XLA path. Results equal the XLA path's up
to float rounding (a requantised code can flip at a midpoint; tests/test_adam_kernel.py): the
kernel normalises a block by multiplying with its absmax's reciprocal where XLA divides.

The codes travel as int32 words, four codes each: Pallas' Triton lowering computes the offsets
of an array of under 2^32 bytes in 32-bit signed arithmetic, which overflows for an int8 array of
2^31 elements or more (Gemma 2 9B's stacked gate and up kernels have 2.16e9). As words the same
bytes are a quarter as many elements; params and gradients (2 bytes each) take 64-bit offsets
there. So params are viewed as [R, 64, 4] and codes as [R, 64] words.

On a mesh, `update_shards` runs the kernel on each device's shard (`jax.shard_map`): a shard's
rows are given the element indices they have in the whole array (`_row_starts` plus the shard's
offset), so the rounding bits, and the result, do not depend on the mesh.

Axes: R rows of 256 elements (one quantisation block each), T rows per program, 64 words of 4.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_sft_jax.training import optimizer
from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import rounding

BLOCK = quant.BLOCK_SIZE
WORDS = BLOCK // 4  # a block's 8-bit codes as int32 words
TILE_ROWS = 4  # rows (quantisation blocks) per program
NUM_WARPS = 4


def applicable(shape: tuple[int, ...], mu: Any, nu: Any, *, block_size: int) -> bool:
  """Whether `update_leaf` can take a leaf whose kernel sees `shape` (the leaf, or one device's
  shard of it): both moments 8-bit in blocks of 256, and a last axis of whole blocks (so each row
  of the [R, 256] view is one block)."""
  return (isinstance(mu, quant.QuantizedArray) and isinstance(nu, quant.QuantizedArray)
          and block_size == BLOCK and len(shape) >= 1 and shape[-1] % BLOCK == 0
          and math.prod(shape) > 0)


def _row_starts(rows: jax.Array, local: tuple[int, ...], full: tuple[int, ...]) -> jax.Array:
  """The element index in the whole array (`full`, row-major, modulo 2^32) of the first element
  of each row of 256 of a shard shaped `local`, less the shard's own offset: each row's position
  in the shard, split into the shard's axes, weighted by the whole array's strides. For a whole
  array this is rows * 256."""
  per_last = local[-1] // BLOCK  # rows per line of the last axis
  index = (rows % per_last) * jnp.uint32(BLOCK)
  lead = rows // per_last
  for n, stride in reversed(list(zip(local[:-1], rounding.strides(full)[:-1]))):
    index = index + (lead % n) * jnp.uint32(stride)
    lead = lead // n
  return index


def _tile(rows: int, most: int) -> int:
  return next(t for t in (64, 32, 16, 8, 4, 2, 1) if t <= most and rows % t == 0)


def _unpack(words: jax.Array, shift: jax.Array, signed: bool) -> jax.Array:
  """int32 words [T, W] -> their four bytes [T, W, 4] as int32 (sign-extended for int8 codes),
  byte k of a word being element 4w + k (little-endian)."""
  w = words[:, :, None]
  if signed:
    return jax.lax.shift_right_arithmetic(jax.lax.shift_left(w, 24 - shift), jnp.int32(24))
  return jax.lax.shift_right_logical(w, shift) & 0xFF


def _pack(codes: jax.Array, shift: jax.Array) -> jax.Array:
  """The inverse of `_unpack`: bytes [T, W, 4] (int32 holding int8 or uint8 values) -> words."""
  return jnp.sum(jax.lax.shift_left(codes & 0xFF, shift), axis=2)


SEGMENT_TABLE = 128  # both maps' segment tables, flat, padded to a power of two (Triton blocks)


def _segment_tables() -> jax.Array:
  """Both maps' `quantization.code_segments` tables, flat: [signed, unsigned] x [3, 16]."""
  flat = np.concatenate([quant.code_segments(signed=s).tables.reshape(-1) for s in (True, False)])
  return jnp.pad(jnp.asarray(flat), (0, SEGMENT_TABLE - flat.size))


def _nearest_code(normed, segments_ref, signed):
  rows, row = quant.code_segments(signed=signed).tables.shape  # _segment_tables' layout
  base = 0 if signed else rows * row
  return quant.nearest_code_index(
      normed, signed=signed, lookup=lambda k, s: segments_ref[s + (base + row * k)])


def _kernel(floats_ref, seed_ref, signed_map_ref, unsigned_map_ref, segments_ref, p_ref, g_ref,
            mc_ref, ms_ref, vc_ref, vs_ref, p_out, mc_out, ms_out, vc_out, vs_out, *, b1, b2, eps,
            weight_decay, stochastic_rounding, tile, local, full):
  shape = (tile, WORDS, 4)
  shift = jax.lax.broadcasted_iota(jnp.int32, shape, 2) * 8
  grad_scale, lr, inv_bc1, inv_bc2 = (floats_ref[i] for i in range(4))
  g = g_ref[...].astype(jnp.float32) * grad_scale
  mu = (signed_map_ref[_unpack(mc_ref[...], shift, True) + quant.code_offset(True)]
        * ms_ref[...][:, None, None])
  nu = unsigned_map_ref[_unpack(vc_ref[...], shift, False)] * vs_ref[...][:, None, None]
  # optimizer.adam_leaf's arithmetic, through the same functions.
  m, v = optimizer.new_moments(g, mu, nu, b1=b1, b2=b2)
  u = optimizer.direction(m, v, eps=eps, inv_bc=(inv_bc1, inv_bc2))
  new = optimizer.apply_direction(p_ref[...].astype(jnp.float32), u, lr=lr,
                                  weight_decay=weight_decay)
  if stochastic_rounding and p_out.dtype == jnp.bfloat16:
    rows = (jax.lax.broadcasted_iota(jnp.uint32, (tile,), 0)
            + (pl.program_id(0) * tile).astype(jnp.uint32))
    starts = _row_starts(rows, local, full) + seed_ref[1]  # + the shard's offset
    col = (jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * jnp.uint32(4)
           + jax.lax.broadcasted_iota(jnp.uint32, shape, 2))
    bits = rounding.random_bits16(starts[:, None, None] + col, seed_ref[0])
    new = rounding.stochastic_round_to_bf16(new, bits)
  p_out[...] = new.astype(p_out.dtype)
  for x, codes_out, scales_out, signed in ((m, mc_out, ms_out, True), (v, vc_out, vs_out, False)):
    absmax = jnp.max(jnp.max(jnp.abs(x), axis=2), axis=1)
    # One reciprocal per block rather than a division per element: normed may differ from
    # x / absmax by an ulp, which moves a code only where a value sits on a midpoint.
    normed = x * (1.0 / jnp.where(absmax > 0, absmax, 1.0))[:, None, None]
    index = _nearest_code(normed, segments_ref, signed)
    codes_out[...] = _pack(index - quant.code_offset(signed), shift)
    scales_out[...] = absmax


def update_leaf(p: jax.Array, g: jax.Array, mu: quant.QuantizedArray, nu: quant.QuantizedArray,
                *, grad_scale: jax.Array, lr: jax.Array, bc: tuple[jax.Array, jax.Array],
                seed: jax.Array, b1: float, b2: float, eps: float, weight_decay: float,
                stochastic_rounding: bool, full_shape: tuple[int, ...] | None = None,
                offset: jax.Array | int = 0, tile_rows: int = TILE_ROWS,
                num_warps: int = NUM_WARPS, interpret: bool = False
                ) -> tuple[jax.Array, quant.QuantizedArray, quant.QuantizedArray]:
  """One leaf's AdamW step (`applicable` leaves): params and moments rewritten in place.

  Args:
    p: the param, any shape whose last axis is a multiple of 256.
    g: its gradient sum, any float dtype.
    mu: the first moment (int8 codes, fp32 scales).
    nu: the second moment (uint8 codes, fp32 scales).
    grad_scale: fp32 scalar turning the gradient sum into the clipped mean gradient.
    lr: fp32 scalar, this update's learning rate.
    bc: Adam's bias corrections (1 - b1^t, 1 - b2^t).
    seed: uint32 scalar, the leaf's rounding seed (`rounding.fold_seed`).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: decoupled decay coefficient for this leaf (0 for none).
    stochastic_rounding: round bf16 params stochastically (else to nearest).
    full_shape: when p is one device's shard, the whole array's shape (default p's), and
    offset: the whole array's row-major index of the shard's first element (modulo 2^32), so
      that each element's rounding bits are those of its index in the whole array.
    tile_rows: most rows of 256 per program.
    num_warps: warps per program.
    interpret: run in the Pallas interpreter (any backend; for tests).

  Returns:
    (new param, new mu, new nu), shaped and typed like the inputs.
  """
  rows = p.size // BLOCK
  tile = _tile(rows, tile_rows)
  as_rows = lambda x: x.reshape(rows, WORDS, 4)  # noqa: E731
  as_words = lambda c: jax.lax.bitcast_convert_type(as_rows(c), jnp.int32)  # noqa: E731
  flat = lambda x: x.reshape(rows)  # noqa: E731
  tiles = pl.BlockSpec((tile, WORDS, 4), lambda i: (i, 0, 0))
  words = pl.BlockSpec((tile, WORDS), lambda i: (i, 0))
  per_row = pl.BlockSpec((tile,), lambda i: (i,))
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  floats = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                      (grad_scale, lr, 1.0 / bc[0], 1.0 / bc[1])])
  seeds = jnp.stack([jnp.asarray(seed, jnp.uint32), jnp.asarray(offset, jnp.uint32)])
  kernel = functools.partial(_kernel, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             stochastic_rounding=stochastic_rounding, tile=tile,
                             local=tuple(p.shape),
                             full=tuple(p.shape if full_shape is None else full_shape))
  new_p, mc, ms, vc, vs = pl.pallas_call(
      kernel, grid=(rows // tile,),
      in_specs=[whole(4), whole(2), whole(256), whole(256), whole(SEGMENT_TABLE), tiles, tiles,
                words, per_row, words, per_row],
      out_specs=[tiles, words, per_row, words, per_row],
      out_shape=[jax.ShapeDtypeStruct((rows, WORDS, 4), p.dtype),
                 jax.ShapeDtypeStruct((rows, WORDS), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.float32),
                 jax.ShapeDtypeStruct((rows, WORDS), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      input_output_aliases={5: 0, 7: 1, 8: 2, 9: 3, 10: 4},
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      name='adam8bit_update',
  )(floats, seeds, jnp.asarray(quant.dynamic_map(signed=True)),
    jnp.asarray(quant.dynamic_map(signed=False)), _segment_tables(), as_rows(p), as_rows(g),
    as_words(mu.codes), flat(mu.scales), as_words(nu.codes), flat(nu.scales))
  codes = lambda w, like: jax.lax.bitcast_convert_type(w, like.dtype).reshape(like.shape)  # noqa: E731
  return (new_p.reshape(p.shape),
          quant.QuantizedArray(codes(mc, mu.codes), ms.reshape(mu.scales.shape)),
          quant.QuantizedArray(codes(vc, nu.codes), vs.reshape(nu.scales.shape)))


def update_shards(p: jax.Array, g: jax.Array, mu: quant.QuantizedArray, nu: quant.QuantizedArray,
                  *, sharding: NamedSharding, grad_scale: jax.Array, lr: jax.Array,
                  bc: tuple[jax.Array, jax.Array], seed: jax.Array, **kwargs
                  ) -> tuple[jax.Array, quant.QuantizedArray, quant.QuantizedArray]:
  """`update_leaf` on each device's shard of a leaf laid out by `sharding` (`jax.shard_map`).

  The moments' codes and block scales must lie like the param (`optimizer.state_shardings` does
  so when each shard's last axis is whole blocks, which `applicable` on the shard's shape checks).
  Each shard draws the rounding bits of its elements' indices in the whole array, so the result
  does not depend on the mesh.
  """
  mesh, spec = sharding.mesh, P(*sharding.spec, *([None] * (p.ndim - len(sharding.spec))))
  full = tuple(p.shape)
  local = sharding.shard_shape(full)
  strides = rounding.strides(full)

  def shard(p, g, mu, nu, grad_scale, lr, bc0, bc1, seed):
    offset = jnp.uint32(0)
    for axis, names in enumerate(spec):
      if names is not None:
        start = jax.lax.axis_index(names).astype(jnp.uint32) * jnp.uint32(local[axis])
        offset = offset + start * jnp.uint32(strides[axis])
    return update_leaf(p, g, mu, nu, grad_scale=grad_scale, lr=lr, bc=(bc0, bc1), seed=seed,
                       full_shape=full, offset=offset, **kwargs)

  moment = quant.QuantizedArray(spec, spec)
  scalar = P()
  return jax.shard_map(
      shard, mesh=mesh, in_specs=(spec, spec, moment, moment) + (scalar,) * 5,
      out_specs=(spec, moment, moment), check_vma=False,
  )(p, g, mu, nu, *(jnp.asarray(x, jnp.float32) for x in (grad_scale, lr, bc[0], bc[1])),
    jnp.asarray(seed, jnp.uint32))
