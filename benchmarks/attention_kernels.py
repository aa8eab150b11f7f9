r"""Attention alone, forward + backward: the model's einsum path against its flash kernels
(`model/flash_attention.py`) and tokamax's fused kernels; and a sweep of the flash kernels' tiles.

  python benchmarks/attention_kernels.py [--variants gemma2_2b,gemma2_9b] [--batch 8]
      [--seq 512] [--impls einsum,flash,mosaic,triton] [--output OUT.jsonl]
  python benchmarks/attention_kernels.py --sweep [--variants ...] [--output OUT.jsonl]

Random bf16 queries, keys and values shaped like one layer of each variant (two packed segments
per row), the layer's softcap and query scaling. For each implementation: the median time of a
jitted forward + backward (the cotangent is random), and its largest difference from the einsum
path computed in fp32 (output and the three gradients), one JSON line each. tokamax is not a
dependency of the package (`pip install tokamax` to time its kernels; 0.0.17 needs jax >= 0.11.1);
an implementation that raises, or is not installed, is reported as such. `--sweep` times each
of the three flash kernels alone (forward, key/value gradients, query gradients) for each
candidate tile in SWEEP, one JSON line per kernel and tile.
"""

import argparse
import dataclasses
import datetime
import functools

from absl import flags
import jax
import jax.numpy as jnp

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import attention
from gemma_sft_jax.model import flash_attention as fa
from gemma_sft_jax.training import metrics


def _inputs(c, batch: int, seq: int, key):
  kq, kk, kv, kg = jax.random.split(key, 4)
  n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
  q = jax.random.normal(kq, (batch, seq, n, h), jnp.float32)
  keys = jax.random.normal(kk, (batch, seq, k, h), jnp.float32)
  vals = jax.random.normal(kv, (batch, seq, k, h), jnp.float32)
  cot = jax.random.normal(kg, (batch, seq, n, h), jnp.float32)
  # Two packed documents per row: the first 60% of the tokens, then the rest.
  split = int(seq * 0.6)
  idx = jnp.arange(seq)
  segment_ids = jnp.broadcast_to(jnp.where(idx < split, 1, 2), (batch, seq)).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.where(idx < split, idx, idx - split), (batch, seq))
  return q, keys, vals, cot, positions.astype(jnp.int32), segment_ids


def _einsum_fn(c, positions, segment_ids, dtype):
  def fn(q, keys, vals):
    return attention.attend(c, q, jnp.swapaxes(keys, 1, 2), jnp.swapaxes(vals, 1, 2), positions,
                            segment_ids, positions, segment_ids, False, None, dtype=dtype)
  return fn


def _flash_fn(c, positions, segment_ids, blocks=fa.Blocks()):
  def fn(q, keys, vals):
    return fa.flash_attention(attention.scale_queries(c, q), jnp.swapaxes(keys, 1, 2),
                              jnp.swapaxes(vals, 1, 2), positions, segment_ids, None,
                              softcap=c.attn_logit_softcap, blocks=blocks)
  return fn


# Candidate tiles per kernel: (queries, keys, warps, pipeline stages).
SWEEP = {
    'fwd': [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (32, 64, 4, 3),
            (32, 32, 4, 3), (64, 64, 8, 3), (64, 128, 4, 2)],
    'dkv': [(32, 32, 4, 2), (32, 32, 4, 3), (32, 32, 4, 1), (16, 32, 4, 2), (32, 32, 8, 2),
            (64, 32, 4, 2), (32, 64, 8, 2), (16, 16, 4, 2)],
    'dq': [(32, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 3), (64, 64, 4, 2), (32, 128, 4, 2),
           (16, 64, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2)],
}


