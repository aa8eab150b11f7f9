"""The files an export writes: streamed safetensors, a transformers model directory, a PEFT
adapter directory, a GGUF file, and the tokenizer as files or as a GGUF vocabulary.

Every writer takes a list of `Tensor`s, each fetched when its turn comes (exporters.py fetches
them off the mesh one at a time), and a path that is None on processes other than 0: those only
take part in the fetches, which are collective on several hosts.

  hf    config.json (Gemma 2 / Gemma 3 text, from our ModelConfig), safetensors (sharded with an
        index above a size), generation_config.json and the tokenizer files.
  peft  adapter_config.json + adapter_model.safetensors (names and layout: peft_adapters.py).
  gguf  llama.cpp's names (checkpoints.gguf_name), norms stored as 1 + w, the architecture keys
        its Gemma 2 / Gemma 3 converter writes, float32, or bfloat16/float16 for every tensor of
        two or more dimensions (norms stay float32, as that converter keeps them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import struct
from typing import Any, Callable, NamedTuple

import gguf
import numpy as np

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.weights import gguf_file
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import peft_adapters
from gemma_sft_jax.weights import tokenizer as tokenizer_lib

_SAFETENSORS_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}
_GGUF_TYPES = {'float32': (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
               'bfloat16': (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
               'float16': (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16)}
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model',
                    'special_tokens_map.json', 'added_tokens.json', 'chat_template.jinja')


class Tensor(NamedTuple):
  """One tensor to write: its name and shape in the output format, and how to get it."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]  # Collective: every process calls it, in the same order.


