"""One leaf's 8-bit AdamW step as a single Pallas (Triton) kernel, for GPUs.

XLA runs the 8-bit update (`update.make_update`) in two passes per block of a leaf, because the
new moments' block absmax is a reduction: one pass computes the moments to reduce them, the next
recomputes them to requantise them and write the params. Large leaves go in blocks along axis 0,
each written into place after it. This kernel does the whole step in one pass over rows of 256
elements (one quantisation block per row): it reads the param, the gradient and both moments'
codes and scales once, reduces each row's absmax in registers, and writes the new param, codes
and scales in place. No temporaries, no blocks, no second pass.

The maths is `update.make_update`'s, written with the same functions: the moments are
dequantised by looking the codes up in `quantization.dynamic_map` (passed in as two 256-entry
tables), requantised with `quantization.nearest_code_index`, and bf16 params are rounded with
`rounding.stochastic_round_to_bf16` under the bits of `rounding.random_bits16` of each element's
row-major index, so the random bits are those of the XLA path. Results equal the XLA path's up
to float rounding (a requantised code can flip at a midpoint; tests/test_adam_kernel.py).

Axes: R rows of 256 elements (the leaf reshaped to [R, 256]), T rows per program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import rounding

BLOCK = quant.BLOCK_SIZE
TILE_ROWS = 8  # rows (quantisation blocks) per program
NUM_WARPS = 8


def applicable(p: Any, mu: Any, nu: Any, *, block_size: int) -> bool:
  """Whether `update_leaf` can take this leaf: both moments 8-bit in blocks of 256, and a last
  axis of whole blocks (so each row of the [R, 256] view is one block)."""
  return (isinstance(mu, quant.QuantizedArray) and isinstance(nu, quant.QuantizedArray)
          and block_size == BLOCK and p.ndim >= 1 and p.shape[-1] % BLOCK == 0 and p.size > 0)


def _tile(rows: int, most: int) -> int:
  return next(t for t in (64, 32, 16, 8, 4, 2, 1) if t <= most and rows % t == 0)


def _kernel(floats_ref, seed_ref, signed_map_ref, unsigned_map_ref, p_ref, g_ref, mc_ref, ms_ref,
            vc_ref, vs_ref, p_out, mc_out, ms_out, vc_out, vs_out, *, b1, b2, eps, weight_decay,
            stochastic_rounding, tile):
  grad_scale, lr, inv_bc1, inv_bc2 = (floats_ref[i] for i in range(4))
  g = g_ref[...].astype(jnp.float32) * grad_scale
  mu = signed_map_ref[mc_ref[...].astype(jnp.int32) + 128] * ms_ref[...][:, None]
  nu = unsigned_map_ref[vc_ref[...].astype(jnp.int32)] * vs_ref[...][:, None]
  # optimizer.adam_leaf, term for term.
  m = b1 * mu + (1.0 - b1) * g
  v = b2 * nu + (1.0 - b2) * jnp.square(g)
  u = (m * inv_bc1) / (jnp.sqrt(v * inv_bc2) + eps)
  p = p_ref[...].astype(jnp.float32)
  if weight_decay:
    u = u + weight_decay * p
  new = p + -(lr * u)
  if stochastic_rounding and p_out.dtype == jnp.bfloat16:
    row = (jax.lax.broadcasted_iota(jnp.uint32, (tile, BLOCK), 0)
           + (pl.program_id(0) * tile).astype(jnp.uint32))
    col = jax.lax.broadcasted_iota(jnp.uint32, (tile, BLOCK), 1)
    bits = rounding.random_bits16(row * jnp.uint32(BLOCK) + col, seed_ref[0])
    new = rounding.stochastic_round_to_bf16(new, bits)
  p_out[...] = new.astype(p_out.dtype)
  for x, codes_out, scales_out, signed in ((m, mc_out, ms_out, True), (v, vc_out, vs_out, False)):
    absmax = jnp.max(jnp.abs(x), axis=1)
    normed = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    index = quant.nearest_code_index(normed, signed=signed)
    codes_out[...] = (index - 128 if signed else index).astype(codes_out.dtype)
    scales_out[...] = absmax


def update_leaf(p: jax.Array, g: jax.Array, mu: quant.QuantizedArray, nu: quant.QuantizedArray,
                *, grad_scale: jax.Array, lr: jax.Array, bc: tuple[jax.Array, jax.Array],
                seed: jax.Array, b1: float, b2: float, eps: float, weight_decay: float,
                stochastic_rounding: bool, tile_rows: int = TILE_ROWS,
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
    tile_rows: most rows of 256 per program.
    num_warps: warps per program.
    interpret: run in the Pallas interpreter (any backend; for tests).

  Returns:
    (new param, new mu, new nu), shaped and typed like the inputs.
  """
  rows = p.size // BLOCK
  tile = _tile(rows, tile_rows)
  as_rows = lambda x: x.reshape(rows, BLOCK)  # noqa: E731
  flat = lambda x: x.reshape(rows)  # noqa: E731
  tiles = pl.BlockSpec((tile, BLOCK), lambda i: (i, 0))
  per_row = pl.BlockSpec((tile,), lambda i: (i,))
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  floats = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                      (grad_scale, lr, 1.0 / bc[0], 1.0 / bc[1])])
  seeds = jnp.stack([jnp.asarray(seed, jnp.uint32), jnp.uint32(0)])
  kernel = functools.partial(_kernel, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             stochastic_rounding=stochastic_rounding, tile=tile)
  new_p, mc, ms, vc, vs = pl.pallas_call(
      kernel, grid=(rows // tile,),
      in_specs=[whole(4), whole(2), whole(256), whole(256), tiles, tiles, tiles, per_row, tiles,
                per_row],
      out_specs=[tiles, tiles, per_row, tiles, per_row],
      out_shape=[jax.ShapeDtypeStruct((rows, BLOCK), p.dtype),
                 jax.ShapeDtypeStruct((rows, BLOCK), mu.codes.dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.float32),
                 jax.ShapeDtypeStruct((rows, BLOCK), nu.codes.dtype),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      input_output_aliases={4: 0, 6: 1, 7: 2, 8: 3, 9: 4},
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      name='adam8bit_update',
  )(floats, seeds, jnp.asarray(quant.dynamic_map(signed=True)),
    jnp.asarray(quant.dynamic_map(signed=False)), as_rows(p), as_rows(g), as_rows(mu.codes),
    flat(mu.scales), as_rows(nu.codes), flat(nu.scales))
  return (new_p.reshape(p.shape),
          quant.QuantizedArray(mc.reshape(mu.codes.shape), ms.reshape(mu.scales.shape)),
          quant.QuantizedArray(vc.reshape(nu.codes.shape), vs.reshape(nu.scales.shape)))
