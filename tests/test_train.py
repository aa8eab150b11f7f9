"""Training: mesh parity (8 fake CPU devices), LoRA invariants and gradient accumulation (the CLI
end to end is in test_train_cli.py).

The tiny config's real GSM8K sample batches drive every run. Multi-device runs go in a subprocess
with XLA_FLAGS set before JAX starts; the 1-device references run in this process meanwhile.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemma_sft_jax import pytree
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.training import train as train_lib
from gemma_sft_jax.weights import models
from tests.conftest import assert_bitwise_equal, flat, ROOT, tiny_config, xla_flags

STEPS = 3
BATCH = 8
# The tiny variant's prime sizes divide no mesh axis, so its params would stay replicated. This
# one is shardable by every rule (V, N, K, F over tensor=2; D over fsdp=8); one layer keeps the
# many compilations of these tests cheap (XLA's CPU compile of the random init dominates).
SHARDABLE = dataclasses.replace(
    architecture.VARIANTS['tiny_gemma3'], vocab_size=264, embed_dim=64, hidden_dim=96, num_layers=1,
    num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16.0,
    layer_types=(architecture.GLOBAL,))
# For scanned layers (model.scan_layers): two layers, sliding (window 7 < seq_len) then global.
SHARDABLE_2 = dataclasses.replace(SHARDABLE, num_layers=2,
                                  layer_types=(architecture.SLIDING, architecture.GLOBAL))


def _num_shards(tree) -> dict[str, np.ndarray]:
  """Per leaf, how many distinct pieces its devices hold (1 = replicated)."""
  return {p: np.asarray(len({str(s.index) for s in x.addressable_shards}))
          for p, x in pytree.flatten(tree).items()}


def _setup(config, *, with_lora: bool, mesh) -> models.Setup:
  """The config's Setup (tokenizer, LoRA spec, dtypes) with the SHARDABLE architecture."""
  setup = models.model_setup(config, with_lora=with_lora, mesh=mesh)
  arch = SHARDABLE_2 if config.model.scan_layers else SHARDABLE
  return dataclasses.replace(setup, model=setup.model.clone(config=arch), config=arch)


def _train_steps(*, method: str, mesh: dict[str, int], state_dtype: str = 'float32',
                 grad_accum: int = 1, steps: int = STEPS, scan: bool = False,
                 base_sharding: str = 'fsdp', save_loss_logits: bool = False,
                 remat: str = 'none', remat_after_cotangent: bool = False
                 ) -> dict[str, np.ndarray]:
  """`steps` updates of train.build's jitted step on the tiny config's first real batches.

  Returns flat arrays: 'loss' per step, and 'init/', 'params/' (trainable before / after),
  'frozen/', 'frozen_after/' (the LoRA base before / after) and 'opt/' (optimizer state) leaves;
  'shards/' counts the distinct pieces of each parameter and 'opt_shards/' of each state leaf.
  """
  config = tiny_config(f'method={method}', **{
      'train.batch_size': BATCH, 'optim.state_dtype': state_dtype, 'optim.grad_accum': grad_accum,
      'mesh.data': mesh.get('data', 1), 'mesh.fsdp': mesh.get('fsdp', 1),
      'mesh.tensor': mesh.get('tensor', 1), 'model.scan_layers': scan,
      'lora.base_sharding': base_sharding, 'model.save_loss_logits': save_loss_logits,
      'model.remat': remat, 'model.remat_after_cotangent': remat_after_cotangent})
  n = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
  device_mesh = sharding.make_mesh(**config.mesh, devices=jax.devices()[:n])
  setup = _setup(config, with_lora=method == 'lora', mesh=device_mesh)
  parts = train_lib.build(config, setup, device_mesh)
  batches = train_lib.train_batches(config, setup.tokenizer)
  out = {f'init/{k}': v for k, v in flat(parts.state['params']).items()}
  out.update({f'frozen/{k}': v for k, v in flat(parts.frozen).items()})
  all_params = lora.join(parts.frozen, parts.state['params'])
  out.update({f'shards/{k}': v for k, v in _num_shards(all_params).items()})
  out.update({f'opt_shards/{k}': v for k, v in _num_shards(parts.state['opt_state']).items()})
  state, losses = parts.state, []
  for _ in range(steps):
    batch = data_lib.to_global_array(next(batches), sharding.batch_sharding(device_mesh))
    state, m = parts.step_fn(state, parts.frozen, batch)
    losses.append(float(m['loss']))
  out['loss'] = np.asarray(losses)
  out.update({f'params/{k}': v for k, v in flat(state['params']).items()})
  out.update({f'frozen_after/{k}': v for k, v in flat(parts.frozen).items()})
  out.update({f'opt/{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(state['opt_state']))})
  return out


def _part(run: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) + 1:]: v for k, v in run.items() if k.startswith(prefix + '/')}


