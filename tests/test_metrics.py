"""metrics.jsonl writing and resume truncation, wandb modes, progress bar, FLOPs/MFU arithmetic."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.training import metrics


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(name='no_wandb_home')
def _no_wandb_home(tmp_path, monkeypatch):
  """Keeps wandb's own config/cache out of $HOME and guarantees no credentials are found."""
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.setenv('NETRC', str(home / '.netrc'))
  for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_ARTIFACT_DIR'):
    monkeypatch.setenv(name, str(home / name.lower()))
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  monkeypatch.delenv('WANDB_MODE', raising=False)
  monkeypatch.delenv('WANDB_DIR', raising=False)
  return home


def test_lines_hold_step_and_scalars(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True) as writer:
    writer.write(1, {'loss': jnp.float32(1.5), 'learning_rate': np.float64(2e-5),
                     'tokens': np.int64(4096), 'grad_norm': jnp.asarray([0.25], jnp.bfloat16),
                     'nan_check': float('nan'), 'phase': 'train', 'stopped': False})
    writer.write(jnp.int32(2), {'loss': 1.25})
    # Flushed as written: a reader sees both lines before close (a killed run keeps them).
    assert [r['step'] for r in _rows(tmp_path)] == [1, 2]
  first, second = _rows(tmp_path)
  assert first == {'step': 1, 'loss': 1.5, 'learning_rate': 2e-5, 'tokens': 4096,
                   'grad_norm': 0.25, 'nan_check': None, 'phase': 'train', 'stopped': False}
  assert isinstance(first['tokens'], int)
  assert second == {'step': 2, 'loss': 1.25}


def test_non_scalar_or_unknown_values_are_errors(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True) as writer:
    with pytest.raises(TypeError, match=r"'loss' has shape \(2,\)"):
      writer.write(1, {'loss': jnp.ones(2)})
    with pytest.raises(TypeError, match="'obj' has unsupported type dict"):
      writer.write(1, {'obj': {}})


def test_only_the_main_process_writes(tmp_path):
  workdir = tmp_path / 'run'
  with metrics.MetricsWriter(str(workdir), is_main_process=False, wandb_mode='offline') as writer:
    writer.write(1, {'loss': 1.0})
  assert not workdir.exists()


def test_resume_truncates_lines_after_the_restored_step(tmp_path, capsys):
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True, truncate_after_step=-1) as writer:
    for step in range(1, 6):
      writer.write(step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 6, "lo')  # The run was killed in the middle of a line.

  with metrics.MetricsWriter(str(tmp_path), is_main_process=True, truncate_after_step=3) as writer:
    assert 'dropped 3 line(s) after step 3' in capsys.readouterr().out
    writer.write(4, {'loss': 40.0})
  assert [(r['step'], r['loss']) for r in _rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                (4, 40.0)]

  # None appends without touching earlier lines; -1 (a fresh run) starts an empty file.
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True) as writer:
    writer.write(2, {'accuracy': 0.5})
  assert [r['step'] for r in _rows(tmp_path)] == [1, 2, 3, 4, 2]
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True, truncate_after_step=-1) as writer:
    writer.write(1, {'loss': 9.0})
  assert _rows(tmp_path) == [{'step': 1, 'loss': 9.0}]


def test_wandb_disabled_neither_imports_nor_writes(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # Any `import wandb` would now fail loudly.
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True, wandb_mode='disabled') as writer:
    writer.write(1, {'loss': 1.0})
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl']
  assert 'wandb' not in capsys.readouterr().out


