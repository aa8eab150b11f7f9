"""The 8-bit AdamW update of one parameter as a single Pallas kernel (GPU, Triton backend).

`optimizer.make_update` in XLA needs several passes per block of a parameter: the absmax of the
new moments is a reduction, so XLA splits dequantise -> moments -> absmax -> requantise -> apply
into separate fusions with fp32 intermediates in memory, and the map lookups are gathers. This
kernel does all of it in one pass over [tile, 256] tiles (one quantisation block per row): it
reads the gradient, the param and the two moments' codes and scales once, and writes the new
param, codes and scales in place (about 10 bytes per element for bf16 params).

The maths is `optimizer.adam_leaf` and the chain's clip/decay/LR, except that the two dynamic
maps are evaluated arithmetically instead of looked up (Triton has no gather): `code_value`
reproduces `quantization.dynamic_map` to within one float32 ulp, and `nearest_code` is
`quantization.nearest_code_index` with those values. Random bits for stochastic rounding are
`rounding.random_bits16` of the element index.

Axes: NB quantisation blocks (rows of 256), T rows per program (`tile`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gemma_sft_jax import quantization as quant
from gemma_sft_jax import rounding

BLOCK = quant.BLOCK_SIZE
MAX_TILE = 32  # rows (quantisation blocks) per program: 8192 elements


# ---- The dynamic maps, arithmetically. ----------------------------------------------------------

def _pow10(i: jax.Array) -> jax.Array:
  """10^(i - 6) for int32 i in 0..6."""
  out = jnp.full(i.shape, 1e-6, jnp.float32)
  for k in range(1, 7):
    out = jnp.where(i == k, jnp.float32(10.0 ** (k - 6)), out)
  return out


def _log2_floor(x: jax.Array) -> jax.Array:
  """floor(log2 x) for int32 x in 1..255."""
  return sum((x >= (1 << k)).astype(jnp.int32) for k in range(1, 8))


def _positive_value(k: jax.Array, signed: bool) -> jax.Array:
  """The k-th (0-based) code value in (0, 1): decade i holds 2^i (signed) or 2^(i+1) codes,
  the midpoints of an even split of [0.1, 1] scaled by 10^(i-6) (see dynamic_map)."""
  lead = 1 if signed else 2
  i = _log2_floor(k + lead) - (0 if signed else 1)
  parts = jnp.left_shift(1, i + (0 if signed else 1))
  f = k + lead - parts
  return _pow10(i) * (0.1 + 0.9 * (f.astype(jnp.float32) + 0.5) / parts.astype(jnp.float32))


def code_value(index: jax.Array, *, signed: bool) -> jax.Array:
  """dynamic_map(signed)[index] for int32 index in 0..255, without a table."""
  if signed:
    # 0..126 negative (mirrors of 254..128), 127 zero, 128..254 positive, 255 one.
    k = jnp.where(index >= 128, index - 128, 126 - index)
    v = _positive_value(jnp.clip(k, 0, 126), True)
    v = jnp.where(index >= 128, v, -v)
    v = jnp.where(index == 127, 0.0, v)
  else:
    v = jnp.where(index == 0, 0.0, _positive_value(jnp.clip(index - 1, 0, 253), False))
  return jnp.where(index == 255, 1.0, v)


def nearest_code(normed: jax.Array, *, signed: bool) -> jax.Array:
  """`quantization.nearest_code_index` with the map's midpoints computed, not looked up."""
  a = jnp.abs(normed) if signed else normed
  decade = sum((a >= 10.0 ** (k - 7)).astype(jnp.int32) for k in range(1, 7))
  parts = jnp.left_shift(1, decade + (0 if signed else 1))
  before = parts - (1 if signed else 2)
  frac = jnp.floor((a / _pow10(decade) - 0.1) * parts.astype(jnp.float32) / 0.9).astype(jnp.int32)
  cand = (128 if signed else 1) + before + jnp.clip(frac, 0, parts - 1)
  value = functools.partial(code_value, signed=signed)
  here = value(cand)
  lower = (value(cand - 1) + here) / 2
  upper = (here + value(jnp.minimum(cand + 1, 255))) / 2
  if not signed:
    return cand - 1 + (a > lower).astype(jnp.int32) + (a > upper).astype(jnp.int32)
  neg = normed < 0
  above = lambda m: jnp.where(neg, a >= m, a > m).astype(jnp.int32)  # noqa: E731
  index = cand - 1 + above(lower) + above(upper)
  return jnp.where(neg, 254 - jnp.minimum(index, 254), index)


# ---- The kernel. --------------------------------------------------------------------------------