# ---- Mesh parity: (data=2, fsdp=2, tensor=2) and (fsdp=8) against one device. -----------------

_MESH_RUNS = {
    'full_d2f2t2': dict(method='full', mesh=dict(data=2, fsdp=2, tensor=2)),
    'full_f8': dict(method='full', mesh=dict(fsdp=8)),
    'lora_d2f2t2': dict(method='lora', mesh=dict(data=2, fsdp=2, tensor=2)),
    'lora_f8': dict(method='lora', mesh=dict(fsdp=8)),
    'int8_d2f2t2': dict(method='full', mesh=dict(data=2, fsdp=2, tensor=2), state_dtype='int8'),
    # Scanned layers: stacked [L, ...] params, the leading axis unsharded, the rest by the rules.
    'scanfull_d2f2t2': dict(method='full', mesh=dict(data=2, fsdp=2, tensor=2), scan=True),
    # The frozen (stacked) base replicated along fsdp (lora.base_sharding), the adapters split.
    'scanlora_f8_replicated': dict(method='lora', mesh=dict(fsdp=8), scan=True,
                                   base_sharding='replicated'),
    # The loss's logits kept for the backward pass: on a mesh of several devices in the loop's
    # buffer (one device unrolls the chunks: test_grad_accum_matches_one_big_batch).
    'full_f8_saved_logits': dict(method='full', mesh=dict(fsdp=8), save_loss_logits=True),
    # Each unrolled layer's backward pass held in its place (the 9B full-SFT setting).
    'full_f8_after_cotangent': dict(method='full', mesh=dict(fsdp=8), remat='save:q_proj,gate_proj',
                                    remat_after_cotangent=True),
}

_MESH_SCRIPT = """
import json, os, sys
import jax
jax.config.update('jax_default_matmul_precision', 'highest')  # As conftest does in-process.
import numpy as np
from tests import test_train
assert jax.device_count() == 8, jax.devices()
out, runs = sys.argv[1], json.loads(sys.argv[2])
for name, kwargs in runs.items():
  np.savez(os.path.join(out, name + '.npz'), **test_train._train_steps(**kwargs))
  print('done', name, flush=True)
"""


@pytest.fixture(scope='module')
def one_device_runs():
  """1-device runs by name, each computed once (the mesh, LoRA and grad-accum tests share them)."""
  cache = {}

  def get(name, **kwargs):
    if name not in cache:
      cache[name] = _train_steps(mesh={}, **kwargs)
    return cache[name]
  return get


_REFERENCES = {'full': dict(method='full'), 'lora': dict(method='lora'),
               'int8': dict(method='full', state_dtype='int8'),
               'scanfull': dict(method='full', scan=True), 'scanlora': dict(method='lora', scan=True)}


