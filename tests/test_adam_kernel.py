"""The 8-bit AdamW update as one Pallas kernel (gemma_sft_jax.training.adam_kernel) against the
XLA update it replaces on GPUs, run here in the Pallas interpreter; and its lowering to Triton."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.training import adam_kernel
from gemma_sft_jax.training import optimizer as opt
from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import update as update_lib


def _problem(param_dtype):
  k = jax.random.split(jax.random.key(5), 3)
  params = {'layers': {'w': (jax.random.normal(k[0], (3, 16, 512)) * 0.05).astype(param_dtype),
                       'norm': jnp.zeros((3, 16), param_dtype)},
            'embed': (jax.random.normal(k[1], (40, 256)) * 0.05).astype(param_dtype),
            # 8-bit moments, but a last axis of part of a block: XLA's update takes it.
            'odd': (jax.random.normal(k[1], (64, 96)) * 0.05).astype(param_dtype)}
  grads = lambda i: jax.tree.map(  # noqa: E731
      lambda p: (jax.random.normal(jax.random.fold_in(k[2], i), p.shape) * 30).astype(p.dtype),
      params)
  mask = opt.default_decay_mask(params)
  tx, schedule = opt.make_optimizer(lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_steps=10,
                                    weight_decay=0.1, clip_norm=1.0, state_dtype='int8',
                                    decay_mask=mask, b1=0.9, b2=0.95)

  def run(kernel, sr=True, steps=3):
    update = update_lib.make_update(
        schedule=schedule, weight_decay=0.1, clip_norm=1.0, decay_mask=mask,
        chunks=jax.tree.map(lambda _: 1, params), b1=0.9, b2=0.95, stochastic_rounding=sr,
        kernels=jax.tree.map(lambda _: kernel, params), interpret_kernels=True)
    step = jax.jit(lambda p, g, s, i: update(p, g, s, divisor=64.0, seed=i.astype(jnp.uint32)))
    p, s = params, tx.init(params)
    for i in range(steps):
      p, s, _ = step(p, grads(i), s, jnp.int32(i))
    return p, s
  return params, run


@pytest.mark.parametrize('param_dtype', [jnp.bfloat16, jnp.float32])
def test_kernel_equals_the_xla_update(param_dtype):
  """Three steps (clipping active, warmup and decay, bf16 stochastic rounding): the kernel's
  weights and 8-bit codes equal the XLA update's (measured: all of them; a code may flip where a
  moment falls on a midpoint, so 99.9% is asserted), block scales to float rounding. Leaves the
  kernel cannot take (small, fp32 moments; a last axis of 96) come out of XLA either way."""
  params, run = _problem(param_dtype)
  a, sa = run(False)
  b, sb = run(True)
  for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb))):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    if x.dtype == np.float32 and x.ndim and x.shape[-1] in (2, 1) and x.size < 100:
      np.testing.assert_allclose(x, y, rtol=1e-6)  # block scales
    else:
      assert np.mean(x != y) <= 1e-3, (x.shape, np.mean(x != y))
  for x, p0 in zip(jax.tree.leaves(b), jax.tree.leaves(params)):
    if x.size > 100:
      assert np.any(np.asarray(x) != np.asarray(p0))  # it did train
  assert sb[1].mu['layers']['w'].codes.dtype == jnp.int8
  assert sb[1].nu['layers']['w'].codes.dtype == jnp.uint8
  np.testing.assert_array_equal(sa[1].mu['odd'].codes, sb[1].mu['odd'].codes)  # XLA both ways


def test_kernel_rounds_bf16_stochastically():
  """With stochastic rounding off the kernel rounds to nearest, as XLA's update does; on, some
  weights differ from that (the updates are near bf16's spacing). Two steps: the first has LR 0."""
  _, run = _problem(jnp.bfloat16)
  nearest, _ = run(True, sr=False, steps=2)
  xla_nearest, _ = run(False, sr=False, steps=2)
  stochastic, _ = run(True, sr=True, steps=2)
  np.testing.assert_array_equal(np.asarray(nearest['embed']), np.asarray(xla_nearest['embed']))
  assert np.any(np.asarray(stochastic['embed']) != np.asarray(nearest['embed']))


def test_kernel_lowers_to_one_triton_call_for_cuda():
  """The kernel lowers for CUDA (no GPU needed): every op it uses has a Triton lowering, and a
  leaf is one Triton call."""
  shape = (4, 8, 512)
  s = lambda dtype, shp=shape: jax.ShapeDtypeStruct(shp, dtype)  # noqa: E731
  mu = quant.QuantizedArray(s(jnp.int8), s(jnp.float32, (4, 8, 2)))
  nu = quant.QuantizedArray(s(jnp.uint8), s(jnp.float32, (4, 8, 2)))

  def step(p, g, mu, nu):
    return adam_kernel.update_leaf(p, g, mu, nu, grad_scale=1.0, lr=1e-3, bc=(0.1, 0.01),
                                   seed=jnp.uint32(3), b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=0.1, stochastic_rounding=True)
  exported = jax.export.export(
      jax.jit(step), platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')],
  )(s(jnp.bfloat16), s(jnp.bfloat16), mu, nu)
  text = exported.mlir_module()
  assert text.count('__gpu$xla.gpu.triton') == 1
  assert 'adam8bit_update' in text


def test_applicable():
  p = jnp.zeros((4, 512), jnp.bfloat16)
  q8 = lambda signed: quant.zero_quantized((4, 512), signed=signed, block_size=256)  # noqa: E731
  assert adam_kernel.applicable(p, q8(True), q8(False), block_size=256)
  assert not adam_kernel.applicable(p, q8(True), q8(False), block_size=128)
  assert not adam_kernel.applicable(p, jnp.zeros((4, 512)), jnp.zeros((4, 512)), block_size=256)
  odd = jnp.zeros((4, 384), jnp.bfloat16)
  q = lambda signed: quant.zero_quantized((4, 384), signed=signed, block_size=256)  # noqa: E731
  assert not adam_kernel.applicable(odd, q(True), q(False), block_size=256)


class _Device:
  def __init__(self, platform):
    self.platform = platform


def _leaf(*platforms):
  return types.SimpleNamespace(
      sharding=types.SimpleNamespace(device_set={_Device(p) for p in platforms}))


def test_kernel_plan():
  """'auto' picks leaves on one GPU; several devices, a CPU or 'xla' keep XLA's update."""
  tree = {'one_gpu': _leaf('gpu'), 'two_gpus': _leaf('gpu', 'gpu'), 'cpu': _leaf('cpu')}
  assert update_lib.kernel_plan(tree, 'auto') == {'one_gpu': True, 'two_gpus': False,
                                                  'cpu': False}
  assert update_lib.kernel_plan(tree, 'xla') == {'one_gpu': False, 'two_gpus': False,
                                                 'cpu': False}
  assert update_lib.kernel_plan({'w': jnp.zeros((2, 256))}) == {'w': False}  # this CPU
  with pytest.raises(ValueError, match='optim.update_kernel'):
    update_lib.kernel_plan(tree, 'pallas')
