"""Checkpoint round trips, retention, resume, other meshes, SIGTERM, tree mismatches."""

import os
import signal
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.training import checkpointing
from tests.conftest import run_on_cpu_devices


class _Moments(NamedTuple):  # Like an optax state: NamedTuples must survive the round trip.
  codes: jax.Array
  scales: jax.Array


def _state(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
      'params': {'w': jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
                 'b': jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)},
      'opt': (_Moments(codes=jnp.asarray(rng.integers(-128, 128, (7, 5)), jnp.int8),
                       scales=jnp.asarray(rng.random((7, 1)), jnp.float32)),
              {'nu': jnp.asarray(rng.integers(0, 256, (7, 5)), jnp.uint8)}),
      'step': jnp.asarray(seed, jnp.int32),
      'rng': jax.random.key_data(jax.random.key(seed)),
  }


def _bits(x) -> np.ndarray:
  x = np.atleast_1d(np.asarray(x))
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(_bits(x), _bits(y))


def test_round_trip_is_bitwise_and_keeps_extra(tmp_path):
  state = _state(3)
  extra = {'data': {'epoch': 1, 'position': 17}, 'config': {'lr': 1e-5, 'name': 'tiny'}}
  with checkpointing.Checkpointer(str(tmp_path), every_steps=10, keep=2) as ckpt:
    assert ckpt.save(5, state=state, extra=extra, force=True)
    restored, restored_extra = ckpt.restore(abstract_state=checkpointing.abstract_tree(state))
  _assert_bitwise_equal(restored, state)
  assert isinstance(restored['opt'][0], _Moments)
  assert restored_extra == extra
  assert os.path.isdir(tmp_path / 'checkpoints' / '5')


def test_interval_retention_latest_and_resume(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [s for s in range(10) if ckpt.save(s, state=_state(s), extra={'step': s})]
    ckpt.wait_until_finished()
    assert saved == [0, 2, 4, 6, 8]
    assert ckpt.all_steps() == [6, 8] and ckpt.latest_step() == 8
    assert ckpt.save(9, state=_state(9), extra={'step': 9}, force=True)
    assert not ckpt.save(9, state=_state(9), extra={'step': 9}, force=True)  # Already there.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [8, 9]

  # The same command run again: a new Checkpointer on the same workdir resumes from the latest.
  with checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=2) as ckpt:
    assert ckpt.latest_step() == 9
    abstract = checkpointing.abstract_tree(_state())
    state, extra = checkpointing.restore_or_none(ckpt, abstract_state=abstract)
    _assert_bitwise_equal(state, _state(9))
    assert extra == {'step': 9}
    older, older_extra = ckpt.restore(8, abstract_state=abstract)
    _assert_bitwise_equal(older, _state(8))
    assert older_extra == {'step': 8}
    with pytest.raises(FileNotFoundError, match='no step 6'):
      ckpt.restore(6, abstract_state=abstract)

  with checkpointing.Checkpointer(str(tmp_path / 'fresh'), every_steps=2, keep=2) as ckpt:
    assert checkpointing.restore_or_none(ckpt, abstract_state=abstract) is None


def test_preemption_saves_at_the_signalled_step(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.Checkpointer(str(tmp_path), every_steps=100, keep=1) as ckpt:
    with checkpointing.PreemptionGuard() as guard:
      assert signal.getsignal(signal.SIGTERM) is not previous
      stopped_at = None
      for step in range(1, 10):
        assert guard.should_stop(step) == (step > 3)
        if guard.should_stop(step):
          ckpt.save(step, state=_state(step), extra={}, force=True)
          stopped_at = step
          break
        if step == 3:
          os.kill(os.getpid(), signal.SIGTERM)  # Would kill pytest if the handler were missing.
      assert guard.stop_requested
    ckpt.wait_until_finished()
    assert stopped_at == 4 and ckpt.latest_step() == 4
  assert signal.getsignal(signal.SIGTERM) is previous


def test_guard_without_signal_does_not_stop():
  with checkpointing.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    guard.request_stop()
    assert guard.should_stop(2)


@pytest.mark.parametrize('change, message', [
    (lambda s: s['params'].update(w=jax.ShapeDtypeStruct((7, 4), jnp.float32)),
     r"key 'params/w' has shape \(7, 5\) in the checkpoint but \(7, 4\) in the target"),
    (lambda s: s['params'].pop('b'), "key 'params/b' is in the checkpoint but not in the target"),
    (lambda s: s['params'].update(lora_a=jax.ShapeDtypeStruct((7, 2), jnp.float32)),
     "key 'params/lora_a' is in the target tree but not in the checkpoint"),
    (lambda s: s['opt'][1].update(nu=jax.ShapeDtypeStruct((7, 5), jnp.float32)),
     "key 'opt/1/nu' has dtype uint8 in the checkpoint but float32"),
])
def test_mismatched_tree_is_a_one_line_error(tmp_path, change, message):
  with checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1) as ckpt:
    ckpt.save(1, state=_state(), extra={})
    abstract = checkpointing.abstract_tree(_state())
    change(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: x if x.sharding is not None else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    with pytest.raises(ValueError, match=message) as error:
      ckpt.restore(abstract_state=abstract)
  assert '\n' not in str(error.value) and str(tmp_path) in str(error.value)


def test_target_without_sharding_is_an_error(tmp_path):
  with checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1) as ckpt:
    ckpt.save(1, state=_state(), extra={})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
    with pytest.raises(ValueError, match="target key 'opt/0/codes' has no sharding"):
      ckpt.restore(abstract_state=abstract)