def test_meshes_match_one_device(tmp_path, env, one_device_runs):
  # The 8-device runs go in a subprocess; this process computes the references meanwhile.
  with open(tmp_path / 'log', 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, '-c', _MESH_SCRIPT, str(tmp_path), json.dumps(_MESH_RUNS)], cwd=ROOT,
        env=dict(env, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8')), stdout=log,
        stderr=subprocess.STDOUT)
    refs = {name: one_device_runs(name, **kwargs) for name, kwargs in _REFERENCES.items()}
    assert proc.wait(timeout=400) == 0, (tmp_path / 'log').read_text()[-4000:]

  for name in _MESH_RUNS:
    ref = refs[name.split('_')[0]]
    with np.load(tmp_path / f'{name}.npz') as f:
      run = dict(f)
    # Every base matrix (embedding, kernels) is split over the mesh, and so are the optimizer
    # moments of every split trainable leaf; LoRA adapters are split where their rule allows.
    shards, opt_shards = _part(run, 'shards'), _part(run, 'opt_shards')
    base_2d = [k for k, v in _part(ref, 'frozen' if 'lora' in name else 'init').items()
               if v.ndim >= 2 and 'norm' not in k]  # Stacked norm scales are [L, D], replicated.
    if name.endswith('_replicated'):  # fsdp is the only mesh axis here
      assert base_2d and all(shards[k] == 1 for k in base_2d), (name, shards)
    else:
      assert base_2d and all(shards[k] > 1 for k in base_2d), (name, shards)
    split_trainable = [k for k in _part(run, 'params') if shards[k] > 1]
    assert split_trainable, (name, shards)
    assert sum(v > 1 for v in opt_shards.values()) >= 2 * len(split_trainable), (name, opt_shards)
    # Same random init on every mesh (partitionable threefry), so any later gap is the step's.
    assert_bitwise_equal(_part(run, 'init'), _part(ref, 'init'))
    assert np.all(np.isfinite(run['loss'])) and run['loss'].shape == (STEPS,)
    params, ref_params = _part(run, 'params'), _part(ref, 'params')
    assert params.keys() == ref_params.keys()
    # fp32 gaps measured ~1e-7 (loss) and <4e-7 (params); one Adam step moves a weight by ~lr
    # (>= 6e-4 here), so a sharding mistake shows far above these tolerances. 8-bit moments can
    # round to a neighbouring code after reduction-order noise (measured 2e-5), hence a looser
    # tolerance for int8 params.
    np.testing.assert_allclose(run['loss'], ref['loss'], rtol=1e-5, atol=0, err_msg=name)
    atol = 2e-4 if name.startswith('int8') else 5e-6
    for k in params:
      np.testing.assert_allclose(params[k], ref_params[k], rtol=0, atol=atol,
                                 err_msg=f'{name}: {k}')
    # Not vacuous: training moved every trainable leaf by far more than atol.
    moved = min(np.abs(params[k] - run[f'init/{k}']).max() for k in params)
    assert moved > 5 * atol, (name, moved)


# ---- LoRA. ------------------------------------------------------------------------------------

def test_lora_zero_init_leaves_logits_unchanged(one_device_runs):
  config = tiny_config('method=lora')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  lora_setup = _setup(config, with_lora=True, mesh=mesh)
  base_setup = _setup(config, with_lora=False, mesh=mesh)
  run = one_device_runs('lora', **_REFERENCES['lora'])  # Its params as train.build made them.
  adapters, base = _part(run, 'init'), _part(run, 'frozen')
  params = pytree.unflatten({**adapters, **base})
  # Every projection of every layer is targeted by the default regex, and B starts at zero.
  assert len([k for k in adapters if k.endswith('/lora_b')]) == 7 * SHARDABLE.num_layers
  assert all(not v.any() for k, v in adapters.items() if k.endswith('/lora_b'))
  assert base.keys() == flat(model_lib.param_shapes(base_setup.model)).keys()
  base = pytree.unflatten(base)

  prompt = gsm8k.load_split(config.data.source, config.data.subset, 'test')[0].question
  tokens = jax.numpy.asarray([data_lib.tokenize_prompt(prompt, tokenizer=lora_setup.tokenizer)])

  def logits_fn(model):
    return jax.jit(lambda p: model.apply({'params': p}, tokens)[0])
  base_logits, lora_logits = logits_fn(base_setup.model), logits_fn(lora_setup.model)
  without, with_zero = base_logits(base), lora_logits(params)
  np.testing.assert_array_equal(np.asarray(with_zero), np.asarray(without))

  # Non-zero adapters do change the output (they are wired in), and merging them into the
  # kernels gives the same logits from the plain model.
  rng = np.random.default_rng(0)
  perturbed = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
      if p[-1].key == 'lora_b' else x, params)
  with_b = lora_logits(perturbed)
  assert np.abs(np.asarray(with_b) - np.asarray(without)).max() > 1e-2
  merged = lora.merge_weights(perturbed, lora_setup.model.lora)
  from_merged = base_logits(merged)
  np.testing.assert_allclose(np.asarray(from_merged), np.asarray(with_b), atol=2e-5, rtol=0)