def test_missing_wandb_is_a_warning_not_a_failure(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  with metrics.MetricsWriter(str(tmp_path), is_main_process=True, wandb_mode='offline') as writer:
    writer.write(1, {'loss': 1.0})
  out = capsys.readouterr().out
  assert 'wandb: not installed' in out and len(out.strip().splitlines()) == 1
  assert _rows(tmp_path) == [{'step': 1, 'loss': 1.0}]


def test_resolve_wandb_mode(capsys):
  assert metrics.resolve_wandb_mode('online', has_credentials=True) == 'online'
  assert capsys.readouterr().out == ''
  assert metrics.resolve_wandb_mode('online', has_credentials=False) == 'offline'
  assert 'logging offline instead' in capsys.readouterr().out
  assert metrics.resolve_wandb_mode('disabled', has_credentials=False) == 'disabled'
  with pytest.raises(ValueError, match="wandb.mode must be one of .* got 'on'"):
    metrics.resolve_wandb_mode('on', has_credentials=True)


def test_credentials_come_from_the_env_or_netrc(no_wandb_home, monkeypatch):
  # pylint: disable=protected-access
  assert not metrics._has_wandb_credentials()
  (no_wandb_home / '.netrc').write_text('machine api.wandb.ai login user password x\n')
  os.chmod(no_wandb_home / '.netrc', 0o600)
  assert metrics._has_wandb_credentials()
  os.remove(no_wandb_home / '.netrc')
  monkeypatch.setenv('WANDB_API_KEY', 'not-a-real-key')
  assert metrics._has_wandb_credentials()


def test_wandb_online_without_key_logs_offline_under_workdir(tmp_path, no_wandb_home, capsys):
  del no_wandb_home
  workdir = tmp_path / 'run'
  for step in (1, 2):  # The second writer is a resumed run: same wandb run id.
    with metrics.MetricsWriter(str(workdir), is_main_process=True, wandb_mode='online',
                               wandb_project='test', wandb_config={'lr': 1e-5}) as writer:
      writer.write(step, {'loss': 1.0 / step})
  out = capsys.readouterr().out
  assert 'logging offline instead' in out
  assert [r['step'] for r in _rows(workdir)] == [1, 2]
  if importlib.util.find_spec('wandb') is None:
    # Images without wandb (it is optional at run time): the run goes on with metrics.jsonl only.
    assert 'wandb: not installed' in out and not (workdir / 'wandb').exists()
    return
  with open(workdir / 'wandb' / 'run_id', encoding='utf-8') as f:
    run_id = f.read().strip()
  runs = [d for d in os.listdir(workdir / 'wandb') if d.startswith('offline-run-')]
  assert len(runs) == 2  # One directory per process lifetime, both logging to the same run id.
  assert all(f'run-{run_id}.wandb' in os.listdir(workdir / 'wandb' / d) for d in runs)


def test_flops_per_token_and_mfu_by_hand():
  # Gemma-2-2B-like: N = 2.0e9 matmul params, T = 1024, L = 26, 8 heads x 256 = 2048.
  attention = 6 * 26 * 1024 * 2048  # = 327_155_712
  full = metrics.flops_per_token(n_matmul_params=2_000_000_000, seq_len=1024, n_layers=26,
                                 d_attn=2048, lora=False)
  lora = metrics.flops_per_token(n_matmul_params=2_000_000_000, seq_len=1024, n_layers=26,
                                 d_attn=2048, lora=True)
  assert full == 12_000_000_000 + 327_155_712 == 12e9 + attention
  assert lora == 8_000_000_000 + 327_155_712
  # 20k tokens/s on 2 H100s: 20e3 * 12.327e9 / (2 * 989e12) = 0.12464...
  value = metrics.mfu(tokens_per_s=20_000, flops_per_token=full,
                      peak_flops_per_device=metrics.peak_flops_per_device('NVIDIA H100 80GB HBM3'),
                      n_devices=2)
  assert value == pytest.approx(20_000 * 12_327_155_712 / (2 * 989e12), rel=1e-12)
  assert value == pytest.approx(0.124642, abs=1e-6)
  assert metrics.mfu(tokens_per_s=1e4, flops_per_token=full, peak_flops_per_device=None,
                     n_devices=1) is None


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5', 459e12),
    ('TPU v5p', 459e12), ('TPU v6 lite', 918e12), ('TPU v6e', 918e12), ('cpu', None),
])
def test_peak_flops_table(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak


class _FakeDevice:

  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_device_memory():
  assert metrics.device_memory(_FakeDevice({'bytes_in_use': 5, 'peak_bytes_in_use': 7})) == 7
  assert metrics.device_memory(_FakeDevice(None)) is None
  assert metrics.device_memory(_FakeDevice({'bytes_in_use': 5})) is None
  measured = metrics.device_memory()
  if jax.local_devices()[0].platform == 'cpu':
    assert measured is None  # The CPU backend reports no memory stats.
  else:
    assert isinstance(measured, int) and measured >= 0


def test_progress_bar_shows_postfix_only_when_enabled(capsys):
  assert metrics.format_postfix(loss=1.23456, learning_rate=2e-5, tokens_per_s=12345.0,
                                mfu_fraction=0.4123) == {
                                    'loss': '1.2346', 'lr': '2.00e-05', 'tok/s': '12.3k',
                                    'mfu': '41.2%'}
  assert metrics.format_postfix(loss=1.0) == {'loss': '1.0000'}
  with metrics.ProgressBar(total=10, initial=2, enabled=True) as bar:
    bar.update(3, loss=1.5, learning_rate=1e-4, tokens_per_s=2.5e6, mfu_fraction=None)
  err = capsys.readouterr().err
  assert '3/10' in err and 'loss=1.5000' in err and 'tok/s=2.5M' in err and 'mfu' not in err
  with metrics.ProgressBar(total=10, enabled=False) as bar:
    bar.update(3, loss=1.5)
    bar.write('hidden')
  captured = capsys.readouterr()
  assert captured.err == '' and captured.out == ''