def _kernel(floats_ref, ints_ref, p_ref, g_ref, mc_ref, ms_ref, vc_ref, vs_ref,
            p_out, mc_out, ms_out, vc_out, vs_out, *, b1, b2, eps, weight_decay, clip_norm,
            decay, stochastic_rounding, tile):
  divisor, norm, lr = floats_ref[0], floats_ref[1], floats_ref[2]
  bc1, bc2 = floats_ref[3], floats_ref[4]
  seed, offset = ints_ref[0], ints_ref[1]

  g = g_ref[...].astype(jnp.float32) / divisor
  if clip_norm:
    g = jnp.where(norm < clip_norm, g, (g / norm) * clip_norm)
  mu = code_value(mc_ref[...].astype(jnp.int32) + 128, signed=True) * ms_ref[...][:, None]
  nu = code_value(vc_ref[...].astype(jnp.int32), signed=False) * vs_ref[...][:, None]
  m = b1 * mu + (1.0 - b1) * g
  v = b2 * nu + (1.0 - b2) * jnp.square(g)
  u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
  p = p_ref[...].astype(jnp.float32)
  if decay and weight_decay:
    u = u + weight_decay * p
  new = p + -(lr * u)
  if stochastic_rounding and p_out.dtype == jnp.bfloat16:
    row = jax.lax.broadcasted_iota(jnp.int32, (tile, BLOCK), 0) + pl.program_id(0) * tile
    col = jax.lax.broadcasted_iota(jnp.int32, (tile, BLOCK), 1)
    index = (row * BLOCK + col).astype(jnp.uint32) + offset.astype(jnp.uint32)
    new = rounding.stochastic_round_to_bf16(
        new, rounding.random_bits16(index, seed.astype(jnp.uint32)))
  p_out[...] = new.astype(p_out.dtype)
  for x, codes_out, scales_out, signed in ((m, mc_out, ms_out, True), (v, vc_out, vs_out, False)):
    absmax = jnp.max(jnp.abs(x), axis=1)
    normed = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    index = nearest_code(normed, signed=signed)
    codes_out[...] = (index - 128 if signed else index).astype(codes_out.dtype)
    scales_out[...] = absmax


def applicable(p: Any, mu: Any) -> bool:
  """Whether `update_leaf` can take this leaf: 8-bit moments and a last axis of whole blocks."""
  return (isinstance(mu, quant.QuantizedArray) and p.ndim >= 1 and p.shape[-1] % BLOCK == 0
          and p.size // BLOCK > 0)


def update_leaf(p: jax.Array, g: jax.Array, mu: quant.QuantizedArray, nu: quant.QuantizedArray,
                *, floats: jax.Array, ints: jax.Array, b1: float, b2: float, eps: float,
                weight_decay: float, clip_norm: float | None, decay: bool,
                stochastic_rounding: bool, interpret: bool = False
                ) -> tuple[jax.Array, quant.QuantizedArray, quant.QuantizedArray]:
  """One leaf's AdamW step in one kernel; params and moments are rewritten in place.

  Args:
    p: the param (any shape whose last axis is a multiple of 256; `applicable`).
    g: its gradient sum (any float dtype).
    mu: first moment (int8 codes, fp32 scales), as `optimizer.scale_by_adam_8bit` stores it.
    nu: second moment (uint8 codes).
    floats: float32 [8]: divisor, global norm, LR, bias corrections 1 - b1^t and 1 - b2^t.
    ints: uint32 [2]: the rounding seed and the index of this array's first element.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: decoupled decay coefficient.
    clip_norm: max global norm (None or 0: no clipping).
    decay: whether this leaf decays.
    stochastic_rounding: round bf16 params stochastically.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (new param, new mu, new nu), shaped and typed like the inputs.
  """
  nb = p.size // BLOCK
  tile = next(t for t in (32, 16, 8, 4, 2, 1) if nb % t == 0 and t <= MAX_TILE)
  rows = lambda x: x.reshape(nb, BLOCK)  # noqa: E731
  flat = lambda x: x.reshape(nb)  # noqa: E731
  tiles = pl.BlockSpec((tile, BLOCK), lambda i: (i, 0))
  per_row = pl.BlockSpec((tile,), lambda i: (i,))
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  kernel = functools.partial(
      _kernel, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm,
      decay=decay, stochastic_rounding=stochastic_rounding, tile=tile)
  out = pl.pallas_call(
      kernel, grid=(nb // tile,),
      in_specs=[whole(8), whole(2), tiles, tiles, tiles, per_row, tiles, per_row],
      out_specs=[tiles, tiles, per_row, tiles, per_row],
      out_shape=[jax.ShapeDtypeStruct((nb, BLOCK), p.dtype),
                 jax.ShapeDtypeStruct((nb, BLOCK), mu.codes.dtype),
                 jax.ShapeDtypeStruct((nb,), jnp.float32),
                 jax.ShapeDtypeStruct((nb, BLOCK), nu.codes.dtype),
                 jax.ShapeDtypeStruct((nb,), jnp.float32)],
      input_output_aliases={2: 0, 4: 1, 5: 2, 6: 3, 7: 4},
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
  )(floats, ints, rows(p), rows(g), rows(mu.codes), flat(mu.scales), rows(nu.codes),
    flat(nu.scales))
  new_p, mc, ms, vc, vs = out
  return (new_p.reshape(p.shape),
          quant.QuantizedArray(mc.reshape(mu.codes.shape), ms.reshape(mu.scales.shape)),
          quant.QuantizedArray(vc.reshape(nu.codes.shape), vs.reshape(nu.scales.shape)))
