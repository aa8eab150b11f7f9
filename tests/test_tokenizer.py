"""Tokenizers: the byte tokenizer, and the guard against wrongly converted GGUF vocabularies."""

import pytest

from gemma_sft_jax import tokenizer as tokenizer_lib


def test_byte_tokenizer_round_trip():
  tok = tokenizer_lib.load_tokenizer('byte')
  ids = tok.encode('Natalia sold 48/2 = 24 clips. €', add_special_tokens=True)
  assert ids[0] == tok.bos_token_id and min(ids[1:]) >= 3
  assert tok.decode(ids) == 'Natalia sold 48/2 = 24 clips. €'
  assert len(tok) == 259


@pytest.mark.slow
def test_gguf_tokenizer_is_checked(gemma3_270m_gguf):
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)  # Passes the check itself.
  assert tok.encode('Question', add_special_tokens=False) == [14977]

  class Splitting:
    """Mimics the broken conversion seen with transformers 5.17: 'Question' -> 3 pieces."""

    def encode(self, text, add_special_tokens=False):
      del add_special_tokens
      return [3285, 598, 526] if text == 'Question' else tok.encode(text, add_special_tokens=False)

  with pytest.raises(ValueError, match="encodes 'Question' as \\[3285, 598, 526\\]"):
    tokenizer_lib.check_gguf_tokenizer(Splitting(), gemma3_270m_gguf)
