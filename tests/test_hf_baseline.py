"""benchmarks/hf_baseline.py (the transformers baseline) on a tiny random Gemma 2 on CPU."""

import importlib.util
import json
import math
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                     'hf_baseline.py')
_TINY = ['--model', 'tiny', '--device', 'cpu', '--batch', '2', '--seq_len', '16', '--steps', '2']


@pytest.fixture(scope='module')
def hf_baseline():
  spec = importlib.util.spec_from_file_location('hf_baseline', _PATH)  # benchmarks/ is no package.
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(hf_baseline, tmp_path, *extra):
  out = tmp_path / 'hf.jsonl'
  result = hf_baseline.run(hf_baseline.parse_args(_TINY + ['--output', str(out), *extra]))
  lines = out.read_text().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0]) == result
  return result


def _check_common(result, method):
  types = {'framework': str, 'model': str, 'method': str, 'batch': int, 'seq_len': int,
           'n_devices': int, 'tokens_per_s': float, 'step_s_median': float,
           'first_step_s': float, 'peak_memory_gib': float, 'device': str, 'optimizer': str,
           'gradient_checkpointing': bool, 'attn_implementation': str, 'trainable_params': int,
           'total_params': int, 'last_loss': float, 'versions': dict, 'date': str}
  for key, typ in types.items():
    assert isinstance(result[key], typ), (key, result.get(key))
  assert result['framework'] == 'transformers'
  assert (result['model'], result['method'], result['batch'], result['seq_len']) == (
      'tiny', method, 2, 16)
  assert result['n_devices'] == 1 and result['device'] == 'cpu'
  assert result['optimizer'] == 'adamw_fused' and result['attn_implementation'] == 'eager'
  assert result['peak_memory_gib'] == 0.0
  assert result['tokens_per_s'] > 0 and result['step_s_median'] > 0
  assert result['tokens_per_s'] == pytest.approx(2 * 16 / result['step_s_median'])
  assert math.isfinite(result['last_loss'])
  assert abs(result['last_loss'] - math.log(512)) < 1.0  # Random init: about uniform over vocab.
  assert set(result['versions']) == {'torch', 'transformers', 'peft', 'bitsandbytes'}
  assert result['versions']['torch'] == torch.__version__


def test_full(hf_baseline, tmp_path):
  result = _run(hf_baseline, tmp_path)
  _check_common(result, 'full')
  assert result['trainable_params'] == result['total_params'] > 0
  assert result['gradient_checkpointing'] is False
  # torch's AdamW keeps its moments in the parameters' dtype: bf16, read from its state.
  assert result['state_dtype'] == 'bfloat16'


@pytest.mark.filterwarnings('ignore:.*is_gradient_checkpointing:FutureWarning')  # Inside peft.
def test_lora_with_checkpointing(hf_baseline, tmp_path):
  result = _run(hf_baseline, tmp_path, '--method', 'lora', '--lora_rank', '4',
                '--gradient_checkpointing')
  _check_common(result, 'lora')
  assert result['gradient_checkpointing'] is True
  assert result['state_dtype'] == 'float32'  # peft's LoRA factors are fp32, and so their moments.
  # Rank 4 on q/k/v/o/gate/up/down of 2 layers (hidden 64, 4x16 q heads, 2x16 kv heads, mlp 128).
  per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
  assert result['trainable_params'] == 2 * per_layer
  assert result['total_params'] == 107_072 + 2 * per_layer  # Base model + the LoRA factors.


@pytest.mark.parametrize('extra, message', [
    (['--device', 'cuda'], 'no CUDA device'),
    (['--optimizer', 'paged_adamw_8bit'], 'paged_adamw_8bit'),
    (['--attn', 'sdpa'], '--attn sdpa'),
])
def test_bad_combinations_exit_2(hf_baseline, capsys, extra, message):
  if '--device' in extra and torch.cuda.is_available():
    pytest.skip('CUDA is available here')
  assert hf_baseline.main(_TINY + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1