def _sweep(c, name, args, emit) -> None:
  """Each flash kernel alone under each candidate tile of SWEEP."""
  q, keys, vals, cot, positions, segment_ids = args
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  q = attention.scale_queries(c, bf(q))
  k, v, do = bf(jnp.swapaxes(keys, 1, 2)), bf(jnp.swapaxes(vals, 1, 2)), bf(cot)
  window = jnp.full((1,), fa.NO_WINDOW, jnp.int32)
  cap = c.attn_logit_softcap
  # The kernels' own functions (private to the model; timed here one by one).
  forward = fa._forward  # pylint: disable=protected-access
  parts = {'dkv': fa._key_grads, 'dq': fa._query_grads}  # pylint: disable=protected-access
  o, lse = forward(q, k, v, positions, segment_ids, window, cap, fa.Blocks(), False)
  delta = jnp.einsum('BTNH,BTNH->BNT', o.astype(jnp.float32), do.astype(jnp.float32))
  arrays = (q, k, v, positions, segment_ids, window, lse, delta, do)
  for kernel, tiles in SWEEP.items():
    for bq, bk, warps, stages in tiles:
      blocks = dataclasses.replace(fa.Blocks(), **{kernel: fa.Tile(bq, bk, warps, stages)})

      def fn(q, k, v, pos, seg, window, lse, delta, do, kernel=kernel, blocks=blocks):
        if kernel == 'fwd':
          return forward(q, k, v, pos, seg, window, cap, blocks, False)
        return parts[kernel](q, k, v, pos, seg, window, lse, delta, do, cap, blocks, False)
      row = {'bench': 'flash_attention_tiles', 'variant': name, 'kernel': kernel, 'block_q': bq,
             'block_k': bk, 'num_warps': warps, 'num_stages': stages}
      try:
        step = functools.partial(jax.jit(fn), *arrays)
        jax.block_until_ready(step())
        row['ms'] = metrics.median_seconds(lambda: jax.block_until_ready(step()), 20) * 1e3
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
      emit(row)


def _tokamax_fn(c, positions, segment_ids, impl):
  import tokamax  # pylint: disable=g-import-not-at-top  (optional: not a dependency)
  mask = attention.attention_mask(positions, segment_ids, positions, segment_ids, None)

  def fn(q, keys, vals):
    return tokamax.dot_product_attention(
        q, keys, vals, mask=mask[:, None], is_causal=True, scale=c.query_pre_attn_scalar ** -0.5,
        logits_soft_cap=c.attn_logit_softcap, implementation=impl)
  return fn


def _time(fn, args, cot, steps: int):
  """(median seconds of a jitted forward + backward, its (output, gradients))."""
  def loss_grads(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cot.astype(out.dtype))
  step = jax.jit(loss_grads)
  seconds = metrics.median_seconds(lambda: jax.block_until_ready(step(*args)), steps)
  return seconds, step(*args)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variants', default='gemma2_2b,gemma2_9b')
  p.add_argument('--impls', default='einsum,flash,mosaic,triton')
  p.add_argument('--sweep', action='store_true', help="time the flash kernels' tiles instead")
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=512)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--output')
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; this script's are argparse's.
  for name in args.variants.split(','):
    c = architecture.VARIANTS[name]
    q, keys, vals, cot, positions, segment_ids = _inputs(c, args.batch, args.seq,
                                                         jax.random.key(0))
    base = {'variant': name, 'batch': args.batch, 'seq_len': args.seq,
            'device': jax.devices()[0].device_kind, 'date': datetime.date.today().isoformat(),
            'jax': jax.__version__}
    if args.sweep:
      _sweep(c, name, (q, keys, vals, cot, positions, segment_ids),
             lambda row: metrics.emit_json_line({**row, **base}, args.output))
      continue
    ref_fn = _einsum_fn(c, positions, segment_ids, jnp.float32)
    ref_out, ref_vjp = jax.vjp(ref_fn, q, keys, vals)
    ref = (ref_out, ref_vjp(cot))
    bf = tuple(a.astype(jnp.bfloat16) for a in (q, keys, vals))
    for impl in args.impls.split(','):
      row = {'bench': 'attention_kernels', 'variant': name, 'impl': impl, 'batch': args.batch,
             'seq_len': args.seq, 'device': jax.devices()[0].device_kind,
             'date': datetime.date.today().isoformat(), 'jax': jax.__version__}
      try:
        if impl == 'einsum':
          fn = _einsum_fn(c, positions, segment_ids, jnp.bfloat16)
        elif impl == 'flash':
          fn = _flash_fn(c, positions, segment_ids)
        else:
          fn = _tokamax_fn(c, positions, segment_ids, impl)
        seconds, (out, grads) = _time(fn, bf, cot, args.steps)
        diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        row.update(fwd_bwd_ms=seconds * 1e3, max_abs_diff_out=diff(out, ref[0]),
                   max_abs_diff_grads=[diff(a, b) for a, b in zip(grads, ref[1])],
                   ref_max_abs_grads=[float(jnp.max(jnp.abs(b))) for b in ref[1]])
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
      metrics.emit_json_line(row, args.output)


if __name__ == '__main__':
  main()
