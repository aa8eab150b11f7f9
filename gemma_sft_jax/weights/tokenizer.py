"""Tokenizers: the checkpoint's own (transformers AutoTokenizer, or built from a GGUF) and a byte tokenizer.

Everything downstream uses only this small surface, which transformers tokenizers already have:
`encode(text, add_special_tokens=False) -> list[int]`, `decode(ids, skip_special_tokens=True) -> str`,
`bos_token_id`, `eos_token_id`, `pad_token_id`, and `len(tokenizer)`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging

from gemma_sft_jax.weights import gguf_file

# Ids of the byte tokenizer's special tokens; byte b is id b + _BYTE_OFFSET.
_PAD, _EOS, _BOS = 0, 1, 2
_BYTE_OFFSET = 3


class ByteTokenizer:
  """UTF-8 bytes as tokens (ids 3..258) plus pad=0, eos=1, bos=2 — Gemma's special-token ids.

  Used by the tiny random-init configs so that they need no files and no network.
  """

  pad_token_id = _PAD
  eos_token_id = _EOS
  bos_token_id = _BOS

  def __len__(self) -> int:
    return 256 + _BYTE_OFFSET

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = [b + _BYTE_OFFSET for b in text.encode('utf-8')]
    return [_BOS] + ids if add_special_tokens else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens  # Special tokens never decode to text here.
    data = bytes(int(i) - _BYTE_OFFSET for i in ids if int(i) >= _BYTE_OFFSET and int(i) < 259)
    return data.decode('utf-8', errors='replace')


class JsonTokenizer:
  """A saved HF tokenizer (tokenizer.json, tokenizer_config.json) run by `tokenizers` itself.

  The same tokenizer as transformers' AutoTokenizer on those files, without its ~4 s of start-up
  for a 262k vocabulary (it imports torch and parses the 33 MB JSON in Python before handing the
  vocabulary to `tokenizers`). `encode` adds special tokens by default, as transformers does.
  """

  def __init__(self, directory: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.directory = directory  # Its files travel with an exported model.
    self._tok = tokenizers.Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
    config = {}
    config_path = os.path.join(directory, 'tokenizer_config.json')
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)

    def special(name):
      token = config.get(name)
      token = token.get('content') if isinstance(token, dict) else token
      return self._tok.token_to_id(token) if token else None
    self.bos_token_id = special('bos_token')
    self.eos_token_id = special('eos_token')
    self.pad_token_id = special('pad_token')

  def __len__(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# Words that are single tokens in Gemma's vocabulary; a correct tokenizer encodes each as one id.
_PROBES = ('Question', 'Answer', ' the', ' number', ' total')
# In a GGUF tokenizer cache: the stamp of the files that last passed `check_gguf_tokenizer`.
_CHECKED = 'checked.json'


def check_gguf_tokenizer(tok: Any, path: str) -> None:
  """Fails if `tok` splits words that the GGUF vocabulary holds as single tokens.

  Some transformers releases (seen with 5.17) rebuild the merges of a GGUF's SentencePiece
  vocabulary wrongly: 'Question' becomes three pieces and GSM8K prompts grow ~3.9x (0-shot:
  66.5 -> 258.9 tokens), which quietly degrades every number measured with that tokenizer. Catch
  it here instead.
  """
  pieces = {word: word.replace(' ', '\u2581') for word in _PROBES}
  wanted = set(pieces.values())
  tokens = gguf_file.read(path).fields['tokenizer.ggml.tokens']
  vocab = {piece: n for n, piece in enumerate(tokens) if piece in wanted}
  for word, piece in pieces.items():
    if piece in vocab:
      got = list(tok.encode(word, add_special_tokens=False))
      if got != [vocab[piece]]:
        raise ValueError(
            f'{path}: the tokenizer transformers {_transformers_version()} built from this GGUF '
            f'encodes {word!r} as {got}, not as its vocabulary token {vocab[piece]}; build the '
            f"cache '{path}.tokenizer' with a transformers release that converts GGUF vocabularies "
            'correctly (5.24 does) or set model.tokenizer to a HF tokenizer directory')


def _transformers_version() -> str:
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.__version__


def _stamp(path: str, cache: str) -> dict[str, Any]:
  """What a passed check stands for: the GGUF, the cached vocabulary, the library that runs it."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  def file(p):
    st = os.stat(p)
    return [st.st_size, st.st_mtime_ns]
  return {'gguf': file(path), 'tokenizer.json': file(os.path.join(cache, 'tokenizer.json')),
          'tokenizers': tokenizers.__version__, 'probes': list(_PROBES)}


def _passed_check(path: str, cache: str) -> bool:
  try:
    with open(os.path.join(cache, _CHECKED)) as f:
      return json.load(f) == _stamp(path, cache)
  except (OSError, ValueError):
    return False


def _gguf_tokenizer(path: str) -> Any:
  """Builds the tokenizer stored in a GGUF file, cached as HF files beside it (building takes ~30 s).

  The cache is plain tokenizer.json: any transformers release reads it, so a cache built where the
  conversion is right can be copied next to the GGUF on a machine where it is not. Each cache is
  checked (`check_gguf_tokenizer`) once: the stamp of what passed is kept in it, and a changed
  GGUF, tokenizer.json or `tokenizers` release is checked again.
  """
  cache = path + '.tokenizer'
  if not os.path.isdir(cache):
    import transformers  # pylint: disable=g-import-not-at-top
    logging.info('building the tokenizer of %s from its GGUF vocabulary (once: cached in %s)',
                 path, cache)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path) or '.',
                                                     gguf_file=os.path.basename(path))
    check_gguf_tokenizer(tok, path)  # A broken conversion is never written.
    try:
      tok.save_pretrained(cache)
    except OSError:
      return tok  # A read-only location only costs the rebuild next time.
  logging.info('loading the tokenizer %s', cache)
  tok = JsonTokenizer(cache)
  if not _passed_check(path, cache):
    check_gguf_tokenizer(tok, path)
    marker = os.path.join(cache, _CHECKED)
    try:  # Renamed into place: processes starting together never read half a stamp.
      with open(f'{marker}.{os.getpid()}', 'w') as f:
        json.dump(_stamp(path, cache), f)
      os.replace(f'{marker}.{os.getpid()}', marker)
    except OSError:
      pass  # A read-only cache is checked on every load instead.
  return tok


def load_tokenizer(name: str | os.PathLike) -> Any:
  """Loads a tokenizer.

  Args:
    name: 'byte' for `ByteTokenizer`, a `.gguf` file, a local HF directory, or a hub id.

  Returns:
    An object with the surface described in the module docstring.
  """
  name = os.fspath(name)
  if name == 'byte':
    return ByteTokenizer()
  if name.endswith('.gguf'):
    if not os.path.isfile(name):
      raise FileNotFoundError(f'tokenizer: no such GGUF file: {name}')
    return _gguf_tokenizer(name)
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(name)
