"""Flash attention for training on GPUs: `attention.attend` without a KV cache, as Pallas (Triton)
kernels that never write the [T, S] scores to memory.

The einsum path computes every query's fp32 scores against every key, then softcaps, masks and
softmaxes them in memory: for Gemma 2 9B at 8 × 512 tokens, 134 MB of fp32 scores per layer,
written and read several times forward and backward. Here each program keeps one block of
queries' scores in registers and walks the keys block by block with an online softmax
(FlashAttention-2), writing only the output and each query's log-sum-exp. The backward pass
recomputes the scores block by block from them: one kernel for the keys' and values' gradients
(a program per block of keys, summing over the query heads that share them) and one for the
queries'.

The arithmetic is the einsum path's, in its dtypes: bf16 queries (already scaled), keys and
values; fp32 scores; the softcap `tanh(s / cap) * cap` in fp32; the mask from positions,
segment ids and the window; probabilities rounded to the values' dtype for the weighted sum
(here before normalising, there after); fp32 accumulation. Keys after a query's index are
skipped whole, so the mask is causal by index as well as by position: rows whose positions count
up within each segment, as `training/data.py` packs them, lose nothing by it; padding (segment 0,
every position 0), whose outputs no loss reads, attends only to the padding before it instead of
all of it. Keys a sliding window leaves out are skipped whole too.

Axes: B batch, T queries = S keys (one sequence attending to itself), N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from gemma_sft_jax.model.attention import NEG_INF, NO_WINDOW

Array = jax.Array

IMPLS = ('einsum', 'flash', 'auto')  # config model.attention
FORWARD_KERNEL = 'flash_attention_fwd'  # the forward pallas_call's name (see keeps_forward)


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's tile: queries × keys per loop step, warps per program, the loop's pipeline
  stages."""
  q: int
  k: int
  warps: int
  stages: int

  def params(self) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=self.warps, num_stages=self.stages)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiles of the forward, key-gradient and query-gradient kernels. The defaults are the fastest
  of a sweep at Gemma 2 9B's shapes on an H200 (`benchmarks/attention_kernels.py --sweep`,
  BENCHMARKS.md)."""
  fwd: Tile = Tile(64, 64, 4, 3)
  dkv: Tile = Tile(64, 32, 4, 2)
  dq: Tile = Tile(64, 64, 4, 2)

  def longest(self) -> int:
    return max(max(t.q, t.k) for t in (self.fwd, self.dkv, self.dq))


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def takes_length(t: int, blocks: Blocks = Blocks()) -> bool:
  """Whether the kernels take sequences of t tokens: Triton's power-of-two tiles dividing them."""
  return _pow2(t) and t >= blocks.longest()


