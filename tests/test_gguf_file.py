"""gguf_file: the metadata and tensors gguf.GGUFReader sees, each file parsed once per process."""

import os

import gguf
import jax
import numpy as np
import pytest

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import gguf_file
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _write(path, rng=None):
  """A small GGUF of every kind of value the Gemma files hold, and three tensor types."""
  rng = rng or np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), 'gemma3')
  w.add_block_count(2)
  w.add_float32('gemma3.attention.layer_norm_rms_epsilon', 1e-6)
  w.add_bool('tokenizer.ggml.add_bos_token', True)
  w.add_int64('x.int64', -5)
  w.add_array('tokenizer.ggml.tokens', ['<pad>', '\u2581the', 'Question', 'ünï', ''])
  w.add_array('tokenizer.ggml.scores', [0.0, -1.5, 2.0, 3.0, 4.0])
  w.add_array('x.int32s', [1, -2, 3])
  w.add_custom_alignment(64)
  w.add_tensor('output_norm.weight', rng.standard_normal((3, 64)).astype(np.float32))
  w.add_tensor('token_embd.weight',
                gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q8_0),
                raw_dtype=Q8_0)
  w.add_tensor('x.f16', rng.standard_normal((2, 5)).astype(np.float16))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _bits(x):
  return np.ascontiguousarray(x).view(f'u{x.dtype.itemsize}')


def test_same_as_gguf_reader(tmp_path):
  path = _write(tmp_path / 'small.gguf')
  ours, theirs = gguf_file.read(path), gguf.GGUFReader(path)
  want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith('GGUF.')}
  got = {k: list(v) if isinstance(v, (gguf_file.Strings, np.ndarray)) else v
         for k, v in ours.fields.items()}
  assert got == want
  assert [(t.name, t.tensor_type, t.shape) for t in ours.tensors] == \
      [(t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors):
    np.testing.assert_array_equal(_bits(a.data), _bits(b.data))
    np.testing.assert_array_equal(_bits(gguf_file.dequantize(a)),
                                  _bits(gguf.quants.dequantize(b.data, b.tensor_type)))


def test_q8_0_chunked_dequantisation_is_bitwise_gguf():
  # More blocks than one chunk holds, so several threads each write their part.
  rng = np.random.default_rng(1)
  blocks = np.empty((3 * 65540, 34), np.uint8)  # 3 chunks of 1 << 16 blocks and a bit.
  blocks[:, :2] = rng.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
  blocks[:, 2:] = rng.integers(-128, 128, (len(blocks), 32), dtype=np.int8).view(np.uint8)
  data = blocks.reshape(-1, 5 * 34)  # Rows of 5 blocks: 160 values each.
  got = gguf_file._dequantize_q8_0(data, threads=3)  # pylint: disable=protected-access
  want = gguf.quants.dequantize(data, Q8_0)
  assert got.shape == want.shape == (len(blocks) // 5, 160)
  np.testing.assert_array_equal(_bits(got), _bits(want))


def test_parsed_once_until_the_file_changes(tmp_path, monkeypatch):
  path = _write(tmp_path / 'small.gguf')
  parsed = []
  parse = gguf_file._parse  # pylint: disable=protected-access
  monkeypatch.setattr(gguf_file, '_parse', lambda p: parsed.append(p) or parse(p))
  first = gguf_file.read(path)
  assert gguf_file.read(os.path.join(str(tmp_path), '.', 'small.gguf')) is first
  assert len(parsed) == 1
  _write(path, np.random.default_rng(2))
  os.utime(path, ns=(1, 1))  # A rewrite within the clock's resolution still gets a new time.
  assert gguf_file.read(path) is not first and len(parsed) == 2


def test_damaged_files_name_the_cause(tmp_path):
  path = _write(tmp_path / 'small.gguf')
  data = open(path, 'rb').read()
  cut = tmp_path / 'cut.gguf'
  cut.write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"cut.gguf: cannot read GGUF \(tensor 'x.f16' ends at"):
    gguf_file.read(cut)
  head = tmp_path / 'head.gguf'
  head.write_bytes(data[:200])
  with pytest.raises(checkpoints.CheckpointError, match='head.gguf: cannot read GGUF'):
    checkpoints.gguf_model_config(str(head))
  other = tmp_path / 'other.gguf'
  other.write_bytes(b'PK\x03\x04' + data[4:])
  with pytest.raises(ValueError, match=r'other.gguf: cannot read GGUF \(not a GGUF file'):
    gguf_file.read(other)


@pytest.mark.slow
def test_real_gguf_parsed_once_per_process(gemma3_270m_gguf, monkeypatch):
  """Config, tokenizer check and weights of the 270M share one parse; GGUFReader is never used."""
  def refuse(*args, **kwargs):
    raise AssertionError('gguf.GGUFReader parses the whole vocabulary: use gguf_file.read')
  monkeypatch.setattr(gguf.GGUFReader, '__init__', refuse)
  parsed = []
  parse = gguf_file._parse  # pylint: disable=protected-access
  monkeypatch.setattr(gguf_file, '_parse', lambda p: parsed.append(p) or parse(p))
  gguf_file._read.cache_clear()  # pylint: disable=protected-access

  config = checkpoints.load_config(gemma3_270m_gguf)
  assert config == architecture.VARIANTS['gemma3_270m']
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  tokenizer_lib.check_gguf_tokenizer(tok, gemma3_270m_gguf)  # Runs the check for sure.
  model = model_lib.Transformer(config, scan_layers=True)
  params = checkpoints.load_params(gemma3_270m_gguf, config=config,
                                   shapes=model_lib.param_shapes(model))
  assert jax.tree.leaves(params)[0].dtype == np.float32
  assert parsed == [os.path.realpath(gemma3_270m_gguf)]
