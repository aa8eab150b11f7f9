"""The 8-bit AdamW update as one Pallas kernel (gemma_sft_jax.training.adam_kernel) against the
XLA update it replaces on GPUs, run here in the Pallas interpreter; and its lowering to Triton."""

import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.training import adam_kernel
from gemma_sft_jax.training import optimizer as opt
from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import update as update_lib
from tests.conftest import run_on_cpu_devices


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
        kernels=update_lib.kernel_plan(params, 'auto' if kernel else 'xla', platforms=('cpu',)),
        interpret_kernels=True)
    fn = lambda p, g, s, i: update(p, g, s, divisor=64.0, seed=i.astype(jnp.uint32))  # noqa: E731
    step = jax.jit(fn)
    p, s = params, tx.init(params)
    # The kernel path is taken exactly when asked for: one kernel per eligible leaf (w, embed).
    kernels = str(jax.make_jaxpr(fn)(p, grads(0), s, jnp.int32(0))).count('pallas_call')
    assert kernels == (2 if kernel else 0), kernels
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
  """With stochastic rounding off the kernel rounds to nearest, as XLA's update does; on, about
  a quarter of the weights differ from that (the updates are near bf16's spacing). Two steps:
  the first has LR 0."""
  _, run = _problem(jnp.bfloat16)
  nearest, _ = run(True, sr=False, steps=2)
  xla_nearest, _ = run(False, sr=False, steps=2)
  stochastic, _ = run(True, sr=True, steps=2)
  nearest, xla_nearest, stochastic = (np.asarray(x['embed'])
                                      for x in (nearest, xla_nearest, stochastic))
  np.testing.assert_array_equal(nearest, xla_nearest)
  assert np.mean(stochastic != nearest) > 0.1


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
  assert adam_kernel.applicable(p.shape, q8(True), q8(False), block_size=256)
  assert not adam_kernel.applicable(p.shape, q8(True), q8(False), block_size=128)
  assert not adam_kernel.applicable(p.shape, jnp.zeros((4, 512)), jnp.zeros((4, 512)),
                                  block_size=256)
  odd = jnp.zeros((4, 384), jnp.bfloat16)
  q = lambda signed: quant.zero_quantized((4, 384), signed=signed, block_size=256)  # noqa: E731
  assert not adam_kernel.applicable(odd.shape, q(True), q(False), block_size=256)


class _Device:
  def __init__(self, platform):
    self.platform = platform


class _Sharding:
  def __init__(self, *platforms):
    self.device_set = {_Device(p) for p in platforms}


def test_kernel_plan():
  """'auto' gives the kernel each leaf on GPUs (its sharding: whole on one device, per shard on a
  mesh, which needs a NamedSharding); CPUs (unless named) and 'xla' keep XLA's update."""
  one, cpu = _Sharding('gpu'), _Sharding('cpu')
  tree = {'one_gpu': types.SimpleNamespace(sharding=one),
          'two_gpus': types.SimpleNamespace(sharding=_Sharding('gpu', 'gpu')),
          'cpu': types.SimpleNamespace(sharding=cpu)}
  assert update_lib.kernel_plan(tree, 'auto') == {'one_gpu': one, 'two_gpus': None, 'cpu': None}
  assert update_lib.kernel_plan(tree, 'auto', platforms=('cpu', 'gpu'))['cpu'] is cpu
  assert update_lib.kernel_plan(tree, 'xla') == {'one_gpu': None, 'two_gpus': None, 'cpu': None}
  assert update_lib.kernel_plan({'w': jnp.zeros((2, 256))}) == {'w': None}  # this CPU
  with pytest.raises(ValueError, match='optim.update_kernel'):
    update_lib.kernel_plan(tree, 'pallas')


