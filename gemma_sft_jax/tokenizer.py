"""Tokenizers: the checkpoint's own (transformers AutoTokenizer, or built from a GGUF) and a byte tokenizer.

Everything downstream uses only this small surface, which transformers tokenizers already have:
`encode(text, add_special_tokens=False) -> list[int]`, `decode(ids, skip_special_tokens=True) -> str`,
`bos_token_id`, `eos_token_id`, `pad_token_id`, and `len(tokenizer)`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

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


# Words that are single tokens in Gemma's vocabulary; a correct tokenizer encodes each as one id.
_PROBES = ('Question', 'Answer', ' the', ' number', ' total')


def check_gguf_tokenizer(tok: Any, path: str) -> None:
  """Fails if `tok` splits words that the GGUF vocabulary holds as single tokens.

  Some transformers releases (seen with 5.17) rebuild the merges of a GGUF's SentencePiece
  vocabulary wrongly: 'Question' becomes three pieces and GSM8K prompts grow ~3.9x (0-shot:
  66.5 -> 258.9 tokens), which quietly degrades every number measured with that tokenizer. Catch
  it here instead.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  field = gguf.GGUFReader(path).fields['tokenizer.ggml.tokens']
  vocab = {bytes(field.parts[i]).decode('utf-8', errors='replace'): n
           for n, i in enumerate(field.data)}
  for word in _PROBES:
    piece = word.replace(' ', '\u2581')
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


def _gguf_tokenizer(path: str) -> Any:
  """Builds the tokenizer stored in a GGUF file, cached as HF files beside it (building takes ~30 s).

  The cache is plain tokenizer.json: any transformers release reads it, so a cache built where the
  conversion is right can be copied next to the GGUF on a machine where it is not.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  cache = path + '.tokenizer'
  if os.path.isdir(cache):
    tok = transformers.AutoTokenizer.from_pretrained(cache)
    check_gguf_tokenizer(tok, path)
    return tok
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path) or '.',
                                                   gguf_file=os.path.basename(path))
  check_gguf_tokenizer(tok, path)
  try:
    tok.save_pretrained(cache)
  except OSError:
    pass  # A read-only location only costs the rebuild next time.
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