def test_save_and_load_params(tmp_path):
  params = _state(1)['params']
  path = str(tmp_path / 'adapters')
  checkpointing.save_params(path, params)
  checkpointing.save_params(path, params)  # Overwrites (e.g. a resumed run exporting again).
  loaded = checkpointing.load_params(path, checkpointing.abstract_tree(params))
  _assert_bitwise_equal(loaded, params)

  as_bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
                         params)
  loaded = checkpointing.load_params(path, as_bf16)
  assert loaded['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(loaded['w']),
                                np.asarray(params['w'].astype(jnp.bfloat16)))
  with pytest.raises(ValueError, match="has dtype float32 in the checkpoint but bfloat16"):
    checkpointing.load_params(path, as_bf16, cast=False)
  with pytest.raises(ValueError, match="key 'w' is in the checkpoint but not in the target"):
    checkpointing.load_params(path, {'b': checkpointing.abstract_tree(params)['b']})
  with pytest.raises(FileNotFoundError, match='no saved parameters'):
    checkpointing.load_params(str(tmp_path / 'missing'), checkpointing.abstract_tree(params))


_OTHER_MESH_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from gemma_sft_jax.model.sharding import make_mesh
from gemma_sft_jax.training import checkpointing

assert jax.device_count() == 8, jax.devices()
workdir = sys.argv[1]
values = {'w': np.arange(16 * 6, dtype=np.float32).reshape(16, 6),
          'codes': (np.arange(8 * 4) % 251 - 125).astype(np.int8).reshape(8, 4),
          'scale': np.float32([0.5, 2.0])}
specs_saved = {'w': P('fsdp', 'data'), 'codes': P(('data', 'fsdp')), 'scale': P()}
mesh_saved = make_mesh(data=2, fsdp=4, tensor=1)
state = {k: jax.device_put(v, NamedSharding(mesh_saved, specs_saved[k])) for k, v in values.items()}
with checkpointing.Checkpointer(workdir, every_steps=1, keep=1) as ckpt:
  ckpt.save(7, state=state, extra={'mesh': 'data=2,fsdp=4'})

def check(shardings):
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in values.items()}
  with checkpointing.Checkpointer(workdir, every_steps=1, keep=1) as ckpt:
    restored, extra = ckpt.restore(abstract_state=abstract)
  assert extra == {'mesh': 'data=2,fsdp=4'}, extra
  for k, v in values.items():
    assert restored[k].sharding == shardings[k], (k, restored[k].sharding)
    np.testing.assert_array_equal(np.asarray(restored[k]), v)

mesh8 = make_mesh(data=1, fsdp=8, tensor=1)
check({'w': NamedSharding(mesh8, P('fsdp')), 'codes': NamedSharding(mesh8, P('fsdp')),
       'scale': NamedSharding(mesh8, P())})
one = SingleDeviceSharding(jax.devices()[3])
check({k: one for k in values})
print('restored onto fsdp=8 and one device')
"""


def test_restore_onto_a_different_mesh(tmp_path):
  result = run_on_cpu_devices(textwrap.dedent(_OTHER_MESH_SCRIPT), 8, str(tmp_path),
                              timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'restored onto fsdp=8 and one device' in result.stdout
