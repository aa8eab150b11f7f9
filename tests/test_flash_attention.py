"""Flash attention's kernels (Pallas interpreter on CPU) against the einsum path, and the model
with each."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import attention
from gemma_sft_jax.model import flash_attention as fa
from gemma_sft_jax.model import remat as remat_lib
from gemma_sft_jax.model import transformer as model_lib
from tests.conftest import run_on_cpu_devices

SMALL = fa.Blocks(fwd=fa.Tile(16, 16, 4, 2), dkv=fa.Tile(16, 32, 4, 2), dq=fa.Tile(32, 16, 4, 2))
# bf16 tolerance: both paths round queries, keys, values and probabilities to bf16 and accumulate
# in fp32, in different orders; on values of order 1-6 they differ by one or two bf16 ulps.
BF16_ATOL = 0.04


def _packed(batch: int, seq: int, pad: int = 0):
  """Positions and segment ids of rows holding two documents (60% and the rest, less `pad`
  padding tokens at the end: segment 0, position 0)."""
  idx = np.arange(seq)
  split, end = int(seq * 0.6), seq - pad
  seg = np.where(idx < split, 1, np.where(idx < end, 2, 0))
  pos = np.where(idx < split, idx, np.where(idx < end, idx - split, 0))
  return (jnp.asarray(np.broadcast_to(pos, (batch, seq)), jnp.int32),
          jnp.asarray(np.broadcast_to(seg, (batch, seq)), jnp.int32))


def _config(heads: int, kv_heads: int, head_dim: int, softcap, window):
  return dataclasses.replace(architecture.VARIANTS['tiny_gemma2'], num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim,
                             query_pre_attn_scalar=head_dim, attn_logit_softcap=softcap,
                             sliding_window=window)


def _both(c, q, k, v, pos, seg, local, dtype, blocks=SMALL):
  """(einsum output, flash output, einsum grads, flash grads) for one random cotangent."""
  # No loss reads padding's outputs, so their cotangent is zero, as in training.
  ct = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
  ct = (ct * (seg > 0)[:, :, None, None]).astype(dtype)
  args = tuple(x.astype(dtype) for x in (q, k, v))

  def ref(q, k, v):
    return attention.attend(c, q, k, v, pos, seg, pos, seg, local, None, dtype=dtype)

  def flash(q, k, v):
    return fa.flash_attention(attention.scale_queries(c, q), k, v, pos, seg,
                              attention.layer_window(c, local), softcap=c.attn_logit_softcap,
                              blocks=blocks, interpret=True)

  def out_and_grads(fn, args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)

  r, r_grads = jax.jit(out_and_grads, static_argnums=0)(ref, args)
  f, f_grads = jax.jit(out_and_grads, static_argnums=0)(flash, args)
  return r, f, r_grads, f_grads


def _random(shape_q, shape_k, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, shape_q), jax.random.normal(kk, shape_k),
          jax.random.normal(kv, shape_k))


def _max_diff(a, b, where=None):
  d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return float(d[where].max() if where is not None else d.max())


@pytest.mark.parametrize('heads,kv_heads,softcap,local', [
    (4, 2, 50.0, True),    # Gemma 2: grouped kv heads, softcap, a sliding-window layer
    (4, 1, None, 'traced'),  # Gemma 3: one kv head, no softcap, the window chosen by data
    (2, 2, 30.0, False),   # one query head per kv head, a global layer
])
def test_kernels_equal_einsum_in_fp32(heads, kv_heads, softcap, local):
  """Output and the three gradients match attention.attend to float32 rounding, with two packed
  documents per row, grouped kv heads, softcap and sliding windows (which change the result:
  the window of 12 is shorter than the documents)."""
  b, t, h = 2, 64, 32
  c = _config(heads, kv_heads, h, softcap, 12)
  q, k, v = _random((b, t, heads, h), (b, kv_heads, t, h))
  pos, seg = _packed(b, t)
  flag = jnp.asarray(True) if local == 'traced' else local
  r, f, rg, fg = _both(c, q, k, v, pos, seg, flag, jnp.float32)
  assert _max_diff(r, f) < 1e-5
  for x, y in zip(rg, fg):
    assert _max_diff(x, y) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(x))))
  if local is not False:
    whole = attention.attend(c, q, k, v, pos, seg, pos, seg, False, None, dtype=jnp.float32)
    assert _max_diff(whole, r) > 0.1


def test_kernels_equal_einsum_in_bf16_on_9b_like_heads():
  """Gemma 2 9B's head layout (16 query heads over 8 kv heads of 256) in bf16, the model's
  dtype: within BF16_ATOL of the einsum path in every real token's output and every gradient
  (padding's own outputs differ, causal by index here; no loss reads them)."""
  b, t, h = 1, 64, 256
  c = dataclasses.replace(architecture.VARIANTS['gemma2_9b'])
  q, k, v = _random((b, t, 16, h), (b, 8, t, h), seed=3)
  pos, seg = _packed(b, t, pad=6)
  r, f, rg, fg = _both(c, q, k, v, pos, seg, False, jnp.bfloat16)
  real = np.asarray(seg)[:, :, None, None] > 0
  assert _max_diff(r, f, np.broadcast_to(real, r.shape)) < BF16_ATOL
  for x, y in zip(rg, fg):
    assert _max_diff(x, y) < BF16_ATOL * max(1.0, float(jnp.max(jnp.abs(x.astype(jnp.float32)))))


def test_padding_attends_only_to_padding_before_it():
  """A padding row's output is the softmax-weighted sum over the padding keys up to it (the
  einsum path takes all padding keys); real tokens never see padding."""
  b, t, h, pad = 1, 64, 16, 10
  c = _config(2, 2, h, None, None)
  q, k, v = _random((b, t, 2, h), (b, 2, t, h))
  pos, seg = _packed(b, t, pad=pad)
  _, f, _, _ = _both(c, q, k, v, pos, seg, False, jnp.float32)
  first = t - pad
  for i in (first, first + 4, t - 1):
    keys = slice(first, i + 1)
    scores = jnp.einsum('NH,NSH->NS', q[0, i] * h ** -0.5, k[0, :, keys])
    expected = jnp.einsum('NS,NSH->NH', jax.nn.softmax(scores, axis=-1), v[0, :, keys])
    np.testing.assert_allclose(np.asarray(f[0, i]), np.asarray(expected), atol=1e-5)


def _tiny_model(attention_impl: str, dtype=jnp.float32):
  c = _config(4, 2, 16, 50.0, 24)
  return c, model_lib.Transformer(c, dtype=dtype, scan_layers=True, attention=attention_impl)


def test_model_with_flash_equals_einsum_on_every_logit_and_gradient():
  """The whole (scanned, sliding and global layers) model: every vocabulary logit of every real
  token and every parameter's gradient of the loss agree between model.attention 'flash' and
  'einsum' (fp32: to float rounding)."""
  b, t = 2, 64
  c, einsum_model = _tiny_model('einsum')
  _, flash_model = _tiny_model('flash')
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, c.vocab_size)
  pos, seg = _packed(b, t, pad=5)
  params = einsum_model.init(jax.random.key(0), tokens[:, :8])['params']
  real = np.asarray(seg) > 0

  def logits(model, p):
    return model.apply({'params': p}, tokens, pos, seg)[0]

  weights = jnp.asarray(real, jnp.float32)

  def loss(p, model):
    out = logits(model, p)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(out), tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights), out

  grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, le), ge = grads(params, einsum_model)
  (_, lf), gf = grads(params, flash_model)
  assert _max_diff(le, lf, np.broadcast_to(real[..., None], le.shape)) < 2e-5
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ge), jax.tree.leaves(gf)):
    scale = max(1e-3, float(jnp.max(jnp.abs(x))))
    assert _max_diff(x, y) < 1e-4 * scale, jax.tree_util.keystr(path)


