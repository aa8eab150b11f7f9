r"""Where a one-prompt decode step of the Gemma 3 270M goes on a CPU (random init, bf16 weights).

  python benchmarks/cpu_decode_step.py [--output results/startup/DATE-cpu-decode-step.jsonl]
  XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python benchmarks/cpu_decode_step.py ...

Times 64 cached one-token steps of the unrolled model in one jitted loop (one row, a 320-slot
cache), with the next token chosen three ways: `embedding` (the tied head as the sampler
computes it), `head_f32_dv` (the head as a [D, V] fp32 copy), `no_head` (argmax over 8 hidden
units: the layers alone). Also times the head's one-row matrix-vector product alone, fp32
[V, D] and [D, V], and reports the bytes per second it streams: the floor of a step on this
machine. And times that product as one call per token with the head stored narrower
(`matvec_call_<dtype>`: fp32, bf16, fp16, int8), which would stream fewer bytes if XLA:CPU
multiplied those types at the same speed. One JSON line per measurement, with XLA_FLAGS and the
machine's core count.
"""

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import kv_cache
from gemma_sft_jax.model import transformer as model_lib

STEPS = 64


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--output')
  args = p.parse_args()
  config = architecture.VARIANTS['gemma3_270m']
  model = model_lib.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])()
  head_dv = jnp.asarray(params['embedder']['embedding'], jnp.float32).T
  common = {'what': 'cpu decode step', 'model': 'gemma3_270m', 'date':
            datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            'cores': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'jax': jax.__version__}
  lines = []

  for variant in ('embedding', 'head_f32_dv', 'no_head'):
    def run(params, head_dv, cache, variant=variant):
      def body(i, s):
        token, cache = s
        hidden, cache = model.apply({'params': params}, token[:, None],
                                    jnp.full((1, 1), i, jnp.int32), jnp.ones((1, 1), jnp.int32),
                                    cache=cache, return_hidden=True)
        h = hidden[:, 0]
        if variant == 'embedding':
          logits = model_lib.output_logits(h, params['embedder']['embedding'],
                                           config.final_logit_softcap)
        elif variant == 'head_f32_dv':
          logits = jnp.dot(h.astype(jnp.float32), head_dv)
        else:
          logits = h[:, :8].astype(jnp.float32)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache
      return jax.lax.fori_loop(0, STEPS, body, (jnp.zeros((1,), jnp.int32), cache))[0]
    cache = kv_cache.init_cache(config, 1, 320, jnp.bfloat16)
    seconds = _time(jax.jit(run), params, head_dv, cache)
    lines.append({**common, 'variant': variant, 'ms_per_step': 1e3 * seconds / STEPS})

  head_vd = jnp.asarray(params['embedder']['embedding'], jnp.float32)
  for name, weights, eq in (('matvec_f32_vd', head_vd, 'bd,vd->bv'),
                            ('matvec_f32_dv', head_dv, 'bd,dv->bv')):
    def loop(w, eq=eq):
      body = lambda i, h: h + 1e-9 * jnp.argmax(jnp.einsum(eq, h, w), -1)[:, None]
      return jax.lax.fori_loop(0, STEPS, body, jnp.ones((1, config.embed_dim), jnp.float32))
    seconds = _time(jax.jit(loop), weights) / STEPS
    lines.append({**common, 'variant': name, 'ms_per_step': 1e3 * seconds,
                  'gb_per_s': weights.size * 4 / seconds / 1e9})

  x = jnp.ones((1, config.embed_dim), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8):
    weights = (head_vd * 100 if dtype == jnp.int8 else head_vd).astype(dtype)
    out = jnp.int32 if dtype == jnp.int8 else jnp.float32
    matvec = jax.jit(lambda x, w, out=out: jnp.argmax(jnp.einsum(
        'bd,vd->bv', x.astype(w.dtype), w, preferred_element_type=out), -1))
    jax.block_until_ready(matvec(x, weights))
    times = []
    for _ in range(10):
      t = time.perf_counter()
      jax.block_until_ready(matvec(x, weights))
      times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    lines.append({**common, 'variant': f'matvec_call_{jnp.dtype(dtype).name}',
                  'ms_per_step': 1e3 * seconds,
                  'gb_per_s': weights.size * weights.dtype.itemsize / seconds / 1e9})

  for line in lines:
    print(json.dumps(line))
    if args.output:
      with open(args.output, 'a') as f:
        f.write(json.dumps(line) + '\n')


if __name__ == '__main__':
  main()
