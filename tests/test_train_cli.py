"""Training through the `main` CLI: loss falls and outputs are written, Ctrl-C and SIGKILL resume
bitwise, and a rerun that finds training done (bad input: test_validation.py)."""

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

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import checkpointing
from gemma_sft_jax.training import metrics as metrics_lib
from gemma_sft_jax.weights import models
from tests.conftest import ROOT, assert_bitwise_equal, flat, tiny_config

# ---- The CLI end to end. ----------------------------------------------------------------------

# Gemma 2's tiny variant (3 layers to Gemma 3's 7) compiles and steps twice as fast.
_CONFIG = 'configs/tiny.py:family=gemma2'
_STEPS_CLI = 12
_TRAIN_FLAGS = (f'--config.train.steps={_STEPS_CLI}', '--config.checkpoint.every_steps=2')
_EVAL_FLAGS = ('--config.eval.limit=2', '--config.eval.max_new_tokens=4')
# Interrupted runs: the same training, without evaluations (they do not touch training state).
_NO_EVAL_FLAGS = ('--config.eval.run_base=false', '--config.eval.run_sft=false')


def _main_command(workdir, *flags) -> list[str]:
  return [sys.executable, '-m', 'gemma_sft_jax.main', f'--config={_CONFIG}',
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
  setup = models.model_setup(tiny_config('family=gemma2,method=full'), with_lora=False)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          model_lib.param_shapes(setup.model))
  return flat(checkpointing.load_params(os.path.join(workdir, 'final'), abstract, cast=False))


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


def test_ctrl_c_then_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(
    tmp_path, start, reference_run):
  # Start once the reference has compiled everything (its first metrics line), so that these
  # runs find the compiled code in the shared cache instead of compiling it a second time.
  _poll(lambda: _logged(reference_run.workdir), reference_run.proc)
  workdir = tmp_path / 'run'

  # Ctrl-C: a checkpoint at the next step boundary, one line, exit status 130.
  run = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS)
  # The handler is installed around the training loop; the first metrics line is written in it.
  _poll(lambda: _logged(workdir), run.proc)
  run.proc.send_signal(signal.SIGINT)
  rc, out, err = run.wait()
  assert rc == 130, err[-4000:]
  assert 'Received signal SIGINT' in out and 'Traceback' not in err
  last = err.strip().splitlines()[-1]
  stopped = int(re.fullmatch(r'error: interrupted \(Ctrl-C\): saved step (\d+) in .*; rerun the '
                             r'same command to resume', last).group(1))
  assert 1 <= stopped < _STEPS_CLI and _finished_steps(workdir)[-1] == stopped
  assert not os.path.exists(workdir / 'final')

  # SIGKILL: no handler runs; an async save may be left half-written.
  killed = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS)
  _poll(lambda: any(s >= stopped + 2 for s in _finished_steps(workdir)), killed.proc)
  killed.proc.kill()
  rc, _, err = killed.wait()
  assert rc == -signal.SIGKILL and f'at step {stopped}' in err
  steps = _finished_steps(workdir)
  assert stopped + 2 <= steps[-1] < _STEPS_CLI and not os.path.exists(workdir / 'final'), steps

  # The same command again resumes and finishes: the same weights as never stopping.
  err = start(workdir, *_TRAIN_FLAGS, *_NO_EVAL_FLAGS).succeed()
  assert re.search(r'resumed from .* at step (\d+)', err), err[-4000:]
  reference_run.succeed()
  assert_bitwise_equal(_final_params(workdir), _final_params(reference_run.workdir))
  # The per-step losses the resumed runs logged are the uninterrupted run's, exactly.
  losses, ref_losses = _losses(workdir), _losses(reference_run.workdir)
  assert max(losses) == _STEPS_CLI and all(losses[s] == ref_losses[s] for s in ref_losses)


def test_rerun_of_a_finished_run_says_so_and_keeps_its_record(reference_run, env):
  reference_run.succeed()
  workdir = reference_run.workdir

  def outputs():
    return {name: open(os.path.join(workdir, name)).read() for name in sorted(os.listdir(workdir))
            if name.endswith(('.json', '.jsonl'))}
  before = outputs()
  proc = subprocess.run(_main_command(workdir, *_TRAIN_FLAGS, *_EVAL_FLAGS), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'already finished at step {_STEPS_CLI}' in proc.stdout, proc.stdout
  # No evaluation ran again, and the training record (its timing) was kept.
  assert outputs() == before


def _assert_scored_from_predictions(result: dict, workdir: str, n: int) -> None:
  """An evaluation's counts and accuracies are those of the predictions file it names."""
  assert os.path.dirname(result['predictions']) == os.path.abspath(workdir)
  with open(result['predictions']) as f:
    rows = [json.loads(line) for line in f]
  assert result['n'] == len(rows) == n
  for kind in ('strict', 'flexible'):
    correct = sum(row[f'correct_{kind}'] for row in rows)
    assert result[f'{kind}_correct'] == correct and result[f'{kind}_accuracy'] == correct / n
  for row in rows:  # Each verdict is the extracted answer checked against the gold one.
    assert row['correct_strict'] == gsm8k.is_correct(row['extracted_strict'], row['gold'])
    assert row['correct_flexible'] == gsm8k.is_correct(row['extracted_flexible'], row['gold'])
    assert row['question'] in row['prompt']


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
  assert rows[-1]['loss'] < 0.7 * rows[0]['loss'], (rows[0]['loss'], rows[-1]['loss'])

  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  train = results['train']
  assert train['step'] == train['steps_run'] == _STEPS_CLI
  assert train['final_loss'] == rows[-1]['loss']
  assert train['tuning_method'] == 'full' and train['trainable_params'] == train['total_params']
  for label in ('base', 'sft'):
    _assert_scored_from_predictions(results[label], workdir, n=2)
  assert os.path.isdir(os.path.join(workdir, 'final'))
  with open(os.path.join(workdir, 'final.json')) as f:
    final = json.load(f)
  assert final['tuning_method'] == 'full' and final['step'] == _STEPS_CLI
  assert _final_params(workdir)  # final/ holds the full parameter tree.


def test_rerun_after_the_last_step_reports_the_logged_final_loss(tmp_path):
  """A rerun that finds training finished runs no step; its final loss is the last metrics row
  the writer keeps (rows past the restored step, e.g. from a killed run, and a cut-off line are
  dropped)."""
  def last_loss(upto, rows=None):
    if rows is not None:
      with open(tmp_path / 'metrics.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 40, "lo')
    writer = metrics_lib.MetricsWriter(str(tmp_path), is_main_process=True,
                                       truncate_after_step=upto)
    writer.close()
    return float((writer.last_row or {}).get('loss', math.nan))

  assert math.isnan(last_loss(30))
  rows = [{'step': 10, 'loss': 1.5}, {'step': 20, 'loss': 0.75}, {'step': 30, 'loss': 0.5}]
  assert last_loss(20, rows) == 0.75
  assert last_loss(30, rows) == 0.5