def test_remat_keeps_the_flash_forward_by_name():
  """remat 'save:...,attention' keeps the forward kernel's outputs: the backward pass does not
  run it again (fewer forward kernels in the step's program). Under either policy the flash
  model's gradients are the einsum model's without remat."""
  c, _ = _tiny_model('flash')
  tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, c.vocab_size)
  projections = 'save:' + ','.join(remat_lib.PROJECTIONS)
  grads, kernels = [], []
  for impl, remat in (('einsum', 'none'), ('flash', projections),
                      ('flash', projections + ',attention')):
    model = model_lib.Transformer(c, scan_layers=True, attention=impl, remat=remat)
    params = model.init(jax.random.key(0), tokens[:, :8])['params']
    step = jax.grad(lambda p, model=model: jnp.sum(model.apply({'params': p}, tokens)[0] ** 2))
    kernels.append(str(jax.make_jaxpr(step)(params)).count('flash_attention_fwd'))
    grads.append(jax.jit(step)(params))
  assert kernels[0] == 0 and 0 < kernels[2] < kernels[1], kernels
  for flash in grads[1:]:
    for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(flash)):
      scale = max(1e-3, float(jnp.max(jnp.abs(x))))
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-4 * scale)
  with pytest.raises(ValueError, match='attention'):
    remat_lib.remat_policy('save:attn')


