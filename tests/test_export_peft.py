"""PEFT adapters: exported ones loaded by peft, and peft-trained ones read by --adapter; the runs
they read: tests/export_helpers.py."""

import json
import os

import jax
import numpy as np
import pytest

from gemma_sft_jax import runner
from gemma_sft_jax.model import sharding
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import peft_adapters
from tests.export_helpers import BASES, FP32_ATOL, LORA_RUNS, RUNS, _completions, _config, _greedy
from tests.export_helpers import _hf, _ours, _tokens, _torch_logits


@pytest.fixture(scope='module')
def runs(export_runs):
  """The runs and exports (tests/export_helpers.py), built once for all three test_export files."""
  return export_runs


@pytest.mark.parametrize('run', LORA_RUNS)
def test_peft_export_loads_in_peft(runs, run):
  import peft  # pylint: disable=g-import-not-at-top
  ours, tokens = _ours(runs, run)
  family = RUNS[run][0]
  path = os.path.join(runs['out'], f'{run}_peft')
  model = peft.PeftModel.from_pretrained(_hf(os.path.join(runs['root'], family)), path).eval()
  diff = np.abs(_torch_logits(model, tokens) - ours).max()
  print(f'{run} peft: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  assert _greedy(model, os.path.join(runs['root'], family)) == _completions(
      os.path.join(runs['root'], f'{run}.jsonl'))
  with open(os.path.join(path, peft_adapters.CONFIG_FILE)) as f:
    config = json.load(f)
  assert (config['r'], config['lora_alpha'], config['target_modules']) == (
      4, 8.0, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'])
  keys = checkpoints.read_safetensors(os.path.join(path, peft_adapters.WEIGHTS_FILE))
  assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in keys
  assert len(keys) == 2 * 7 * BASES[family].num_layers


def test_peft_trained_adapter_decodes_as_in_peft(runs):
  """An adapter made and trained by peft, read through --adapter: same greedy decoding."""
  import peft  # pylint: disable=g-import-not-at-top
  rc, _, err = runs['results']['decode_peft_torch']
  assert rc == 0, err[-3000:]
  root = runs['root']
  model = peft.PeftModel.from_pretrained(_hf(os.path.join(root, 'gemma3')),
                                         os.path.join(root, 'peft_torch')).eval()
  base = os.path.join(root, 'gemma3')
  assert _greedy(model, base) == _completions(os.path.join(root, 'peft_torch.jsonl'))
  assert _greedy(_hf(base), base) != _greedy(model, base)  # The adapter matters.

  config = _config(root, 'g3_full')
  setup, params = runner.load_trained(config, os.path.join(root, 'peft_torch'),
                                      mesh=sharding.make_mesh(**config.mesh))
  tokens = _tokens(setup.config)
  logits = jax.jit(lambda p, t: setup.model.apply({'params': p}, t)[0])(params, tokens)
  diff = np.abs(np.asarray(logits) - _torch_logits(model, tokens)).max()
  print(f'peft-trained adapter: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  assert not setup.model.scan_layers  # Layers 0, 2, 5 only: loaded per layer.


def test_adapter_for_another_base_is_one_line_error(runs, tmp_path, capsys):
  # Gemma 3's adapter (layers 0, 2, 5) on the 3-layer Gemma 2 base, as eval and decode load it.
  config = _config(runs['root'], 'g2_lora')
  with pytest.raises(SystemExit) as exit_:
    runner.exit_on_bad_input(runner.load_trained, config,
                             os.path.join(runs['root'], 'peft_torch'),
                             mesh=sharding.make_mesh(**config.mesh))
  assert exit_.value.code == 2
  line, = capsys.readouterr().err.strip().splitlines()
  assert "the adapter targets 'model.layers.5." in line and 'which the base model' in line
  # A target the base has no module for, and Gemma 2's adapter on the 7-layer Gemma 3.
  root = runs['root']
  bad = tmp_path / 'bad_target'
  bad.mkdir()
  for name in (peft_adapters.CONFIG_FILE, peft_adapters.WEIGHTS_FILE):
    os.symlink(os.path.join(root, 'peft_torch', name), bad / name)
  with open(os.path.join(root, 'peft_torch', peft_adapters.CONFIG_FILE)) as f:
    config = json.load(f)
  os.unlink(bad / peft_adapters.CONFIG_FILE)
  (bad / peft_adapters.CONFIG_FILE).write_text(json.dumps(
      {**config, 'target_modules': config['target_modules'] + ['qkv_proj']}))
  with pytest.raises(ValueError, match="target_modules names 'qkv_proj'"):
    peft_adapters.read(str(bad), BASES['gemma3'], base='gemma3')
  with pytest.raises(ValueError, match="covers 'model.layers.3.mlp.down_proj'"):
    peft_adapters.read(os.path.join(runs['out'], 'g2_lora_peft'), BASES['gemma3'], base='gemma3')