# ----------------------------------------------------------------------------------------------
# Safetensors, streamed (safetensors' writers take every tensor at once).
# ----------------------------------------------------------------------------------------------
def write_safetensors(directory: str | None, tensors: list[Tensor], *, stem: str,
                      max_shard_bytes: float, is_main: bool) -> list[str]:
  """Writes `tensors` as STEM.safetensors, or as STEM-0000k-of-0000n shards with
  STEM.safetensors.index.json once they exceed `max_shard_bytes`; returns the file names."""
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    n = math.prod(t.shape) * t.dtype.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  names = ([f'{stem}.safetensors'] if len(shards) == 1 else
           [f'{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))])
  for name, shard in zip(names, shards):
    header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
    offset = 0
    for t in shard:
      n = math.prod(t.shape) * t.dtype.itemsize
      header[t.name] = {'dtype': _SAFETENSORS_DTYPES[t.dtype.name], 'shape': list(t.shape),
                        'data_offsets': [offset, offset + n]}
      offset += n
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # The format aligns the data to 8 bytes.
    with (open(os.path.join(directory, name), 'wb') if is_main else contextlib.nullcontext()) as f:
      if f:
        f.write(struct.pack('<Q', len(blob)) + blob)
      for t in shard:
        array = t.fetch()
        if f:
          f.write(np.ascontiguousarray(array).view(np.uint8).data)
        del array
  if len(names) > 1 and is_main:
    index = {'metadata': {'total_size': sum(math.prod(t.shape) * t.dtype.itemsize
                                            for t in tensors)},
             'weight_map': {t.name: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(directory, f'{stem}.safetensors.index.json'), 'w') as f:
      json.dump(index, f, indent=2)
  return names


# ----------------------------------------------------------------------------------------------
# Tokenizers: files for transformers, a vocabulary for GGUF.
# ----------------------------------------------------------------------------------------------
def _byte_pieces(vocab_size: int) -> list[str]:
  """The byte tokenizer as SentencePiece-style pieces: pad, eos, bos, then byte b at id b + 3 as
  <0xXX> (what byte fallback encodes text into), but the space byte as '▁': SentencePiece
  readers (llama.cpp, transformers' GGUF tokenizer) turn every space into that character before
  looking pieces up, so a space stays one token, as the byte tokenizer has it."""
  pieces = ['<pad>', '<eos>', '<bos>']
  pieces += ['▁' if b == 0x20 else f'<0x{b:02X}>' for b in range(256)]
  if vocab_size > len(pieces):
    pieces.append('<unk>')
  return pieces + [f'<unused{k}>' for k in range(vocab_size - len(pieces))]


def _files_dir(tok: Any, source: str) -> str | None:
  """Where the tokenizer's own files are: a JsonTokenizer's directory (a GGUF's cached
  tokenizer), or the HF directory it was loaded from."""
  if getattr(tok, 'directory', None):
    return tok.directory
  if os.path.isdir(source) and any(os.path.exists(os.path.join(source, f))
                                   for f in _TOKENIZER_FILES):
    return source
  return None


def write_tokenizer_files(tok: Any, directory: str, *, source: str, vocab_size: int) -> None:
  """The tokenizer as files transformers' AutoTokenizer (and our JsonTokenizer) read.

  Args:
    tok: the loaded tokenizer.
    directory: where to write (created if missing).
    source: what it was loaded from (model.tokenizer, or the resolved checkpoint); its files,
      tokenizer.model included, are copied as they are.
    vocab_size: the model's vocabulary (the byte tokenizer's files cover all of it).
  """
  os.makedirs(directory, exist_ok=True)
  files = _files_dir(tok, source)
  if isinstance(tok, tokenizer_lib.ByteTokenizer):
    import tokenizers  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    pieces = _byte_pieces(vocab_size)
    model = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={piece: i for i, piece in enumerate(pieces)}, merges=[], byte_fallback=True,
        unk_token='<unk>' if '<unk>' in pieces else None))
    model.normalizer = tokenizers.normalizers.Replace(' ', '▁')
    model.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace('▁', ' '), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse()])
    model.post_processor = tokenizers.processors.TemplateProcessing(
        single='<bos> $A', pair='<bos> $A <bos> $B', special_tokens=[('<bos>', tok.bos_token_id)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token='<bos>', eos_token='<eos>', pad_token='<pad>',
        unk_token='<unk>' if '<unk>' in pieces else None).save_pretrained(directory)
  elif files:
    for name in _TOKENIZER_FILES:
      if os.path.exists(os.path.join(files, name)):
        shutil.copy(os.path.join(files, name), directory)
  elif hasattr(tok, 'save_pretrained'):
    tok.save_pretrained(directory)
  else:
    raise ValueError(f'tokenizer {source!r}: no files to export it with')


def _tokenizer_json_vocab(file: str) -> list[tuple[str, float, gguf.TokenType]]:
  """SentencePiece-style pieces, scores and types of a byte-fallback BPE tokenizer.json.

  llama.cpp merges the adjacent pair whose merged piece scores highest, so a piece's score is
  minus the rank of the first merge that makes it: the order BPE applies its merges in.
  """
  with open(file) as f:
    spec = json.load(f)
  model = spec['model']
  if model.get('type') != 'BPE' or not model.get('byte_fallback'):
    raise ValueError(f'--format=gguf: {file} is not a byte-fallback BPE tokenizer and there is '
                     'no tokenizer.model (SentencePiece) beside it')
  rank: dict[str, int] = {}
  for r, merge in enumerate(model.get('merges') or []):
    a, b = merge.split(' ', 1) if isinstance(merge, str) else merge
    rank.setdefault(a + b, r)
  pieces = {i: piece for piece, i in model['vocab'].items()}
  special = set()
  for t in spec.get('added_tokens') or []:
    pieces[t['id']] = t['content']
    if t.get('special'):
      special.add(t['id'])
  out = []
  for i in range(max(pieces) + 1):
    piece = pieces.get(i, f'[PAD{i}]')
    kind = (gguf.TokenType.CONTROL if i in special else
            gguf.TokenType.UNUSED if i not in pieces else
            gguf.TokenType.UNKNOWN if piece == model.get('unk_token') else
            gguf.TokenType.BYTE if re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', piece) else
            gguf.TokenType.NORMAL)
    out.append((piece, -float(rank[piece]) if piece in rank else 0.0, kind))
  return out


def _gguf_vocab(writer: gguf.GGUFWriter, tok: Any, source: str, vocab_size: int,
                scratch: str) -> None:
  """Adds the tokenizer.* metadata llama.cpp builds Gemma's tokenizer from.

  A GGUF checkpoint's own vocabulary is copied as it is. Otherwise the tokenizer's files give it:
  its SentencePiece model (tokenizer.model), as llama.cpp's converter reads Gemma's, or else a
  byte-fallback BPE tokenizer.json (the byte tokenizer's files are one).
  """
  if source.endswith('.gguf'):
    for key, value in gguf_file.read(source).fields.items():
      if key.startswith('tokenizer.'):
        _add_field(writer, key, value)
    return
  write_tokenizer_files(tok, scratch, source=source, vocab_size=vocab_size)
  if os.path.exists(os.path.join(scratch, 'tokenizer.model')):
    tokens = list(gguf.vocab.SentencePieceVocab(pathlib.Path(scratch)).all_tokens())
  else:
    tokens = _tokenizer_json_vocab(os.path.join(scratch, 'tokenizer.json'))
  if len(tokens) > vocab_size:
    raise ValueError(f'--format=gguf: the tokenizer has {len(tokens)} tokens, the model '
                     f'{vocab_size}')
  # Rows of the embedding past the tokenizer's vocabulary, as llama.cpp's converter pads them.
  tokens += [(f'[PAD{k}]', -1000.0, gguf.TokenType.UNUSED) for k in range(len(tokens), vocab_size)]
  writer.add_tokenizer_model('llama')
  writer.add_tokenizer_pre('default')
  writer.add_token_list([t for t, _, _ in tokens])
  writer.add_token_scores([s for _, s, _ in tokens])
  writer.add_token_types([int(t) for _, _, t in tokens])
  special = gguf.SpecialVocab(pathlib.Path(scratch), load_merges=False, n_vocab=vocab_size)
  for kind in ('bos', 'eos', 'pad'):  # The ids the tokenizer we run uses, where files are silent.
    if getattr(tok, f'{kind}_token_id', None) is not None:
      special.special_token_ids.setdefault(kind, getattr(tok, f'{kind}_token_id'))
  special.add_special_token.setdefault('bos', True)  # Prompts start with BOS (training/data.py).
  special.add_to_gguf(writer, quiet=True)
  writer.add_add_space_prefix(False)


def _add_field(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
  """Writes back a field gguf_file read (the types GGUF tokenizer metadata uses)."""
  vtype = gguf.GGUFValueType
  if isinstance(value, (gguf_file.Strings, list)):
    writer.add_array(key, list(value))
  elif isinstance(value, np.ndarray):
    sub = {np.dtype(np.float32): vtype.FLOAT32, np.dtype(np.int32): vtype.INT32,
           np.dtype(np.uint32): vtype.UINT32, np.dtype(np.bool_): vtype.BOOL}[value.dtype]
    writer.add_key_value(key, value.tolist(), vtype.ARRAY, sub_type=sub)
  elif isinstance(value, bool):
    writer.add_bool(key, value)
  elif isinstance(value, int):
    writer.add_uint32(key, value)  # Token ids.
  elif isinstance(value, float):
    writer.add_float32(key, value)
  else:
    writer.add_string(key, value)


# ----------------------------------------------------------------------------------------------
# The three formats.
# ----------------------------------------------------------------------------------------------
def hf_config(config: architecture.ModelConfig, *, dtype: str, context_length: int | None) -> Any:
  """transformers' config of our architecture (Gemma2Config / Gemma3TextConfig)."""
  import transformers  # pylint: disable=g-import-not-at-top
  extra = {'max_position_embeddings': context_length} if context_length else {}
  return transformers.AutoConfig.for_model(**config.to_hf_dict(), dtype=dtype, **extra)


def write_hf(directory: str | None, tensors: list[Tensor], *, config: architecture.ModelConfig,
             dtype: str, context_length: int | None, tok: Any, tokenizer_source: str,
             max_shard_bytes: int) -> None:
  """A transformers model directory; `directory` None on processes other than 0."""
  if directory:
    import transformers  # pylint: disable=g-import-not-at-top
    os.mkdir(directory)
    model_config = hf_config(config, dtype=dtype, context_length=context_length)
    model_config.save_pretrained(directory)
    transformers.GenerationConfig.from_model_config(model_config).save_pretrained(directory)
    write_tokenizer_files(tok, directory, source=tokenizer_source, vocab_size=config.vocab_size)
  write_safetensors(directory, tensors, stem='model', max_shard_bytes=max_shard_bytes,
                    is_main=bool(directory))


def write_peft(directory: str | None, tensors: list[Tensor], *, kernels: list[str],
               spec: lora.LoraSpec, base: str, num_layers: int) -> None:
  """A PEFT adapter directory (one safetensors file: PEFT reads no shards)."""
  if directory:
    os.mkdir(directory)
    with open(os.path.join(directory, peft_adapters.CONFIG_FILE), 'w') as f:
      json.dump(peft_adapters.adapter_config(spec, kernels, base=base, num_layers=num_layers), f,
                indent=2)
  write_safetensors(directory, tensors, stem=peft_adapters.WEIGHTS_FILE[:-len('.safetensors')],
                    max_shard_bytes=math.inf, is_main=bool(directory))


def gguf_metadata(c: architecture.ModelConfig, *, context_length: int
                  ) -> list[tuple[str, Any, gguf.GGUFValueType]]:
  """The architecture keys llama.cpp reads for Gemma 2 / Gemma 3 (what its converter writes)."""
  arch, u32, f32 = c.family, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
  fields = [(f'{arch}.context_length', context_length, u32),
            (f'{arch}.embedding_length', c.embed_dim, u32),
            (f'{arch}.block_count', c.num_layers, u32),
            (f'{arch}.feed_forward_length', c.hidden_dim, u32),
            (f'{arch}.attention.head_count', c.num_heads, u32),
            (f'{arch}.attention.head_count_kv', c.num_kv_heads, u32),
            (f'{arch}.attention.key_length', c.head_dim, u32),
            (f'{arch}.attention.value_length', c.head_dim, u32),
            (f'{arch}.attention.layer_norm_rms_epsilon', c.rms_norm_eps, f32),
            (f'{arch}.rope.freq_base', c.rope_base_global, f32)]
  if c.sliding_window is not None:
    fields.append((f'{arch}.attention.sliding_window', c.sliding_window, u32))
  if c.attn_logit_softcap is not None:
    fields.append((f'{arch}.attn_logit_softcapping', c.attn_logit_softcap, f32))
  if c.final_logit_softcap is not None:
    fields.append((f'{arch}.final_logit_softcapping', c.final_logit_softcap, f32))
  if c.rope_scale_global != 1.0:
    fields += [(f'{arch}.rope.scaling.type', 'linear', gguf.GGUFValueType.STRING),
               (f'{arch}.rope.scaling.factor', c.rope_scale_global, f32)]
  return fields


def _check_gguf_describes(c: architecture.ModelConfig, fields: list[tuple[str, Any, Any]]) -> None:
  """GGUF leaves some of Gemma to the reader (the query scale, the layer pattern, the local RoPE
  base): what the metadata reads back as (llama.cpp's rules, which our loader follows) must be
  this model."""
  read = {k: float(np.float32(v)) if t == gguf.GGUFValueType.FLOAT32 else v for k, v, t in fields}
  read.update({'general.architecture': c.family, 'tokenizer.ggml.tokens': range(c.vocab_size)})
  back = checkpoints.config_from_gguf_fields(read, '--format=gguf')
  for field in dataclasses.fields(c):
    ours, theirs = getattr(c, field.name), getattr(back, field.name)
    if ours != theirs:
      raise ValueError(f'--format=gguf cannot describe this model: its {field.name} is {ours!r}, '
                       f'a GGUF reader (llama.cpp, transformers, ours) takes {theirs!r}; export '
                       '--format=hf instead')


def write_gguf(file: str | None, tensors: list[Tensor], *, config: architecture.ModelConfig,
               dtype: str, context_length: int, tok: Any, tokenizer_source: str,
               name: str) -> None:
  """A GGUF file; `file` None on processes other than 0."""
  fields = gguf_metadata(config, context_length=context_length)
  _check_gguf_describes(config, fields)
  writer = None
  if file:
    writer = gguf.GGUFWriter(file, config.family)
    writer.add_name(name)
    writer.add_file_type(_GGUF_TYPES[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype in fields:
      writer.add_key_value(key, value, vtype)
    _gguf_vocab(writer, tok, tokenizer_source, config.vocab_size, file + '.tokenizer')
    for t in tensors:
      writer.add_tensor_info(checkpoints.gguf_name(t.name), t.shape, t.dtype,
                             math.prod(t.shape) * t.dtype.itemsize,
                             raw_dtype=_GGUF_TYPES[t.dtype.name][0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
  for t in tensors:
    array = t.fetch()
    offset = checkpoints.gguf_norm_offset(checkpoints.gguf_name(t.name))
    if offset:
      array = array + np.asarray(offset, array.dtype)
    if writer:
      writer.write_tensor_data(array)
    del array
  if writer:
    writer.close()