def test_dispatch():
  q, k = (8, 512, 16, 256), (8, 8, 512, 256)
  assert not fa.use('einsum', q, k)
  assert fa.use('flash', q, k)
  # 'auto' takes the kernels on GPU only.
  assert fa.use('auto', q, k) == (jax.default_backend() == 'gpu')
  # Shapes the kernels do not take go the einsum way: not a power of two, init's one token,
  # three query heads per kv head.
  assert not fa.use('flash', (8, 384, 16, 256), (8, 8, 384, 256))
  assert not fa.use('flash', (1, 1, 16, 256), (1, 8, 1, 256))
  assert not fa.use('flash', (1, 64, 9, 16), (1, 3, 64, 16))
  with pytest.raises(ValueError, match='model.attention'):
    fa.use('fast', q, k)
  # On a mesh the kernels see each device's share; rows or heads that do not split evenly go
  # the einsum way.
  mesh = types.SimpleNamespace(shape={'data': 1, 'fsdp': 2, 'tensor': 4},
                               axis_names=('data', 'fsdp', 'tensor'))
  act = types.SimpleNamespace(mesh=mesh, spec=(('data', 'fsdp'), None, None))
  assert fa.use('flash', q, k, act)
  assert not fa.use('flash', (8, 512, 16, 256), (8, 2, 512, 256), act)
  assert not fa.use('flash', (3, 512, 16, 256), (3, 8, 512, 256), act)


def test_kernels_lower_to_three_triton_calls_for_cuda():
  """Forward and backward lower for CUDA (no GPU needed): forward, key/value and query
  gradient kernels, one Triton call each, at Gemma 2 9B's shapes."""
  s = lambda shp, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shp, dt)  # noqa: E731

  def step(q, k, v, pos, seg, ct):
    out, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, pos, seg, None,
                                                          softcap=50.0), q, k, v)
    return out, vjp(ct)

  exported = jax.export.export(
      jax.jit(step), platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')],
  )(s((8, 512, 16, 256)), s((8, 8, 512, 256)), s((8, 8, 512, 256)), s((8, 512), jnp.int32),
    s((8, 512), jnp.int32), s((8, 512, 16, 256)))
  text = exported.mlir_module()
  assert text.count('__gpu$xla.gpu.triton') == 3
  for name in ('flash_attention_fwd', 'flash_attention_dkv', 'flash_attention_dq'):
    assert name in text


_MESH_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gemma_sft_jax.model import flash_attention as fa, sharding as sh
mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
act = sh.activation_sharding(mesh)
b, t, n, k, h = 4, 64, 4, 2, 32
kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
q, key, val = (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, k, t, h)),
               jax.random.normal(kv, (b, k, t, h)))
ct = jax.random.normal(kc, (b, t, n, h))
pos = jnp.broadcast_to(jnp.arange(t) % 40, (b, t)).astype(jnp.int32)
seg = jnp.broadcast_to((jnp.arange(t) >= 40) + 1, (b, t)).astype(jnp.int32)
blocks = fa.Blocks(fwd=fa.Tile(16, 16, 4, 2), dkv=fa.Tile(16, 32, 4, 2), dq=fa.Tile(32, 16, 4, 2))
def run(sharding):
  def step(q, key, val, ct, pos, seg):
    f = lambda q, key, val: fa.flash_attention(q, key, val, pos, seg, 20, softcap=50.0,
                                               blocks=blocks, sharding=sharding, interpret=True)
    o, vjp = jax.vjp(f, q, key, val)
    return o, vjp(ct)
  return jax.jit(step)
one = run(None)(q, key, val, ct, pos, seg)
spread = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
rows = ('data', 'fsdp')
args = (spread(q, P(rows, None, 'tensor')), spread(key, P(rows, 'tensor')),
        spread(val, P(rows, 'tensor')), spread(ct, P(rows, None, 'tensor')),
        spread(pos, P(rows)), spread(seg, P(rows)))
eight = run(act)(*args)
for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
  np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-5)
print('MESH_FLASH_OK')
'''


def test_kernels_on_an_8_device_mesh_equal_one_device():
  """Rows split over data × fsdp and heads over tensor (8 CPU devices, interpreted): the same
  output and gradients as one device."""
  proc = run_on_cpu_devices(_MESH_SCRIPT, 8)
  assert proc.returncode == 0 and 'MESH_FLASH_OK' in proc.stdout, proc.stdout + proc.stderr[-3000:]
