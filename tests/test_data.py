"""Tests for gemma_sft_jax.training.data: masks, packing, shuffling, resumable per-process batches."""

import json
import logging
import textwrap

import jax
import numpy as np
import pytest

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.training import data
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import run_on_cpu_devices

BOS, EOS, PAD = 2, 1, 0
TOK = tokenizer_lib.load_tokenizer('byte')


def ids(text):
  return [b + 3 for b in text.encode()]  # The byte tokenizer's ids.


def test_tokenize_example_exact_mask():
  tokens, mask = data.tokenize_example('Q?', ' 7', tokenizer=TOK)
  np.testing.assert_array_equal(tokens, [BOS] + ids('Q?') + ids(' 7') + [EOS])
  np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1])
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert data.tokenize_prompt('Q?', tokenizer=TOK) == [BOS] + ids('Q?')


class _BosAlwaysTokenizer(tokenizer_lib.ByteTokenizer):
  """A tokenizer that ignores add_special_tokens=False and prepends BOS anyway."""

  def encode(self, text, add_special_tokens=False):
    return super().encode(text, add_special_tokens=True)


def test_exactly_one_bos_even_if_tokenizer_adds_one():
  tokens, mask = data.tokenize_example('Q?', ' 7', tokenizer=_BosAlwaysTokenizer())
  np.testing.assert_array_equal(tokens, [BOS] + ids('Q? 7') + [EOS])
  assert (tokens == BOS).sum() == 1 and mask.sum() == 3


def _examples(pairs):
  out = data.TokenizedExamples([], [])
  for prompt, target in pairs:
    t, m = data.tokenize_example(prompt, target, tokenizer=TOK)
    out.tokens.append(t)
    out.loss_masks.append(m)
  return out