def applicable(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
               blocks: Blocks = Blocks()) -> bool:
  """Whether the kernels take queries [B, T, N, H] against keys [B, K, S, H] (per device): one
  sequence attending to itself (T == S) of a length they take, whole groups of query heads
  (G a power of two)."""
  _, t, n, h = q_shape
  _, k, s, hk = k_shape
  return (t == s and h == hk and n % k == 0 and _pow2(n // k) and _pow2(h) and h >= 16
          and takes_length(t, blocks))


def _mesh_axes(sharding: Any) -> tuple[Any, str | None]:
  """(the rows' mesh axes, the heads' mesh axis or None) of the kernels' `shard_map`."""
  heads = 'tensor' if 'tensor' in sharding.mesh.axis_names else None
  return sharding.spec[0], heads


def use(impl: str, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
        sharding: Any = None) -> bool:
  """Whether attention of queries [B, T, N, H] to keys [B, K, S, H] without a cache runs as
  these kernels under `model.attention` = impl ('einsum' | 'flash' | 'auto').

  Both 'flash' and 'auto' take them where they apply (`applicable` to each device's share under
  `sharding`, the activations' NamedSharding; shorter calls such as `init`'s take the einsum
  path): 'auto' on GPU only, 'flash' on any backend (the Pallas interpreter off GPU).
  `validation` checks that a 'flash' run's train.seq_len suits them (`takes_length`).
  """
  if impl not in IMPLS:
    raise ValueError(f'model.attention: {impl!r} is not one of {", ".join(IMPLS)}')
  if impl == 'einsum' or (impl == 'auto' and jax.default_backend() != 'gpu'):
    return False
  q_local, k_local = list(q_shape), list(k_shape)
  if sharding is not None:
    rows_axes, heads_axis = _mesh_axes(sharding)
    sizes = dict(sharding.mesh.shape)
    rows = math.prod(sizes[a] for a in (
        rows_axes if isinstance(rows_axes, tuple) else (rows_axes,)) if a)
    heads = sizes[heads_axis] if heads_axis else 1
    if q_local[0] % rows or q_local[2] % heads or k_local[1] % heads:
      return False  # Rows or heads that do not split evenly: the einsum path (GSPMD) takes them.
    q_local[0] //= rows
    k_local[0] //= rows
    q_local[2] //= heads
    k_local[1] //= heads
  return applicable(tuple(q_local), tuple(k_local))


def keeps_forward(prim, *_, **params) -> bool:
  """A remat policy: keep the forward kernel's outputs (attention's output and log-sum-exp), so
  the backward pass does not run it again."""
  return prim.name == 'pallas_call' and any(
      FORWARD_KERNEL in str(v) for k, v in params.items() if 'name' in k)


def _dot(a: Array, b: Array) -> Array:
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _scores(q: Array, k: Array, softcap: float | None) -> Array:
  """fp32 scores [bq, bk] of a block of queries [bq, H] against a block of keys [bk, H]."""
  s = _dot(q, k.T)
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  return s


def _mask(q_start, k_start, bq: int, bk: int, q_pos, q_seg, k_pos, k_seg, window) -> Array:
  """[bq, bk] True where a query may attend a key: `attention.attention_mask`, and causal by
  index."""
  q_idx = q_start + jnp.arange(bq, dtype=jnp.int32)
  k_idx = k_start + jnp.arange(bk, dtype=jnp.int32)
  q_pos, k_pos = q_pos[:, None], k_pos[None, :]
  return ((q_seg[:, None] == k_seg[None, :]) & (k_pos <= q_pos) & (q_pos - k_pos < window)
          & (k_idx[None, :] <= q_idx[:, None]))


def _key_blocks(q_start, bq: int, bk: int, window):
  """[lo, hi) of the key blocks a block of queries starting at q_start can see."""
  lo = jnp.maximum(q_start - window + 1, 0) // bk
  hi = (q_start + bq + bk - 1) // bk
  return lo, hi


def _query_blocks(k_start, bq: int, bk: int, window, num_q_blocks: int):
  """[lo, hi) of the query blocks that can see a block of keys starting at k_start."""
  lo = k_start // bq
  hi = jnp.minimum((k_start + bk - 1 + window - 1) // bq + 1, num_q_blocks)
  return lo, hi


def _forward_kernel(window_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                    o_ref, lse_ref, *, softcap, bq: int, bk: int):
  """One block of queries [bq, H] of one head against its kv head's keys [S, H]."""
  window = window_ref[0]
  q_start = pl.program_id(0) * bq
  q, q_pos, q_seg = q_ref[...], qpos_ref[...], qseg_ref[...]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * bk, bk)
    s = _scores(q, k_ref[keys, :], softcap)
    mask = _mask(q_start, j * bk, bq, bk, q_pos, q_seg, kpos_ref[keys], kseg_ref[keys], window)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  h = q_ref.shape[-1]
  init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  lo, hi = _key_blocks(q_start, bq, bk, window)
  acc, m, l = jax.lax.fori_loop(lo, hi, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _probs_and_score_grads(q, k, v, do, lse, delta, mask, softcap):
  """(probabilities [bq, bk], the scores' gradients before the softcap) of one tile."""
  s = _scores(q, k, softcap)
  p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
  ds = p * (_dot(do, v.T) - delta[:, None])
  if softcap is not None:
    ds = ds * (1.0 - (s / softcap) ** 2)
  return p, ds


def _key_grads_kernel(window_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                      qseg_ref, kpos_ref, kseg_ref, dk_ref, dv_ref, *, softcap, bq: int, bk: int,
                      groups: int, num_q_blocks: int):
  """One block of keys and values [bk, H] of one kv head, against its G query heads' queries."""
  window = window_ref[0]
  k_start = pl.program_id(0) * bk
  k, v, k_pos, k_seg = k_ref[...], v_ref[...], kpos_ref[...], kseg_ref[...]
  lo, hi = _query_blocks(k_start, bq, bk, window, num_q_blocks)
  h = k_ref.shape[-1]
  dk = jnp.zeros((bk, h), jnp.float32)
  dv = jnp.zeros((bk, h), jnp.float32)
  for g in range(groups):
    def body(i, carry, g=g):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      mask = _mask(i * bq, k_start, bq, bk, qpos_ref[rows], qseg_ref[rows], k_pos, k_seg, window)
      p, ds = _probs_and_score_grads(q, k, v, do, lse_ref[g, rows], delta_ref[g, rows], mask,
                                     softcap)
      dv = dv + _dot(p.astype(do.dtype).T, do)
      dk = dk + _dot(ds.astype(q.dtype).T, q)
      return dk, dv
    dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_grads_kernel(window_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                        qseg_ref, kpos_ref, kseg_ref, dq_ref, *, softcap, bq: int, bk: int):
  """One block of queries [bq, H] of one head against its kv head's keys and values."""
  window = window_ref[0]
  q_start = pl.program_id(0) * bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos, q_seg = qpos_ref[...], qseg_ref[...]

  def body(j, dq):
    keys = pl.ds(j * bk, bk)
    k = k_ref[keys, :]
    mask = _mask(q_start, j * bk, bq, bk, q_pos, q_seg, kpos_ref[keys], kseg_ref[keys], window)
    _, ds = _probs_and_score_grads(q, k, v_ref[keys, :], do, lse, delta, mask, softcap)
    return dq + _dot(ds.astype(k.dtype), k)

  lo, hi = _key_blocks(q_start, bq, bk, window)
  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _window_spec():
  return pl.BlockSpec((1,), lambda *_: (0,))


def _specs(t: int, h: int, groups: int):
  """BlockSpecs over grids (block, B, head) for the kernels' operands."""
  window = _window_spec()
  heads = lambda bq: pl.BlockSpec((None, bq, None, h), lambda i, b, n: (b, i, n, 0))  # noqa: E731
  kv_of_head = pl.BlockSpec((None, None, t, h), lambda i, b, n: (b, n // groups, 0, 0))
  rows = lambda bq: pl.BlockSpec((None, bq), lambda i, b, n: (b, i))  # noqa: E731
  whole_row = pl.BlockSpec((None, t), lambda i, b, n: (b, 0))
  stats = lambda bq: pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))  # noqa: E731
  return window, heads, kv_of_head, rows, whole_row, stats


def _forward(q, k, v, pos, seg, window, softcap, blocks: Blocks, interpret: bool):
  b, t, n, h = q.shape
  groups = n // k.shape[1]
  win, heads, kv_of_head, rows, whole_row, stats = _specs(t, h, groups)
  bq, bk = blocks.fwd.q, blocks.fwd.k
  o, lse = pl.pallas_call(
      functools.partial(_forward_kernel, softcap=softcap, bq=bq, bk=bk),
      grid=(t // bq, b, n),
      in_specs=[win, heads(bq), kv_of_head, kv_of_head, rows(bq), rows(bq), whole_row,
                whole_row],
      out_specs=[heads(bq), stats(bq)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      interpret=interpret, compiler_params=blocks.fwd.params(), name=FORWARD_KERNEL,
  )(window, q, k, v, pos, seg, pos, seg)
  return o, lse


def _key_grads(q, k, v, pos, seg, window, lse, delta, do, softcap, blocks: Blocks,
               interpret: bool):
  """(dk, dv) [B, K, S, H]: a program per block of keys of one kv head and row."""
  b, t, n, h = q.shape
  kv = k.shape[1]
  groups = n // kv
  bq, bk = blocks.dkv.q, blocks.dkv.k
  group_rows = pl.BlockSpec((None, t, groups, h), lambda j, b, m: (b, 0, m, 0))
  group_stats = pl.BlockSpec((None, groups, t), lambda j, b, m: (b, m, 0))
  key_block = pl.BlockSpec((None, None, bk, h), lambda j, b, m: (b, m, j, 0))
  key_rows = pl.BlockSpec((None, bk), lambda j, b, m: (b, j))
  query_rows = pl.BlockSpec((None, t), lambda j, b, m: (b, 0))
  return pl.pallas_call(
      functools.partial(_key_grads_kernel, softcap=softcap, bq=bq, bk=bk, groups=groups,
                        num_q_blocks=t // bq),
      grid=(t // bk, b, kv),
      in_specs=[_window_spec(), group_rows, key_block, key_block, group_rows, group_stats,
                group_stats, query_rows, query_rows, key_rows, key_rows],
      out_specs=[key_block, key_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret, compiler_params=blocks.dkv.params(), name='flash_attention_dkv',
  )(window, q, k, v, do, lse, delta, pos, seg, pos, seg)


def _query_grads(q, k, v, pos, seg, window, lse, delta, do, softcap, blocks: Blocks,
                 interpret: bool):
  """dq [B, T, N, H]: a program per block of queries of one head and row."""
  b, t, n, h = q.shape
  win, heads, kv_of_head, rows, whole_row, stats = _specs(t, h, n // k.shape[1])
  bq, bk = blocks.dq.q, blocks.dq.k
  return pl.pallas_call(
      functools.partial(_query_grads_kernel, softcap=softcap, bq=bq, bk=bk),
      grid=(t // bq, b, n),
      in_specs=[win, heads(bq), kv_of_head, kv_of_head, heads(bq), stats(bq), stats(bq),
                rows(bq), rows(bq), whole_row, whole_row],
      out_specs=heads(bq),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret, compiler_params=blocks.dq.params(), name='flash_attention_dq',
  )(window, q, k, v, do, lse, delta, pos, seg, pos, seg)


def _backward(q, k, v, pos, seg, window, o, lse, do, softcap, blocks: Blocks, interpret: bool):
  # Each query's sum of dO · O, the softmax backward's row term (FlashAttention-2's D).
  delta = jnp.einsum('BTNH,BTNH->BNT', o.astype(jnp.float32), do.astype(jnp.float32))
  args = (q, k, v, pos, seg, window, lse, delta, do, softcap, blocks, interpret)
  dk, dv = _key_grads(*args)
  return _query_grads(*args), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, pos, seg, window, softcap, blocks, interpret):
  return _forward(q, k, v, pos, seg, window, softcap, blocks, interpret)[0]


def _attention_fwd(q, k, v, pos, seg, window, softcap, blocks, interpret):
  o, lse = _forward(q, k, v, pos, seg, window, softcap, blocks, interpret)
  return o, (q, k, v, pos, seg, window, o, lse)


def _attention_bwd(softcap, blocks, interpret, residuals, do):
  q, k, v, pos, seg, window, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, pos, seg, window, o, lse, do, softcap, blocks, interpret)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: Array, key: Array, val: Array, positions: Array, segment_ids: Array,
                    window: Any, *, softcap: float | None, blocks: Blocks = Blocks(),
                    sharding: Any = None, interpret: bool = False) -> Array:
  """Masked, softcapped attention of a sequence to itself, with grouped kv heads.

  Args:
    q: [B, T, N, H] queries, rotated and already scaled (attention.attend scales them).
    key, val: [B, K, T, H].
    positions, segment_ids: [B, T] int.
    window: the sliding window (keys with q_pos - k_pos >= window are masked), a Python int, a
      traced int32 scalar, or None (no window).
    softcap: the logits' softcap, or None.
    blocks: tile sizes (`Blocks`).
    sharding: optional NamedSharding of the [B, T, D] activations: the kernels then run on each
      device's rows (`jax.shard_map`), query heads and kv heads split over 'tensor' if the mesh
      has it.
    interpret: run the kernels in the Pallas interpreter (any backend; for tests).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  window = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32).reshape(1)
  pos, seg = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
  def fn(q, k, v, pos, seg, window):
    return _attention(q, k, v, pos, seg, window, softcap, blocks, interpret)
  if sharding is None:
    return fn(q, key, val, pos, seg, window)
  batch, heads = _mesh_axes(sharding)
  return jax.shard_map(
      fn, mesh=sharding.mesh,
      in_specs=(P(batch, None, heads, None), P(batch, heads, None, None),
                P(batch, heads, None, None), P(batch, None), P(batch, None), P()),
      out_specs=P(batch, None, heads, None), check_vma=False,
  )(q, key, val, pos, seg, window)
