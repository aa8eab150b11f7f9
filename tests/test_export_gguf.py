"""GGUF exports (float32 and half precision, from one or two processes) in transformers and our
loader, their vocabulary, and exports that fail or overwrite; the runs they read:
tests/export_helpers.py."""

import json
import os
import types

import numpy as np
import pytest

from gemma_sft_jax import pytree
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import export_formats
from gemma_sft_jax.weights import exporters
from gemma_sft_jax.weights import gguf_file
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.export_helpers import BASES, FP32_ATOL, HALF_ATOL, PROMPTS, RUNS, _completions, _config
from tests.export_helpers import _greedy, _hf, _ours, _torch_logits


@pytest.fixture(scope='module')
def runs(export_runs):
  """The runs and exports (tests/export_helpers.py), built once for all three test_export files."""
  return export_runs


@pytest.mark.parametrize('run', sorted(RUNS))
def test_gguf_export_in_transformers_and_our_loader(runs, run):
  ours, tokens = _ours(runs, run)
  hf = _hf(runs['out'], gguf_file=f'{run}.gguf')
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{run} gguf (f32) in transformers: max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  base = os.path.join(runs['root'], RUNS[run][0])
  assert _greedy(hf, base) == _completions(os.path.join(runs['root'], f'{run}.jsonl'))

  # Our loader reads back the hf export's weights: bitwise, but for the norms, which GGUF stores
  # as 1 + w (one float32 rounding of 1 + w).
  path = os.path.join(runs['out'], f'{run}.gguf')
  config = checkpoints.load_config(path)
  assert config == BASES[RUNS[run][0]]
  shapes = model_lib.param_shapes(model_lib.Transformer(config))
  got = pytree.flatten(checkpoints.load_params(path, config=config, shapes=shapes))
  want = pytree.flatten(
      checkpoints.load_params(os.path.join(runs['out'], f'{run}_hf'), config=config,
                              shapes=shapes))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2.5e-7 if 'norm' in k else 0,
                               err_msg=k)
  # The vocabulary: transformers builds the byte tokenizer back from it (as llama.cpp reads it).
  tok, byte = tokenizer_lib.load_tokenizer(path), tokenizer_lib.ByteTokenizer()
  for text in PROMPTS + ['ünï €\n\t<x>  y']:
    assert tok.encode(text, add_special_tokens=False) == byte.encode(text)
    assert tok.decode(byte.encode(text)) == text


def test_export_from_two_processes_is_the_same_file(runs):
  outputs = [runs['results'][f'export_process_{i}'] for i in range(2)]
  assert all('onto 2 device(s)' in err for _, _, err in outputs)
  printed = [[line for line in out.splitlines() if 'export:' in line] for _, out, _ in outputs]
  assert printed == [[f'gguf export: {runs["root"]}/two_processes/g2_lora.gguf'], []]
  assert os.listdir(os.path.join(runs['root'], 'two_processes')) == ['g2_lora.gguf']
  one = gguf_file.read(os.path.join(runs['out'], 'g2_lora.gguf'))
  two = gguf_file.read(os.path.join(runs['root'], 'two_processes', 'g2_lora.gguf'))
  values = lambda f: {k: v.tolist() if isinstance(v, np.ndarray) else
                      list(v) if isinstance(v, gguf_file.Strings) else v for k, v in f.items()}
  assert values(one.fields) == values(two.fields)
  assert [t.name for t in one.tensors] == [t.name for t in two.tensors]
  for a, b in zip(one.tensors, two.tensors):
    if 'norm' in a.name or a.name == 'token_embd.weight':
      np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
    else:  # Merged kernels (W + alpha/R·A·B) may round differently in a sharded matmul.
      np.testing.assert_allclose(a.data, b.data, rtol=0, err_msg=a.name,
                                 atol=2 * np.spacing(np.abs(a.data).max()))


@pytest.mark.parametrize('name,run,dtype', [('g2_lora_bf16', 'g2_lora', 'bfloat16'),
                                            ('g3_full_f16', 'g3_full', 'float16')])