def test_build_batch_packed_row_literal():
  ex = _examples([('Q?', ' 7'), ('A', ' 12')])
  batch = data.build_batch(ex, [np.array([0, 1])], seq_len=12, pad_id=PAD)
  q, m = ids('Q'), ids('?')[0]
  sp, seven = ids(' 7')
  a = ids('A')[0]
  one, two = ids('12')
  expect_inputs = [BOS, q[0], m, sp, seven, BOS, a, sp, one, two, PAD, PAD]
  expect_targets = [q[0], m, sp, seven, EOS, a, sp, one, two, EOS, PAD, PAD]
  np.testing.assert_array_equal(batch['inputs'][0], expect_inputs)
  np.testing.assert_array_equal(batch['targets'][0], expect_targets)
  np.testing.assert_array_equal(batch['weights'][0], [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch['segment_ids'][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(batch['positions'][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
  assert {k: v.dtype for k, v in batch.items()} == {
      'inputs': np.int32, 'targets': np.int32, 'weights': np.float32, 'segment_ids': np.int32,
      'positions': np.int32}


def _check_batch_invariants(batch, bos=BOS, eos=EOS):
  seg, pos = batch['segment_ids'], batch['positions']
  for r in range(seg.shape[0]):
    for t in range(seg.shape[1]):
      if seg[r, t] == 0:  # Padding: nothing to learn, at the end of the row only.
        assert batch['weights'][r, t] == 0 and (seg[r, t:] == 0).all()
        continue
      start = t == 0 or seg[r, t - 1] != seg[r, t]
      assert pos[r, t] == (0 if start else pos[r, t - 1] + 1)
      if start:
        assert batch['inputs'][r, t] == bos  # One BOS per segment, at its first position.
      else:
        assert batch['inputs'][r, t] != bos
      last = t + 1 == seg.shape[1] or seg[r, t + 1] != seg[r, t]
      if last:  # The end of a segment predicts EOS, never the next segment's BOS.
        assert batch['targets'][r, t] == eos and batch['weights'][r, t] == 1
      else:
        assert batch['targets'][r, t] == batch['inputs'][r, t + 1]


def _toy_examples(n, seed=0):
  rng = np.random.default_rng(seed)
  pairs = [(f'Q{i}' + 'x' * int(rng.integers(0, 12)), f' {i}' + 'y' * int(rng.integers(0, 8)))
           for i in range(n)]
  return _examples(pairs)


def test_packed_batches_keep_segments_apart():
  ex = _toy_examples(40)
  it = data.BatchIterator(ex, global_batch_size=4, seq_len=48, seed=3, pad_id=PAD)
  total_weight = 0.0
  for _ in range(len(it.rows(0)) // 4):
    batch = next(it)
    _check_batch_invariants(batch)
    assert batch['segment_ids'].max() >= 2  # Really packed.
    total_weight += batch['weights'].sum()
  # Over full batches of epoch 0 the weight mass equals answer tokens + EOS of those examples.
  rows = it.rows(0)[:len(it.rows(0)) // 4 * 4]
  assert total_weight == sum(ex.loss_masks[i][1:].sum() for row in rows for i in row)


def test_padded_mode_is_one_example_per_row():
  ex = _toy_examples(10)
  batch = next(data.BatchIterator(ex, global_batch_size=5, seq_len=32, seed=0, packing=False))
  assert batch['segment_ids'].max() == 1
  _check_batch_invariants(batch)
  assert (batch['weights'][batch['segment_ids'] == 0] == 0).all()


def test_pack_rows_first_fit():
  rows = data.pack_rows(np.array([5, 4, 3, 2, 6]), seq_len=8)
  assert [r.tolist() for r in rows] == [[0, 2], [1, 3], [4]]
  rows = data.pack_rows(np.array([5, 4, 3]), seq_len=8, packing=False)
  assert [r.tolist() for r in rows] == [[0], [1], [2]]
  with pytest.raises(data.DataError, match='lengths'):
    data.pack_rows(np.array([9]), seq_len=8)


def test_epoch_covers_every_example_once_with_seeded_order():
  lengths = np.random.default_rng(0).integers(1, 30, size=100)
  rows0 = data.epoch_rows(lengths, seq_len=64, seed=1, epoch=0)
  assert sorted(np.concatenate(rows0).tolist()) == list(range(100))
  assert all(lengths[r].sum() <= 64 for r in rows0)
  same = data.epoch_rows(lengths, seq_len=64, seed=1, epoch=0)
  assert all((a == b).all() for a, b in zip(rows0, same)) and len(rows0) == len(same)
  flat = lambda rows: np.concatenate(rows).tolist()
  assert flat(rows0) != flat(data.epoch_rows(lengths, seq_len=64, seed=1, epoch=1))
  assert flat(rows0) != flat(data.epoch_rows(lengths, seq_len=64, seed=2, epoch=0))


def test_too_long_examples_are_dropped_and_counted(caplog):
  examples = [gsm8k.Example(question='q' * n, answer=f'a\n#### {n}', gold=str(n))
              for n in (5, 50, 10, 80)]
  with caplog.at_level(logging.WARNING):
    tok = data.tokenize_examples(examples, tokenizer=TOK, seq_len=40)
  assert tok.dropped == 2 and len(tok) == 2 and 'dropped 2 of 4' in caplog.text
  assert (tok.lengths <= 40).all()
  # The limit is inclusive: an example needing exactly seq_len positions is kept.
  need = int(data.tokenize_examples(examples[:1], tokenizer=TOK).lengths[0])
  assert data.tokenize_examples(examples[:1], tokenizer=TOK, seq_len=need).dropped == 0
  assert data.tokenize_examples(examples[:1], tokenizer=TOK, seq_len=need - 1).dropped == 1
  with pytest.raises(data.DataError, match='no training examples'):
    data.make_train_iterator(examples, tokenizer=TOK, seq_len=8, global_batch_size=2, seed=0)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('packing', [True, False])
def test_resume_equals_uninterrupted(packing):
  ex = _toy_examples(23)
  make = lambda: data.BatchIterator(ex, global_batch_size=4, seq_len=40, seed=5, packing=packing)
  straight = _take(make(), 30)
  first = make()
  head = _take(first, 11)
  saved = json.loads(json.dumps(first.state()))  # As it goes through a checkpoint.
  resumed = make()
  resumed.restore(saved)
  _assert_batches_equal(head + _take(resumed, 19), straight)
  assert resumed.epoch >= 2  # The comparison crossed epoch boundaries.
  assert first.state() == saved and set(saved) == {'epoch', 'row'}


def test_same_seed_same_batches_other_seed_other_batches():
  ex = _toy_examples(23)
  make = lambda seed: data.BatchIterator(ex, global_batch_size=4, seq_len=40, seed=seed)
  _assert_batches_equal(_take(make(0), 8), _take(make(0), 8))
  a, b = next(make(0)), next(make(1))
  assert not np.array_equal(a['inputs'], b['inputs'])


def test_restore_rejects_bad_state():
  it = data.BatchIterator(_toy_examples(5), global_batch_size=2, seq_len=40, seed=0)
  with pytest.raises(data.DataError, match="'epoch' and 'row'"):
    it.restore({'step': 3})
  with pytest.raises(data.DataError, match='outside'):
    it.restore({'epoch': 0, 'row': 10_000})


def test_two_processes_get_disjoint_slices_of_the_global_batch():
  ex = _toy_examples(31)
  kw = dict(global_batch_size=6, seq_len=40, seed=2)
  whole = data.BatchIterator(ex, **kw)
  procs = [data.BatchIterator(ex, process_index=p, process_count=2, **kw) for p in range(2)]
  for _ in range(12):  # Several epochs.
    g = next(whole)
    local = [next(p) for p in procs]
    assert all(l['inputs'].shape == (3, 40) for l in local)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([l[k] for l in local]), g[k])
    assert procs[0].state() == procs[1].state() == whole.state()
  # Disjoint: the rows of one global batch are distinct stream rows, split 3 + 3.
  rows = whole.rows(0)[:6]
  assert len({tuple(r) for r in rows}) == 6
  with pytest.raises(data.DataError, match='multiple'):
    data.BatchIterator(ex, global_batch_size=5, seq_len=40, seed=0, process_count=2)


def test_to_global_array_on_cpu():
  n = len(jax.devices())
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  it = data.BatchIterator(_toy_examples(20), global_batch_size=2 * n, seq_len=40, seed=0)
  local = next(it)
  arrays = data.to_global_array(local, sharding)
  assert arrays.keys() == local.keys()
  for k, v in arrays.items():
    assert v.shape == local[k].shape and v.dtype == local[k].dtype and v.sharding == sharding
    np.testing.assert_array_equal(np.asarray(v), local[k])


def test_to_global_array_shards_rows_over_4_cpu_devices():
  # A fresh interpreter: the device count is fixed when JAX starts.
  code = textwrap.dedent('''
    import numpy as np, jax
    from gemma_sft_jax.training import data
    from gemma_sft_jax.weights import tokenizer
    from tests.test_data import _toy_examples
    assert len(jax.devices()) == 4
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    local = next(data.BatchIterator(_toy_examples(20), global_batch_size=8, seq_len=40, seed=0))
    out = data.to_global_array(local, sharding)
    for k, v in out.items():
      assert v.shape == (8, 40), v.shape
      for shard in v.addressable_shards:
        rows = shard.index[0]
        assert shard.data.shape == (2, 40)
        np.testing.assert_array_equal(np.asarray(shard.data), local[k][rows])
    print('OK', len(out))
  ''')
  proc = run_on_cpu_devices(code, 4, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == 'OK 5'


def test_make_train_iterator_on_local_gsm8k(gsm8k_dir):
  train = gsm8k.load_split(gsm8k_dir, 'main', 'train')[:64]
  it = data.make_train_iterator(train, tokenizer=TOK, seq_len=1024, global_batch_size=4, seed=0)
  batch = next(it)
  assert batch['inputs'].shape == (4, 1024)
  _check_batch_invariants(batch)
  # Decoding a row's supervised targets gives back whole targets, each closed by EOS.
  row = it.rows(0)[0]
  text = TOK.decode(batch['targets'][0][batch['weights'][0] == 1])
  want = ''.join(gsm8k.format_target(train[i].answer) for i in row)
  assert text == want and '<<' not in text and text.count('####') == len(row)
  assert (batch['targets'][0][batch['weights'][0] == 1] == EOS).sum() == len(row)


def test_token_stats_are_consistent():
  examples = [gsm8k.Example(question='q' * n, answer=f'a\n#### {n}', gold=str(n))
              for n in range(1, 41)]
  stats = data.token_stats(examples, tokenizer=TOK, seq_lens=(32, 128), epochs=2)
  lengths = [len('Question: ' + 'q' * n + '\nAnswer: a\n#### ' + str(n)) for n in range(1, 41)]
  assert stats['num_examples'] == 40
  assert stats['prompt_target_tokens']['min'] == min(lengths)
  assert stats['prompt_target_tokens']['max'] == max(lengths)
  s32, s128 = stats['seq_len'][32], stats['seq_len'][128]
  assert s32['too_long'] == sum(l + 1 > 32 for l in lengths) and s128['too_long'] == 0
  assert s128['padded']['rows_per_epoch'] == 40
  assert s128['packed']['rows_per_epoch'] < 40
  assert 0 < s128['padded']['non_pad_fraction'] < s128['packed']['non_pad_fraction'] <= 1
  assert s128['packed']['supervised_fraction'] < s128['packed']['non_pad_fraction']


def test_real_gemma3_tokenizer_masks(gemma3_270m_gguf, gsm8k_dir):
  """The Gemma 3 tokenizer: one BOS, mask = target + EOS, separate == joint encoding."""
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  train = gsm8k.load_split(gsm8k_dir, 'main', 'train')[:100]
  for ex in train:
    prompt = gsm8k.format_prompt(ex.question)
    target = gsm8k.format_target(ex.answer)
    tokens, mask = data.tokenize_example(prompt, target, tokenizer=tok)
    assert tokens[0] == tok.bos_token_id and (tokens == tok.bos_token_id).sum() == 1
    assert tokens[-1] == tok.eos_token_id and mask[-1] and not mask[0]
    n_prompt = len(data.tokenize_prompt(prompt, tokenizer=tok))
    assert not mask[:n_prompt].any() and mask[n_prompt:].all()
    assert tok.decode(tokens[mask][:-1]) == target
    # For Gemma 3 the boundary after 'Answer:' is also a boundary of the joint encoding, so the
    # separately encoded training sequence is what the model sees in running text.
    joint = tok.encode(prompt + target, add_special_tokens=False)
    assert tokens[1:-1].tolist() == joint
  it = data.make_train_iterator(train, tokenizer=tok, seq_len=512, global_batch_size=2, seed=0)
  batch = next(it)
  _check_batch_invariants(batch, bos=tok.bos_token_id, eos=tok.eos_token_id)
