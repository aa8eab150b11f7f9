r"""The whole model with flash attention against the einsum path, on the device: every vocabulary
logit and every parameter's gradient of the loss, compiled kernels (not the interpreter).

  python benchmarks/flash_parity.py [--variant gemma2_9b] [--layers 4] [--batch 2] [--seq 512]
      [--dtype bfloat16] [--output OUT.jsonl]

A random-init model of the variant's shapes with `--layers` scanned layers (sliding and global),
rows of two packed documents with padding at the end; one JSON line with the largest logit
difference over real tokens, the largest logit, and the largest gradient difference relative to
the largest gradient of each leaf. The same for each path against the einsum path in float32
(the same weights), to show how far bf16 alone moves them (`*_vs_fp32`).
"""

import argparse
import dataclasses
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import flash_attention
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import metrics


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='gemma2_9b')
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--seq', type=int, default=512)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--output')
  args = p.parse_args()
  base = architecture.VARIANTS[args.variant]
  c = dataclasses.replace(base, num_layers=args.layers,
                          layer_types=tuple(base.layer_types[:args.layers]))
  dtype = jnp.dtype(args.dtype)
  b, t = args.batch, args.seq
  idx = np.arange(t)
  split, end = int(t * 0.6), t - 16
  seg = np.broadcast_to(np.where(idx < split, 1, np.where(idx < end, 2, 0)), (b, t))
  pos = np.broadcast_to(np.where(idx < split, idx, np.where(idx < end, idx - split, 0)), (b, t))
  seg, pos = jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32)
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, c.vocab_size)
  weights = (seg > 0).astype(jnp.float32)
  models = {impl: model_lib.Transformer(c, dtype=dtype, param_dtype=dtype, scan_layers=True,
                                        attention=impl) for impl in ('einsum', 'flash')}
  models['fp32'] = model_lib.Transformer(c, dtype=jnp.float32, param_dtype=jnp.float32,
                                         scan_layers=True, attention='einsum')
  params = jax.jit(lambda: models['einsum'].init(jax.random.key(0), tokens[:, :8])['params'])()

  def loss(p, impl):
    logits = models[impl].apply({'params': p}, tokens, pos, seg)[0]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights), logits

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (loss_e, logits_e), grads_e = step(params, 'einsum')
  (loss_f, logits_f), grads_f = step(params, 'flash')
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  (_, logits_32), grads_32 = step(params32, 'fp32')
  real = np.asarray(seg > 0)[..., None]

  def logit_diff(a, b):
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d[np.broadcast_to(real, d.shape)].max())

  def grad_diffs(ga, gb):
    return [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                  / max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))), 1e-30))
            for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))]

  rel = grad_diffs(grads_e, grads_f)
  vs32 = {f'{name}_vs_fp32': {'max_abs_logit_diff_real_tokens': logit_diff(logits_32, lg),
                              'max_grad_diff_over_max_grad': max(grad_diffs(grads_32, g))}
          for name, lg, g in (('einsum', logits_e, grads_e), ('flash', logits_f, grads_f))}
  metrics.emit_json_line({
      'bench': 'flash_parity', 'variant': args.variant, 'layers': args.layers, 'batch': b,
      'seq_len': t, 'dtype': args.dtype, 'device': jax.devices()[0].device_kind,
      'date': datetime.date.today().isoformat(), 'jax': jax.__version__,
      'flash_used': flash_attention.use('flash', (b, t, c.num_heads, c.head_dim),
                                        (b, c.num_kv_heads, t, c.head_dim)),
      'loss_einsum': float(loss_e), 'loss_flash': float(loss_f),
      'max_abs_logit_diff_real_tokens': logit_diff(logits_e, logits_f),
      'max_abs_logit': float(np.abs(np.asarray(logits_e, np.float32)).max()),
      'max_grad_diff_over_max_grad': max(rel),
      'median_grad_diff_over_max_grad': float(np.median(rel)), **vs32,
  }, args.output)


if __name__ == '__main__':
  main()
