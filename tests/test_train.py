"""Training: mesh parity (8 fake CPU devices), LoRA invariants, gradient accumulation, and the CLI
end to end (loss falls, outputs, SIGKILL/SIGTERM resume bitwise, one-line errors on bad input).

The tiny config's real GSM8K sample batches drive every run. Multi-device runs go in a subprocess
with XLA_FLAGS set before JAX starts; the 1-device references run in this process meanwhile.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gemma_sft_jax import architecture
from gemma_sft_jax import checkpointing
from gemma_sft_jax import data as data_lib
from gemma_sft_jax import gsm8k
from gemma_sft_jax import lora
from gemma_sft_jax import model as model_lib
from gemma_sft_jax import sharding
from gemma_sft_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _tiny_config(method: str = 'full', **overrides):
  """configs/tiny.py's config (still locked, so a mistyped key fails) with dotted-key overrides."""
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(ROOT, 'configs',
                                                                             'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'method={method}')
  config.update_from_flattened_dict(overrides)
  return config


def _flat(tree) -> dict[str, np.ndarray]:
  paths = jax.tree.leaves(sharding.tree_paths(tree))
  return {p: np.asarray(x) for p, x in zip(paths, jax.tree.leaves(tree))}


def _num_shards(tree) -> dict[str, np.ndarray]:
  """Per leaf, how many distinct pieces its devices hold (1 = replicated)."""
  paths = jax.tree.leaves(sharding.tree_paths(tree))
  return {p: np.asarray(len({str(s.index) for s in x.addressable_shards}))
          for p, x in zip(paths, jax.tree.leaves(tree))}


def _nested(flat: dict[str, np.ndarray]) -> dict:
  """The inverse of `_flat`: {'a/b': x} -> {'a': {'b': x}}."""
  out = {}
  for path, x in flat.items():
    *parents, leaf = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def _bits(x: np.ndarray) -> np.ndarray:
  x = np.atleast_1d(np.asarray(x))
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def _assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)


def _setup(config, *, with_lora: bool, mesh) -> train_lib.Setup:
  """The config's Setup (tokenizer, LoRA spec, dtypes) with the SHARDABLE architecture."""
  setup = train_lib.model_setup(config, with_lora=with_lora, mesh=mesh)
  arch = SHARDABLE_2 if config.model.scan_layers else SHARDABLE
  return dataclasses.replace(setup, model=setup.model.clone(config=arch), config=arch)