def test_lora_trains_only_adapters_and_keeps_no_base_sized_state(one_device_runs):
  run = one_device_runs('lora', **_REFERENCES['lora'])
  init, params = _part(run, 'init'), _part(run, 'params')
  frozen, frozen_after = _part(run, 'frozen'), _part(run, 'frozen_after')
  assert params and all(lora.is_adapter_path(k) for k in params)
  assert frozen and not any(lora.is_adapter_path(k) for k in frozen)
  # The frozen base held by the run is bitwise what was loaded; every adapter leaf moved
  # (B from step 2, A from step 3, once B is non-zero).
  assert_bitwise_equal(frozen_after, frozen)
  for k in params:
    assert np.abs(params[k] - init[k]).max() > 1e-5, k

  opt = _part(run, 'opt')
  biggest_adapter = max(v.size for v in params.values())
  assert max(v.size for v in opt.values()) <= biggest_adapter
  assert max(v.size for v in frozen.values()) > 10 * biggest_adapter  # The criterion has teeth.
  n_adapter = sum(v.size for v in params.values())
  assert sum(v.size for v in opt.values()) <= 2 * n_adapter + 8  # m, v and scalar counts.


# ---- Gradient accumulation. ---------------------------------------------------------------------

def test_grad_accum_matches_one_big_batch(one_device_runs):
  """Two microbatches, with the loss's logits kept for the backward pass (which must not change
  the result either), against one batch that recomputes them."""
  ref = one_device_runs('full', **_REFERENCES['full'])
  run = _train_steps(method='full', mesh={}, grad_accum=2, save_loss_logits=True)
  np.testing.assert_allclose(run['loss'], ref['loss'], rtol=1e-5, atol=0)
  params, ref_params = _part(run, 'params'), _part(ref, 'params')
  assert params.keys() == ref_params.keys()
  for k in params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=0, atol=5e-6, err_msg=k)


def test_base_sharding_modes(monkeypatch):
  """lora.base_sharding: 'fsdp' / 'replicated' as asked; 'auto' replicates a base of at most a
  quarter of the device's memory, and shards where the device reports none (as CPUs)."""
  base = {'w': jax.ShapeDtypeStruct((1024, 1024), jax.numpy.bfloat16)}  # 2 MiB
  mesh = jax.sharding.AbstractMesh((1, 2, 1), sharding.AXES)
  assert not sharding.base_replicated('fsdp', base, mesh)
  assert sharding.base_replicated('replicated', base, mesh)
  assert not sharding.base_replicated('auto', base, mesh)  # this CPU reports no memory

  class Device:
    def __init__(self, limit):
      self.limit = limit

    def memory_stats(self):
      return {'bytes_limit': self.limit}
  for limit, replicated in ((8 << 20, True), ((8 << 20) - 1, False)):
    monkeypatch.setattr(sharding.jax, 'local_devices', lambda limit=limit: [Device(limit)])
    assert sharding.base_replicated('auto', base, mesh) is replicated, limit
  with pytest.raises(ValueError, match='lora.base_sharding'):
    sharding.base_replicated('everywhere', base, mesh)
  # Replicated along fsdp only: a tensor split stays.
  device_mesh = sharding.make_mesh(devices=jax.devices()[:1])
  spec = jax.sharding.PartitionSpec
  for before, after in ((spec(('fsdp', 'tensor'), None), spec('tensor', None)),
                        (spec('tensor', 'fsdp'), spec('tensor', None))):
    s = jax.sharding.NamedSharding(device_mesh, before)
    assert sharding.without_axis(s, 'fsdp').spec == after, before