def test_row_starts_are_the_whole_arrays_indices():
  """The rounding bits' element indices, per row of 256 of a shard: those of the whole array."""
  full, local = (4, 6, 512), (2, 3, 512)  # a shard: axes 0 and 1 halved
  whole = np.arange(np.prod(full)).reshape(full)
  for i0, i1 in ((0, 0), (1, 1), (0, 1)):
    shard = whole[i0 * 2:(i0 + 1) * 2, i1 * 3:(i1 + 1) * 3]
    offset = int(shard.flat[0])
    rows = jnp.arange(shard.size // 256, dtype=jnp.uint32)
    got = np.asarray(adam_kernel._row_starts(rows, local, full)) + offset  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, shard.reshape(-1, 256)[:, 0])


_MESH_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gemma_sft_jax.training import optimizer as opt
    from gemma_sft_jax.training import update as update_lib

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('fsdp', 'tensor'))
    specs = {'embed': ((128, 512), P('tensor', 'fsdp')),          # shard [32, 256]: kernel
             'q': ((16, 8, 256), P('fsdp', 'tensor', None)),       # shard [8, 2, 256]: kernel
             'down': ((64, 768), P(None, 'tensor')),               # shard [64, 192]: XLA
             'norm': ((64,), P())}                                 # fp32 moments: XLA
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in specs.items()}
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(specs)))
    host = {k: (jax.random.normal(next(keys), shape) * 0.05).astype(jnp.bfloat16)
            for k, (shape, _) in specs.items()}
    grads = [{k: (jax.random.normal(jax.random.fold_in(jax.random.key(i), j), shape) * 30
                  ).astype(jnp.bfloat16)
              for j, (k, (shape, _)) in enumerate(specs.items())} for i in range(3)]
    mask = opt.default_decay_mask(host)
    tx, schedule = opt.make_optimizer(lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_steps=10,
                                      weight_decay=0.1, clip_norm=1.0, state_dtype='int8',
                                      decay_mask=mask)
    kw = dict(schedule=schedule, weight_decay=0.1, clip_norm=1.0, decay_mask=mask,
              chunks=jax.tree.map(lambda _: 1, host), interpret_kernels=True)
    params = jax.device_put(host, shardings)
    plan = update_lib.kernel_plan(params, platforms=('cpu',))
    assert all(isinstance(plan[k], NamedSharding) for k in specs), plan
    state_sh = opt.state_shardings(tx, params, shardings)
    call = lambda f: lambda p, s, g: f(p, g, s, divisor=3.0, seed=jnp.uint32(5))
    sharded = jax.jit(call(update_lib.make_update(kernels=plan, **kw)),
                      in_shardings=(shardings, state_sh, shardings),
                      out_shardings=(shardings, state_sh, None))
    text = sharded.lower(params, jax.jit(tx.init, out_shardings=state_sh)(params),
                         grads[0]).as_text()
    assert text.count('shard_map') >= 2 or text.count('sdy.manual_computation') >= 2, 'no kernel'
    dev0 = jax.devices()[0]
    one = jax.jit(call(update_lib.make_update(**kw)))  # XLA's update on one device
    p8, s8 = params, jax.jit(tx.init, out_shardings=state_sh)(params)
    p1 = jax.device_put(host, dev0)
    s1 = jax.device_put(jax.jit(tx.init)(p1), dev0)
    for g in grads:
      p8, s8, n8 = sharded(p8, s8, g)
      p1, s1, n1 = one(p1, s1, jax.device_put(g, dev0))
    np.testing.assert_allclose(float(n8), float(n1), rtol=1e-6)
    for x, y in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1))):
      x, y = np.asarray(x), np.asarray(y)
      if x.dtype == np.float32:
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)
      else:  # bf16 weights (stochastically rounded), int8 / uint8 codes
        assert np.mean(x != y) <= 1e-3, (x.shape, np.mean(x != y))
    print('MESH_KERNEL_OK')
''')


def test_kernel_on_an_8_device_mesh_equals_one_device():
  """Per device shard (fsdp x tensor on 8 CPU devices, interpreted), the kernel's weights and
  codes equal XLA's update on one device: bf16 weights stochastically rounded with the bits of
  each element's index in the whole array, whichever shard holds it."""
  proc = run_on_cpu_devices(_MESH_SCRIPT, 8)
  assert proc.returncode == 0 and 'MESH_KERNEL_OK' in proc.stdout, proc.stdout + proc.stderr[-3000:]