def _train_steps(*, method: str, mesh: dict[str, int], state_dtype: str = 'float32',
                 grad_accum: int = 1, steps: int = STEPS, scan: bool = False
                 ) -> dict[str, np.ndarray]:
  """`steps` updates of train.build's jitted step on the tiny config's first real batches.

  Returns flat arrays: 'loss' per step, and 'init/', 'params/' (trainable before / after),
  'frozen/', 'frozen_after/' (the LoRA base before / after) and 'opt/' (optimizer state) leaves;
  'shards/' counts the distinct pieces of each parameter and 'opt_shards/' of each state leaf.
  """
  config = _tiny_config(method, **{
      'train.batch_size': BATCH, 'optim.state_dtype': state_dtype, 'optim.grad_accum': grad_accum,
      'mesh.data': mesh.get('data', 1), 'mesh.fsdp': mesh.get('fsdp', 1),
      'mesh.tensor': mesh.get('tensor', 1), 'model.scan_layers': scan})
  n = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
  device_mesh = sharding.make_mesh(**config.mesh, devices=jax.devices()[:n])
  setup = _setup(config, with_lora=method == 'lora', mesh=device_mesh)
  parts = train_lib.build(config, setup, device_mesh)
  d = config.data
  batches = data_lib.make_train_iterator(
      gsm8k.load_split(d.source, d.subset, d.train_split), tokenizer=setup.tokenizer,
      seq_len=config.train.seq_len, global_batch_size=BATCH, seed=config.train.seed,
      packing=d.packing, template=d.prompt_template, strip_calculator=d.strip_calculator)
  out = {f'init/{k}': v for k, v in _flat(parts.state['params']).items()}
  out.update({f'frozen/{k}': v for k, v in _flat(parts.frozen).items()})
  all_params = lora.join(parts.frozen, parts.state['params'])
  out.update({f'shards/{k}': v for k, v in _num_shards(all_params).items()})
  out.update({f'opt_shards/{k}': v for k, v in _num_shards(parts.state['opt_state']).items()})
  state, losses = parts.state, []
  for _ in range(steps):
    batch = data_lib.to_global_array(next(batches), sharding.batch_sharding(device_mesh))
    state, m = parts.step_fn(state, parts.frozen, batch)
    losses.append(float(m['loss']))
  out['loss'] = np.asarray(losses)
  out.update({f'params/{k}': v for k, v in _flat(state['params']).items()})
  out.update({f'frozen_after/{k}': v for k, v in _flat(parts.frozen).items()})
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
    'scanlora_f8': dict(method='lora', mesh=dict(fsdp=8), scan=True),
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
def env(tmp_path_factory) -> dict[str, str]:
  """Environment of the subprocesses: CPU, this checkout importable, and one JAX compilation
  cache, so reruns of the same command skip XLA compilation (the cached code is the same code)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2',
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH')])))
  return env


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
        env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8'), stdout=log,
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
    assert base_2d and all(shards[k] > 1 for k in base_2d), (name, shards)
    split_trainable = [k for k in _part(run, 'params') if shards[k] > 1]
    assert split_trainable, (name, shards)
    assert sum(v > 1 for v in opt_shards.values()) >= 2 * len(split_trainable), (name, opt_shards)
    # Same random init on every mesh (partitionable threefry), so any later gap is the step's.
    _assert_bitwise_equal(_part(run, 'init'), _part(ref, 'init'))
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
  config = _tiny_config('lora')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  lora_setup = _setup(config, with_lora=True, mesh=mesh)
  base_setup = _setup(config, with_lora=False, mesh=mesh)
  run = one_device_runs('lora', **_REFERENCES['lora'])  # Its params as train.build made them.
  adapters, base = _part(run, 'init'), _part(run, 'frozen')
  params = _nested({**adapters, **base})
  # Every projection of every layer is targeted by the default regex, and B starts at zero.
  assert len([k for k in adapters if k.endswith('/lora_b')]) == 7 * SHARDABLE.num_layers
  assert all(not v.any() for k, v in adapters.items() if k.endswith('/lora_b'))
  assert base.keys() == _flat(model_lib.param_shapes(base_setup.model)).keys()
  base = _nested(base)

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
  _assert_bitwise_equal(frozen_after, frozen)
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
  ref = one_device_runs('full', **_REFERENCES['full'])
  run = _train_steps(method='full', mesh={}, grad_accum=2)
  np.testing.assert_allclose(run['loss'], ref['loss'], rtol=1e-5, atol=0)
  params, ref_params = _part(run, 'params'), _part(ref, 'params')
  assert params.keys() == ref_params.keys()
  for k in params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=0, atol=5e-6, err_msg=k)


# ---- The CLI end to end. ----------------------------------------------------------------------

_STEPS_CLI = 20
_TRAIN_FLAGS = (f'--config.train.steps={_STEPS_CLI}', '--config.checkpoint.every_steps=2')
_EVAL_FLAGS = ('--config.eval.limit=2', '--config.eval.max_new_tokens=4')
# Interrupted runs: the same training, without evaluations (they do not touch training state).
_NO_EVAL_FLAGS = ('--config.eval.run_base=false', '--config.eval.run_sft=false')


def _main_command(workdir, *flags) -> list[str]:
  return [sys.executable, '-m', 'gemma_sft_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', *flags]


class _Run:
  """A `main` subprocess; its stdout/stderr go to files beside the workdir."""

  def __init__(self, env, workdir, *flags):
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self._out = open(self.workdir + '.stdout', 'w+')
    self._err = open(self.workdir + '.stderr', 'w+')
    self.proc = subprocess.Popen(_main_command(self.workdir, *flags), cwd=ROOT, env=env,
                                 stdout=self._out, stderr=self._err)
    self._result = None

  def wait(self, timeout=240) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) once the process has ended."""
    if self._result is None:
      rc = self.proc.wait(timeout=timeout)
      texts = []
      for f in (self._out, self._err):
        f.seek(0)
        texts.append(f.read())
        f.close()
      self._result = (rc, *texts)
    return self._result

  def succeed(self) -> str:
    """stderr of the finished run, which must have exited 0."""
    rc, _, err = self.wait()
    assert rc == 0, err[-4000:]
    return err

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.wait()


@pytest.fixture
def start(env):
  """start(workdir, *flags) -> _Run; runs still going when the test ends are killed."""
  runs = []

  def start_run(workdir, *flags):
    runs.append(_Run(env, workdir, *flags))
    return runs[-1]
  yield start_run
  for run in runs:
    run.stop()


def _finished_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  # Orbax writes '<step>.orbax-checkpoint-tmp-*' and renames it to '<step>' when complete.
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _poll(condition, proc, timeout=180):
  """Waits until condition() holds, failing if `proc` ends first."""
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      assert condition(), f'the run ended (status {proc.returncode}) before the condition held'
      return
    assert time.time() < deadline, 'timed out waiting'
    time.sleep(0.02)


def _final_params(workdir) -> dict[str, np.ndarray]:
  setup = train_lib.model_setup(_tiny_config('full'), with_lora=False)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          model_lib.param_shapes(setup.model))
  return _flat(checkpointing.load_params(os.path.join(workdir, 'final'), abstract, cast=False))