def test_half_precision_gguf(runs, name, run, dtype):
  import gguf  # pylint: disable=g-import-not-at-top
  ours, tokens = _ours(runs, run)
  hf = _hf(runs['out'], gguf_file=f'{name}.gguf')
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{name}: max abs diff {diff:.2e} (|logits| max {np.abs(ours).max():.2f})')
  assert diff <= HALF_ATOL[dtype]
  types = {t.name: t.tensor_type
           for t in gguf_file.read(os.path.join(runs['out'], f'{name}.gguf')).tensors}
  half = {'bfloat16': gguf.GGMLQuantizationType.BF16, 'float16': gguf.GGMLQuantizationType.F16}
  assert types['token_embd.weight'] == types['blk.0.attn_q.weight'] == half[dtype]
  assert types['output_norm.weight'] == gguf.GGMLQuantizationType.F32


def test_a_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):
  """An error while writing (here: the GGUF check of an architecture GGUF cannot describe, after
  the output was staged) removes everything it wrote."""
  odd = architecture.VARIANTS['tiny_gemma2']  # query_pre_attn_scalar 17, head_dim 16.
  with pytest.raises(ValueError, match='its query_pre_attn_scalar is 17, a GGUF reader'):
    export_formats.write_gguf(None, [], config=odd, dtype='float32', context_length=8192,
                              tok=None, tokenizer_source='', name='x')
  monkeypatch.setattr(export_formats, '_check_gguf_describes',
                      lambda c, fields: (_ for _ in ()).throw(ValueError('refused')))
  with pytest.raises(ValueError, match='refused'):
    exporters.export(_config(runs['root'], 'g3_full'), workdir=os.path.join(runs['root'],
                                                                             'g3_full'),
                     fmt='gguf', output=str(tmp_path / 'x.gguf'))
  assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_existing_output(runs, tmp_path):
  run = os.path.join(runs['root'], 'g3_full')
  output = tmp_path / 'g3_full.gguf'
  output.mkdir()  # Whatever is in the way, a directory even.
  (output / 'stale').write_text('x')
  config = _config(runs['root'], 'g3_full')
  with pytest.raises(ValueError, match='exists'):
    exporters.export(config, workdir=run, fmt='gguf', output=str(output))
  exporters.export(config, workdir=run, fmt='gguf', output=str(output), overwrite=True)
  assert output.read_bytes() == open(os.path.join(runs['out'], 'g3_full.gguf'), 'rb').read()
  assert os.listdir(tmp_path) == ['g3_full.gguf']


def test_gguf_vocabulary_from_a_sentencepiece_model(tmp_path):
  """A tokenizer with tokenizer.model becomes llama.cpp's vocabulary, padded to the model's."""
  import gguf  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'text.txt'
  text.write_text('\n'.join(PROMPTS * 20))
  sentencepiece.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'tokenizer'), vocab_size=300,
      model_type='bpe', byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      hard_vocab_limit=False, minloglevel=2)
  source = tmp_path / 'tok'
  source.mkdir()
  os.rename(tmp_path / 'tokenizer.model', source / 'tokenizer.model')
  (source / 'tokenizer_config.json').write_text(json.dumps({'add_bos_token': True}))
  processor = sentencepiece.SentencePieceProcessor(model_file=str(source / 'tokenizer.model'))
  vocab_size = processor.vocab_size() + 5
  writer = gguf.GGUFWriter(str(tmp_path / 'v.gguf'), 'gemma3')
  export_formats._gguf_vocab(  # pylint: disable=protected-access
      writer, types.SimpleNamespace(bos_token_id=2, eos_token_id=1, pad_token_id=0), str(source),
      vocab_size, str(tmp_path / 'scratch'))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  writer.close()
  fields = gguf_file.read(tmp_path / 'v.gguf').fields
  tokens = list(fields['tokenizer.ggml.tokens'])
  assert tokens[:processor.vocab_size()] == [processor.id_to_piece(i)
                                             for i in range(processor.vocab_size())]
  assert tokens[processor.vocab_size():] == [f'[PAD{i}]' for i in range(processor.vocab_size(),
                                                                          vocab_size)]
  assert fields['tokenizer.ggml.model'] == 'llama'
  assert [fields[f'tokenizer.ggml.{k}_token_id'] for k in ('bos', 'eos', 'padding')] == [2, 1, 0]
  assert fields['tokenizer.ggml.add_bos_token'] is True
