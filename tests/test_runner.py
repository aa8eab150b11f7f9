"""runner.setup_jax: the persistent compilation cache is on by default, and can be moved or turned
off; the decode CLI says what it is doing at each start-up phase; the entry points import in one
process, and the benchmark CLI writes its line."""

import json
import logging as logging_std
import os
import subprocess
import sys

from gemma_sft_jax import runner
from tests.conftest import ROOT, cli_env


def test_compilation_cache_dir_choices():
  home = os.path.expanduser('~')
  assert runner.compilation_cache_dir({}) == os.path.join(home, '.cache', 'gemma_sft_jax', 'jax')
  assert runner.compilation_cache_dir({'XDG_CACHE_HOME': '/x'}) == '/x/gemma_sft_jax/jax'
  assert runner.compilation_cache_dir({'GEMMA_SFT_JAX_COMPILATION_CACHE': '/c'}) == '/c'
  for off in ('0', 'off', 'false', 'no', 'OFF'):
    assert runner.compilation_cache_dir({'GEMMA_SFT_JAX_COMPILATION_CACHE': off}) is None
  # JAX's own variable wins over everything else.
  assert runner.compilation_cache_dir({'JAX_COMPILATION_CACHE_DIR': '/j',
                                       'GEMMA_SFT_JAX_COMPILATION_CACHE': '0'}) == '/j'


def _decode(tmp_path, home='home', **env_overrides) -> subprocess.Popen:
  """Starts the tiny decode CLI with a home of its own and no JAX_COMPILATION_CACHE_DIR."""
  env = cli_env(str(tmp_path / 'unused'))
  # The defaults of setup_jax, not the test suite's settings.
  del env['JAX_COMPILATION_CACHE_DIR'], env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']
  env.pop('XDG_CACHE_HOME', None)
  env.pop('GEMMA_SFT_JAX_COMPILATION_CACHE', None)
  env.update(HOME=str(tmp_path / home), **env_overrides)
  return subprocess.Popen(
      [sys.executable, '-m', 'gemma_sft_jax.decode', '--config=configs/tiny.py:family=gemma2',
       r'--prompt=Question: 2+3?\nAnswer:', '--config.decode.max_new_tokens=4'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stderr(proc: subprocess.Popen) -> str:
  """stderr of a decode run, which must have exited 0."""
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  return err


def _files(directory):
  return [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files]


def test_compilation_cache_on_by_default_and_can_be_turned_off(tmp_path):
  # Two runs at a time (compiling takes one core): cache off, in a home of its own, beside the
  # first run with the default cache; then a rerun beside a run with the cache moved.
  default = tmp_path / 'home' / '.cache' / 'gemma_sft_jax' / 'jax'
  off, on = _decode(tmp_path, 'home_off', GEMMA_SFT_JAX_COMPILATION_CACHE='0'), _decode(tmp_path)
  assert 'JAX compilation cache' not in _stderr(off)
  assert not os.path.exists(tmp_path / 'home_off' / '.cache')

  err = _stderr(on)
  assert f'JAX compilation cache: {default}' in err
  assert 'decoding 1 prompt(s), up to 4 new tokens each' in err
  cached = sorted(_files(default))
  # Small programs are kept too: the decoder, the random init and their helpers.
  assert len(cached) >= 4 and any('jit__decode' in f for f in cached)

  moved = tmp_path / 'moved'
  rerun = _decode(tmp_path)
  elsewhere = _decode(tmp_path, GEMMA_SFT_JAX_COMPILATION_CACHE=str(moved))
  _stderr(rerun)
  _stderr(elsewhere)
  assert sorted(_files(default)) == cached  # Every program of the rerun came from the cache.
  assert len(_files(moved)) == len(cached)


def test_entry_points_import_in_one_process(tmp_path):
  # They share flag names (--config, --workdir, --output), which absl allows once per process:
  # report defines its flag at import, the others only when they run (runner.run).
  code = '; '.join(f'import gemma_sft_jax.{name}'
                   for name in ('report', 'main', 'eval', 'decode', 'export', 'benchmark'))
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=cli_env(str(tmp_path)),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_benchmark_cli_appends_its_json_line(tmp_path):
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, '-m', 'gemma_sft_jax.benchmark', '--config=configs/tiny.py:family=gemma2',
       '--steps=1', '--tag=t', f'--output={out}'],
      cwd=ROOT, env=cli_env(str(tmp_path / 'xla')), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]['tag'] == 't' and rows[0]['tokens_per_s'] > 0
  # Every step's time (warm-up steps first), each from the end of the step before.
  row = rows[0]
  assert len(row['step_s']) == 3 and row['step_s'][0] == row['first_step_s']
  assert row['step_s_median'] == row['step_s'][2] and min(row['step_s']) > 0


def test_library_info_chatter_is_dropped_and_warnings_kept():
  quiet = runner._QuietLibraries()  # pylint: disable=protected-access

  def record(path, level):
    return logging_std.LogRecord('x', level, path, 1, 'message', None, None)

  for path in ('/site-packages/jax/_src/xla_bridge.py',
               '/site-packages/orbax/checkpoint/checkpoint_manager.py'):
    assert not quiet.filter(record(path, logging_std.INFO))
    assert quiet.filter(record(path, logging_std.WARNING))
  assert quiet.filter(record('/repo/gemma_sft_jax/training/train.py', logging_std.INFO))


def test_benchmark_refuses_a_step_whose_loss_is_not_finite(tmp_path, env):
  """A broken step can run fast: a benchmark whose loss ends NaN or inf fails and writes no line
  (here an LR of 1e30 sends the weights, then the loss, to inf)."""
  out = tmp_path / 'bench.jsonl'
  proc = subprocess.run(
      [sys.executable, '-m', 'gemma_sft_jax.benchmark', '--config=configs/tiny.py:family=gemma2',
       '--steps=2', '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
       '--config.optim.clip_norm=0', f'--output={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'the step is broken' in proc.stderr, proc.stderr[-2000:]
  assert not out.exists()