def _logged(workdir) -> bool:
  """Whether the run has logged its first step (the metrics file is opened before step 1)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return os.path.exists(path) and os.path.getsize(path) > 0


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {row['step']: row['loss'] for row in map(json.loads, f)}


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, env):
  """One uninterrupted CLI run, started when a test first asks for it, so tests can overlap it."""
  run = _Run(env, tmp_path_factory.mktemp('reference') / 'run', *_TRAIN_FLAGS, *_EVAL_FLAGS)
  yield run
  run.stop()


def test_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, start,
                                                                      reference_run):
  # Start once the reference has compiled everything (its first metrics line), so that this
  # run finds the compiled code in the shared cache instead of compiling it a second time.
  _poll(lambda: _logged(reference_run.workdir), reference_run.proc)
  workdir = tmp_path / 'run'
  killed = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS)
  _poll(lambda: any(s >= 2 for s in _finished_steps(workdir)), killed.proc)
  killed.proc.kill()  # SIGKILL: no handler runs; an async save may be left half-written.
  rc, _, _ = killed.wait()
  assert rc == -signal.SIGKILL
  steps = _finished_steps(workdir)
  assert 2 <= steps[-1] < _STEPS_CLI and not os.path.exists(workdir / 'final'), steps

  err = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS).succeed()
  assert re.search(r'resumed from .* at step (\d+)', err), err[-4000:]
  reference_run.succeed()
  _assert_bitwise_equal(_final_params(workdir), _final_params(reference_run.workdir))
  # The per-step losses the resumed run logged are the uninterrupted run's, exactly.
  losses, ref_losses = _losses(workdir), _losses(reference_run.workdir)
  assert max(losses) == _STEPS_CLI and all(losses[s] == ref_losses[s] for s in ref_losses)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, start, reference_run):
  workdir = tmp_path / 'run'
  run = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS)
  # The handler is installed around the training loop; the first metrics line is written in it.
  _poll(lambda: _logged(workdir), run.proc)
  run.proc.send_signal(signal.SIGTERM)
  rc, out, err = run.wait()
  assert rc == 0, err[-4000:]
  assert 'Received signal SIGTERM' in out
  stopped = int(re.search(r'preemption signal: saved step (\d+)', err).group(1))
  assert 1 <= stopped < _STEPS_CLI and stopped in _finished_steps(workdir)
  assert not os.path.exists(workdir / 'final')

  err = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS).succeed()
  assert f'at step {stopped}' in err
  reference_run.succeed()
  _assert_bitwise_equal(_final_params(workdir), _final_params(reference_run.workdir))


def test_end_to_end_loss_falls_and_outputs_are_written(reference_run):
  reference_run.succeed()
  workdir = reference_run.workdir
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    assert {'step', 'loss', 'learning_rate'} <= row.keys(), row
    assert np.isfinite(row['loss']) and row['learning_rate'] >= 0
  steps = [row['step'] for row in rows]
  assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == _STEPS_CLI
  assert rows[-1]['loss'] < 0.6 * rows[0]['loss'], (rows[0]['loss'], rows[-1]['loss'])

  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for label in ('base', 'sft'):
    for key in ('strict_accuracy', 'flexible_accuracy'):
      assert 0.0 <= results[label][key] <= 1.0, (label, key)
  assert os.path.isdir(os.path.join(workdir, 'final'))
  with open(os.path.join(workdir, 'final.json')) as f:
    final = json.load(f)
  assert final['tuning_method'] == 'full' and final['step'] == _STEPS_CLI
  assert _final_params(workdir)  # final/ holds the full parameter tree.


# ---- Bad input: one line on stderr, non-zero exit. ----------------------------------------------

def test_bad_input_exits_nonzero_with_one_line_error(tmp_path, start):
  no_train = tmp_path / 'gsm8k_without_train'
  no_train.mkdir()
  sample = os.path.join(ROOT, 'gemma_sft_jax', 'assets', 'gsm8k_sample', 'test.jsonl')
  (no_train / 'test.jsonl').write_text(open(sample).read())
  cases = {  # flags -> what the error line must name
      ('--config.tuning_method=bogus',): 'tuning_method',
      (f'--config.data.source={no_train}',): 'train.jsonl',
      ('--config.mesh.data=3',): 'mesh',
  }
  runs = {flags: start(tmp_path / f'run{i}', '--config.eval.run_base=false', *flags)
          for i, flags in enumerate(cases)}
  for flags, run in runs.items():
    rc, _, err = run.wait(timeout=120)
    last = err.strip().splitlines()[-1]
    assert rc > 0, (flags, rc, err[-2000:])
    assert last.startswith('error:') and cases[flags] in last, (flags, last)
    assert 'Traceback' not in err, (flags, err[-2000:])


def test_rerun_after_the_last_step_reports_the_logged_final_loss(tmp_path):
  """A rerun that finds training finished runs no step; its final loss comes from metrics.jsonl
  (rows past the restored step, e.g. from a killed run, and a cut-off line are ignored)."""
  assert math.isnan(train_lib._logged_loss(str(tmp_path), upto=30))  # pylint: disable=protected-access
  rows = [{'step': 10, 'loss': 1.5}, {'step': 20, 'loss': 0.75}, {'step': 30, 'loss': 0.5}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 40, "lo')
  assert train_lib._logged_loss(str(tmp_path), upto=20) == 0.75  # pylint: disable=protected-access
  assert train_lib._logged_loss(str(tmp_path), upto=30) == 0.5  # pylint: disable=protected-access
