r"""Where the 8-bit update kernel's time goes: the kernel with parts of its work stubbed out.

  python benchmarks/kernel_ablation.py [--shape 14,3584,14336] [--steps 10] [--output OUT.jsonl]
      [--variants a,b,...]

Times `adam_kernel.update_leaf` on one bf16 leaf with 8-bit moments (stochastic rounding on) and
variants of it in which one piece of work is replaced by a trivial stand-in (wrong results; for
timing only), so each piece's cost is the difference to `kernel`:

  kernel          the kernel as trained with
  search_selects  each moment's nearest code found with its segment's constants selected by
                  comparisons (as XLA's update does), not looked up
  no_sr           round to nearest (no random bits, no rounding arithmetic)
  search_stub     each moment's nearest 8-bit code taken as a scaled truncation, not searched for
  hash_stub       the random bits taken from the element index, not hashed
  stubs           search_stub + hash_stub
  io              the same loads and stores with no arithmetic between them: the floor of the
                  kernel's memory traffic (params, gradients, codes as int32 words, scales)
  io_unpack       io plus the codes' unpacking into bytes and packing back, the dequantising
                  lookups and each block's absmax: the kernel's data movement without Adam, the
                  code search or the rounding

Prints (and appends) one JSON line per variant: median seconds per update and the bytes the
update must move (params in and out, gradients, codes in and out) per second.
"""

import argparse
import contextlib
import datetime
import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp

from gemma_sft_jax.training import adam_kernel
from gemma_sft_jax.training import metrics
from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import rounding


def _selects(normed, *, signed, lookup, search=quant.nearest_code_index):
  del lookup
  return search(normed, signed=signed)


def _search_stub(normed, *, signed, lookup=None):
  del lookup
  index = (normed * 127.0).astype(jnp.int32)
  return index + 128 if signed else index


def _hash_stub(index, seed):
  return (index.astype(jnp.uint32) ^ seed.astype(jnp.uint32)) & jnp.uint32(0xFFFF)


def _io_kernel(floats_ref, seed_ref, signed_map_ref, unsigned_map_ref, segments_ref, p_ref, g_ref,
               mc_ref, ms_ref, vc_ref, vs_ref, p_out, mc_out, ms_out, vc_out, vs_out, *,
               unpack_codes, **unused):
  del seed_ref, segments_ref, unused
  p = p_ref[...]
  g = g_ref[...]
  if not unpack_codes:
    p_out[...] = (p.astype(jnp.float32) + g.astype(jnp.float32) * floats_ref[0]).astype(p.dtype)
    mc_out[...] = mc_ref[...]
    vc_out[...] = vc_ref[...]
    ms_out[...] = ms_ref[...]
    vs_out[...] = vs_ref[...]
    return
  shape = p.shape
  shift = jax.lax.broadcasted_iota(jnp.int32, shape, 2) * 8
  gf = g.astype(jnp.float32) * floats_ref[0]
  unpack, pack = adam_kernel._unpack, adam_kernel._pack  # pylint: disable=protected-access
  mu = (signed_map_ref[unpack(mc_ref[...], shift, True) + quant.code_offset(True)]
        * ms_ref[...][:, None, None])
  nu = unsigned_map_ref[unpack(vc_ref[...], shift, False)] * vs_ref[...][:, None, None]
  p_out[...] = (p.astype(jnp.float32) + gf).astype(p.dtype)
  for x, codes_out, scales_out, signed in ((mu + gf, mc_out, ms_out, True),
                                           (nu + gf, vc_out, vs_out, False)):
    absmax = jnp.max(jnp.max(jnp.abs(x), axis=2), axis=1)
    normed = x * (1.0 / jnp.where(absmax > 0, absmax, 1.0))[:, None, None]
    index = _search_stub(normed, signed=signed)
    codes_out[...] = pack(index - quant.code_offset(signed), shift)
    scales_out[...] = absmax


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _variant(name):
  """(context manager patching the kernel's pieces, stochastic_rounding)."""
  stack = contextlib.ExitStack()
  if name == 'search_selects':
    stack.enter_context(_patched(quant, 'nearest_code_index', _selects))
  if name in ('search_stub', 'stubs'):
    stack.enter_context(_patched(quant, 'nearest_code_index', _search_stub))
  if name in ('hash_stub', 'stubs'):
    stack.enter_context(_patched(rounding, 'random_bits16', _hash_stub))
  if name in ('io', 'io_unpack'):
    stack.enter_context(_patched(adam_kernel, '_kernel', functools.partial(
        _io_kernel, unpack_codes=name == 'io_unpack')))
  return stack, name != 'no_sr'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='14,3584,14336')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--output')
  parser.add_argument('--tag', default='')
  parser.add_argument('--interpret', action='store_true',
                      help='run the Pallas interpreter (any backend; to check the script on CPU)')
  parser.add_argument('--variants',
                      default='kernel,search_selects,no_sr,search_stub,hash_stub,stubs,io,'
                      'io_unpack,kernel')
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(','))
  n = math.prod(shape)
  g = (jax.random.normal(jax.random.key(0), shape, jnp.float32) * 1e-3).astype(jnp.bfloat16)

  def moment(signed):
    codes = jnp.zeros(shape, jnp.int8 if signed else jnp.uint8)
    return quant.QuantizedArray(codes, jnp.zeros(shape[:-1] + (shape[-1] // 256,), jnp.float32))

  for name in args.variants.split(','):
    patches, sr = _variant(name)
    with patches:
      fn = jax.jit(lambda p, g, mu, nu, sr=sr: adam_kernel.update_leaf(  # pylint: disable=g-long-lambda
          p, g, mu, nu, grad_scale=jnp.float32(1.0), lr=jnp.float32(1e-5),
          bc=(jnp.float32(0.1), jnp.float32(0.001)), seed=jnp.uint32(3), b1=0.9, b2=0.999,
          eps=1e-8, weight_decay=0.01, stochastic_rounding=sr,
          interpret=args.interpret), donate_argnums=(0, 2, 3))
      state = (jnp.zeros(shape, jnp.bfloat16), moment(True), moment(False))
      state = fn(state[0], g, state[1], state[2])  # compile (inside the patches)
      jax.block_until_ready(state)
      times = []
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state = fn(state[0], g, state[1], state[2])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    metrics.emit_json_line({
        'bench': 'kernel_ablation', 'tag': args.tag, 'variant': name, 'shape': list(shape),
        'update_s': sec, 'min_bytes_per_s': n * (2 + 2 + 2 + 4) / sec,
        'finite': bool(jnp.isfinite(state[0].astype(jnp.float32)).all()),
        'device': jax.devices()[0].device_kind, 'date': datetime.date.today().isoformat(),
        'jax': jax.__version__}, args.output)
    del state


if __name__ == '__main__':
  main()
