"""Tokenizers: the byte tokenizer, the guard against wrongly converted GGUF vocabularies (run once
per tokenizer cache), and the cache run by `tokenizers` itself against transformers."""

import json
import os
import shutil

import pytest

from gemma_sft_jax.weights import tokenizer as tokenizer_lib

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(tokenizer_lib.__file__)), 'assets',
                      'gsm8k_sample')


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


@pytest.fixture
def gguf_copy(gemma3_270m_gguf, tmp_path):
  """The 270M GGUF (a link) with a copy of its tokenizer cache, in a directory of the test's own."""
  tokenizer_lib.load_tokenizer(gemma3_270m_gguf)  # Builds the cache if this machine has none.
  path = tmp_path / 'model.gguf'
  path.symlink_to(gemma3_270m_gguf)
  cache = tmp_path / 'model.gguf.tokenizer'
  cache.mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(gemma3_270m_gguf + '.tokenizer', name), cache / name)
  return str(path)


def _counting_checks(monkeypatch):
  calls = []
  check = tokenizer_lib.check_gguf_tokenizer
  monkeypatch.setattr(tokenizer_lib, 'check_gguf_tokenizer',
                      lambda tok, path: calls.append(path) or check(tok, path))
  return calls


@pytest.mark.slow
def test_gguf_tokenizer_cache_is_checked_once(gguf_copy, monkeypatch):
  calls = _counting_checks(monkeypatch)
  tokenizer_lib.load_tokenizer(gguf_copy)
  assert calls == [gguf_copy] and os.path.exists(gguf_copy + '.tokenizer/checked.json')
  tok = tokenizer_lib.load_tokenizer(gguf_copy)
  assert calls == [gguf_copy]  # The stamp of the passed check stands.
  assert tok.encode('Question', add_special_tokens=False) == [14977]


@pytest.mark.slow
def test_broken_gguf_tokenizer_cache_is_refused(gguf_copy, monkeypatch):
  tokenizer_lib.load_tokenizer(gguf_copy)  # Passes, and records it.
  # Break the cache as a wrong conversion would: 'Question' no longer maps to its own id.
  file = gguf_copy + '.tokenizer/tokenizer.json'
  with open(file) as f:
    data = json.load(f)
  vocab = data['model']['vocab']
  vocab['Question'], vocab['Answer'] = vocab['Answer'], vocab['Question']
  with open(file, 'w') as f:
    json.dump(data, f)
  calls = _counting_checks(monkeypatch)
  for _ in range(2):  # The stale stamp does not vouch for the changed file, nor a failed check.
    with pytest.raises(ValueError, match="encodes 'Question' as \\["):
      tokenizer_lib.load_tokenizer(gguf_copy)
  assert len(calls) == 2


@pytest.mark.slow
def test_json_tokenizer_equals_transformers(gemma3_270m_gguf):
  """The cache run by `tokenizers` directly == transformers' AutoTokenizer on the same files."""
  import transformers  # pylint: disable=g-import-not-at-top

  ours = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  assert isinstance(ours, tokenizer_lib.JsonTokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(gemma3_270m_gguf + '.tokenizer')
  assert (len(ours), ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
      (len(theirs), theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
  texts = []
  for split in ('train', 'test'):
    with open(os.path.join(SAMPLE, f'{split}.jsonl')) as f:
      texts += [row['question'] + '\n' + row['answer'] for row in map(json.loads, f)]
  texts += ['', ' ', '  two  spaces\n\n\ttab', '€ 1,000.50 <<2*3=6>>', '<eos> <bos>text<pad>']
  for text in texts:
    for special in (False, True):
      ids = ours.encode(text, add_special_tokens=special)
      assert ids == theirs.encode(text, add_special_tokens=special), text
      for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == \
            theirs.decode(ids, skip_special_tokens=skip), text
  assert ours.encode('Question') == theirs.encode('Question')  # Both add BOS by default.
