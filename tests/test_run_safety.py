"""Runs that cannot go quietly wrong: no non-finite checkpoint, no resume under another config,
no tokenizer that cannot drive the model, Ctrl-C saving at the next step boundary.

In-process `train.train` runs of the tiny Gemma 2 (3 layers: the cheapest to compile).
"""

import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemma_sft_jax.training import checkpointing
from gemma_sft_jax.training import resume
from gemma_sft_jax.training import train as train_lib
from gemma_sft_jax.weights import models
from tests.conftest import ROOT, tiny_config

_ARG = 'family=gemma2'


def _config(**overrides):
  return tiny_config(_ARG, **{'eval.run_base': False, 'eval.run_sft': False, **overrides})


def _saved_steps(workdir):
  with checkpointing.Checkpointer(str(workdir), every_steps=1, keep=10) as ckpt:
    return ckpt, ckpt.all_steps()


def test_a_diverging_run_never_saves_a_non_finite_checkpoint(tmp_path):
  # The reported case: checkpoints every 2 steps, metrics every 10, an absurd LR. With keep=1,
  # rotation would have dropped every good checkpoint had a non-finite one been saved.
  config = _config(**{'optim.lr': 1e30, 'optim.warmup_steps': 1, 'train.steps': 12,
                      'checkpoint.every_steps': 2, 'checkpoint.keep': 1,
                      'train.log_every': 10})
  with pytest.raises(train_lib.TrainingError) as error:
    train_lib.train(config, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'stopped without saving' in message, message
  _, steps = _saved_steps(tmp_path)
  assert steps and f'the last good checkpoint is step {steps[-1]}' in message, (steps, message)
  # The named checkpoint is finite (read back as saved, onto the one CPU device).
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(tmp_path / 'checkpoints' / str(steps[-1]) / 'state')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))
  assert not os.path.exists(tmp_path / 'final')


def test_resume_refuses_training_changes_and_allows_the_rest(tmp_path, monkeypatch):
  trained = _config()
  with checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1) as ckpt:
    ckpt.save(3, state={'step': jax.numpy.zeros(())}, force=True,
              extra={'data': {}, 'config': resume.snapshot(trained)})
  changed = {'train.batch_size': 2, 'train.steps': 7, 'train.seq_len': 256,
             'tuning_method': 'lora', 'model.variant': 'tiny_gemma3', 'optim.lr': 1e-4,
             'optim.warmup_steps': 2, 'optim.min_lr': 0.0, 'train.seed': 1}
  # Checked before the model is built: nothing slow happens on a refused resume.
  monkeypatch.setattr(models, 'model_setup', lambda *a, **k: pytest.fail('model built'))
  for key, value in changed.items():
    with pytest.raises(ValueError) as error:
      train_lib.train(_config(**{key: value}), str(tmp_path))
    message = str(error.value)
    old = trained
    for part in key.split('.'):
      old = old[part]
    assert '\n' not in message and f'{key}: {old!r} in the checkpoint, {value!r} now' in message
  # All at once: every key is named.
  with pytest.raises(ValueError) as error:
    train_lib.train(_config(**changed), str(tmp_path))
  assert all(key in str(error.value) for key in changed), str(error.value)

  safe = {'eval.limit': 3, 'eval.max_new_tokens': 7, 'decode.temperature': 0.5,
          'wandb.mode': 'offline', 'checkpoint.every_steps': 5, 'checkpoint.keep': 4,
          'train.log_every': 1, 'mesh.fsdp': 1, 'model.remat': 'full', 'optim.grad_accum': 2,
          'optim.update_kernel': 'xla', 'lora.rank': 2}  # Full SFT trains no adapters.
  assert all(resume.is_safe_to_change(k) for k in safe if not k.startswith('lora.'))
  with checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1) as ckpt:
    assert resume.resume_point(_config(**safe), ckpt) == 3


def test_the_readme_lists_every_field_a_resume_may_change():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for key in resume.SAFE_TO_CHANGE:
    assert f'`{key}*`' in readme if key.endswith('.') else f'`{key}`' in readme, key


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(gemma3_270m_gguf):
  # The byte tokenizer (259 tokens) with a real 262k-vocabulary Gemma decodes to nothing.
  config = tiny_config(_ARG, **{'model.checkpoint': gemma3_270m_gguf})
  with pytest.raises(ValueError) as error:
    models.model_setup(config, with_lora=False)
  assert "model.tokenizer='byte': 259 tokens do not fit the 262144-token" in str(error.value)
  with pytest.raises(ValueError, match='300 tokens but the model has 263'):
    models.check_vocabulary(300, 263, tokenizer='x', checkpoint='')
  # A few spare embedding rows (Gemma 3 4B: 262,208 rows, 262,144 tokens) are fine, and so is
  # the byte tokenizer on a random init of any size.
  models.check_vocabulary(262_144, 262_208, tokenizer='t', checkpoint='google/gemma-3-4b-pt')
  models.check_vocabulary(259, 256_000, tokenizer='byte', checkpoint='')


def test_ctrl_c_saves_at_the_next_step_boundary(tmp_path, monkeypatch):
  """SIGINT at step 3's boundary saves step 3 and reports SIGINT. The loop dispatches each step
  before waiting for the one before it, and only for that one (two steps in flight at most), so
  at each boundary at most one dispatched step has not finished."""
  in_flight, dispatched, metrics, events = [], [], [], []
  build = train_lib.build
  block_until_ready = jax.block_until_ready

  def counting_build(*args, **kwargs):
    parts = build(*args, **kwargs)
    step_fn = parts.step_fn

    def step(state, frozen, batch):
      out = step_fn(state, frozen, batch)
      events.append(('dispatch', len(dispatched)))
      dispatched.append(out[1]['loss'])
      metrics.append(out[1])
      return out
    parts.step_fn = step
    return parts

  def waiting(x):
    events.extend(('wait', i) for i, m in enumerate(metrics) if m is x)
    return block_until_ready(x)

  should_stop = checkpointing.PreemptionGuard.should_stop

  def stop_at(guard, step):
    in_flight.append(sum(not x.is_ready() for x in dispatched))
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # Would raise KeyboardInterrupt without the guard.
    return should_stop(guard, step)

  monkeypatch.setattr(train_lib, 'build', counting_build)
  monkeypatch.setattr(checkpointing.PreemptionGuard, 'should_stop', stop_at)
  monkeypatch.setattr(jax, 'block_until_ready', waiting)
  config = _config(**{'train.steps': 6, 'train.log_every': 100, 'checkpoint.every_steps': 100})
  previous = signal.getsignal(signal.SIGINT)
  summary = train_lib.train(config, str(tmp_path))
  assert events == [('dispatch', 0), ('dispatch', 1), ('wait', 0), ('dispatch', 2), ('wait', 1)]
  assert signal.getsignal(signal.SIGINT) is previous
  assert summary == {'preempted': True, 'step': 3, 'signal': 'SIGINT'}
  # The host never ran more than a step ahead of the device: at each check, every step but the
  # latest had finished.
  assert len(in_flight) == 4 and max(in_flight) <= 1, in_flight
  _, steps = _saved_steps(tmp_path)
  assert steps == [3]  # Resuming from it is test_train_cli's SIGINT test.
