"""Training batches for GSM8K SFT: tokenise, mask, pack, shuffle, slice per process.

Batch layout (numpy; shape [B, T], B = this process's rows, T = seq_len):

  inputs       int32    token ids the model reads (pad_id at padding)
  targets      int32    the token each position predicts: the next token of the same example
  weights      float32  1 where `targets` is an answer token or the EOS, else 0 (prompt, padding)
  segment_ids  int32    1..n for the n examples packed into the row, 0 = padding
  positions    int32    0, 1, 2, ... restarting at every example, 0 at padding

The model takes (inputs, positions, segment_ids) and attends only within a segment; the loss takes
(targets, weights). Example: prompt 'Q?' and target ' 7' with the byte tokenizer tokenise to
[BOS Q ? ␠ 7 EOS] and occupy one segment of 5 positions:

  inputs   BOS  Q   ?   ␠   7        targets  Q   ?   ␠   7   EOS
  weights   0   0   1   1   1        positions 0  1   2   3   4

Shifting inside each example *before* packing is what guarantees that no target crosses an example
boundary: an example's EOS is only ever a target, and the first token of the next segment is never
predicted from the previous one.

Tokenisation: [BOS] + encode(prompt) + encode(target) + [EOS], prompt and target encoded
separately. Encoding them separately makes the mask boundary exact (a joint encoding may merge
tokens across it), and makes the training prompt token for token what evaluation feeds the model
(`tokenize_prompt`, which encodes the prompt alone).

Length policy: an example needs len(tokens) - 1 positions (BOS + prompt + target as inputs,
prompt + target + EOS as targets). Examples that do not fit in seq_len are dropped, counted and
logged, never truncated: cutting the right end would teach the model solutions with no '#### N',
cutting the left end would drop the question.

Order: every epoch is a permutation of the examples from `np.random.default_rng((seed, epoch))`,
packed first-fit into rows (or one example per row when packing is off). Rows form one endless
stream over epochs 0, 1, 2, ...; global batch k is rows [k*B, (k+1)*B) of the stream, and process
p of n builds only rows [k*B + p*B/n, k*B + (p+1)*B/n). `BatchIterator.state()` is the position
in that stream ({'epoch', 'row'}), the same on every process; it belongs in the checkpoint. The
stream does not depend on B or n, so a run may resume with another batch size or process count.

Stats for docs/data.md:
  python -m gemma_sft_jax.training.data --stats --source=DIR_OR_HUB_ID --tokenizer=PATH.gguf
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from gemma_sft_jax.evaluation import gsm8k

DataError = gsm8k.DataError
BATCH_KEYS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')


# ---------------------------------------------------------------------------------------------
# Tokenisation.
# ---------------------------------------------------------------------------------------------


def _encode(text: str, tokenizer: Any) -> list[int]:
  ids = list(tokenizer.encode(text, add_special_tokens=False))
  # Some tokenizers add BOS regardless of add_special_tokens; the sequence must hold exactly one.
  if ids and ids[0] == tokenizer.bos_token_id:
    ids = ids[1:]
  return ids


def tokenize_prompt(prompt: str, *, tokenizer: Any) -> list[int]:
  """[BOS] + prompt tokens: what evaluation and decoding feed the model (same as in training)."""
  if tokenizer.bos_token_id is None:
    raise DataError('tokenizer has no bos_token_id')
  return [tokenizer.bos_token_id] + _encode(prompt, tokenizer)


def read_prompts(path: str) -> list[str]:
  """The prompts of a JSONL file of {"prompt": str} rows (blank lines skipped).

  Raises:
    ValueError: naming the file and line of a row that is not JSON or has no string prompt.
  """
  prompts = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_no}: invalid JSON ({e.msg})') from None
      if not isinstance(row, dict) or not isinstance(row.get('prompt'), str):
        raise ValueError(f'{path}:{line_no}: expected {{"prompt": str}}')
      prompts.append(row['prompt'])
  return prompts


def tokenize_example(prompt: str, target: str, *, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises one training example.

  Args:
    prompt: the prompt text (e.g. 'Question: ...\\nAnswer:').
    target: the target text (e.g. ' <solution>\\n#### N').
    tokenizer: has `encode`, `bos_token_id`, `eos_token_id`.

  Returns:
    tokens: int32 [L], BOS + prompt + target + EOS.
    loss_mask: bool [L], True exactly on the target tokens and the EOS.
  """
  if tokenizer.eos_token_id is None:
    raise DataError('tokenizer has no eos_token_id')
  prompt_ids = tokenize_prompt(prompt, tokenizer=tokenizer)
  target_ids = _encode(target, tokenizer) + [tokenizer.eos_token_id]
  tokens = np.asarray(prompt_ids + target_ids, np.int32)
  loss_mask = np.zeros(len(tokens), bool)
  loss_mask[len(prompt_ids):] = True
  return tokens, loss_mask


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
  """Tokenised examples (see `tokenize_example`) and how many were dropped as too long."""
  tokens: list[np.ndarray]
  loss_masks: list[np.ndarray]
  dropped: int = 0

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def lengths(self) -> np.ndarray:
    """Row positions each example needs: len(tokens) - 1 (inputs and targets are shifted)."""
    return np.asarray([len(t) - 1 for t in self.tokens], np.int64)


def tokenize_examples(examples: Sequence[gsm8k.Example], *, tokenizer: Any,
                      seq_len: int | None = None,
                      template: str = gsm8k.DEFAULT_PROMPT_TEMPLATE,
                      strip_calculator: bool = True) -> TokenizedExamples:
  """Formats (see `gsm8k`) and tokenises examples, dropping those that do not fit in seq_len.

  Args:
    examples: GSM8K examples.
    tokenizer: the model's tokenizer.
    seq_len: row length; examples needing more positions are dropped, counted in `dropped`, and
      logged. None keeps every example.
    template: prompt template.
    strip_calculator: remove <<...>> annotations from targets.

  Returns:
    The kept examples' tokens and loss masks, in input order.
  """
  tokens, masks, dropped = [], [], 0
  for ex in examples:
    t, m = tokenize_example(gsm8k.format_prompt(ex.question, template=template),
                            gsm8k.format_target(ex.answer, strip_calculator=strip_calculator),
                            tokenizer=tokenizer)
    if seq_len is not None and len(t) - 1 > seq_len:
      dropped += 1
      continue
    tokens.append(t)
    masks.append(m)
  if dropped:
    logging.warning('data: dropped %d of %d examples longer than seq_len=%d tokens',
                    dropped, len(examples), seq_len)
  return TokenizedExamples(tokens=tokens, loss_masks=masks, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------


def pack_rows(lengths: np.ndarray, *, seq_len: int, packing: bool = True) -> list[np.ndarray]:
  """Groups examples into rows: first-fit in the given order, or one per row without packing.

  Args:
    lengths: positions each example needs, every one in [1, seq_len].
    seq_len: row length.
    packing: pack several examples per row; otherwise one example per row.

  Returns:
    For every row, the indices (into `lengths`) of its examples, in placement order.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > seq_len):
    raise DataError(f'pack_rows: lengths must lie in [1, {seq_len}], got {lengths.min()}..'
                    f'{lengths.max()}')
  if not packing:
    return [np.asarray([i]) for i in range(len(lengths))]
  # One slot per example is the worst case; rows past `num_rows` are still empty, so the argmax
  # over remaining[:num_rows + 1] always finds a row (the first fitting open one, or a new one).
  remaining = np.full(len(lengths), seq_len, np.int64)
  row_of = np.empty(len(lengths), np.int64)
  num_rows = 0
  for i, length in enumerate(lengths):
    r = int(np.argmax(remaining[:num_rows + 1] >= length))
    remaining[r] -= length
    row_of[i] = r
    num_rows = max(num_rows, r + 1)
  order = np.argsort(row_of, kind='stable')  # Stable: examples keep placement order in a row.
  return np.split(order, np.cumsum(np.bincount(row_of, minlength=num_rows))[:-1])


def epoch_rows(lengths: np.ndarray, *, seq_len: int, seed: int, epoch: int,
               packing: bool = True) -> list[np.ndarray]:
  """The rows of one epoch: examples permuted by (seed, epoch), then packed (see `pack_rows`)."""
  perm = np.random.default_rng((seed, epoch)).permutation(len(lengths))
  return [perm[row] for row in pack_rows(np.asarray(lengths)[perm], seq_len=seq_len,
                                         packing=packing)]


def build_batch(examples: TokenizedExamples, rows: Sequence[np.ndarray], *, seq_len: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
  """Lays out rows of examples as a batch dict of [len(rows), seq_len] arrays (module docstring)."""
  b = len(rows)
  batch = {
      'inputs': np.full((b, seq_len), pad_id, np.int32),
      'targets': np.full((b, seq_len), pad_id, np.int32),
      'weights': np.zeros((b, seq_len), np.float32),
      'segment_ids': np.zeros((b, seq_len), np.int32),
      'positions': np.zeros((b, seq_len), np.int32),
  }
  for i, row in enumerate(rows):
    start = 0
    for segment, ex in enumerate(row, start=1):
      tokens, mask = examples.tokens[ex], examples.loss_masks[ex]
      end = start + len(tokens) - 1
      if end > seq_len:
        raise DataError(f'build_batch: row {i} needs {end} positions > seq_len={seq_len}')
      batch['inputs'][i, start:end] = tokens[:-1]
      batch['targets'][i, start:end] = tokens[1:]
      batch['weights'][i, start:end] = mask[1:]
      batch['segment_ids'][i, start:end] = segment
      batch['positions'][i, start:end] = np.arange(end - start)
      start = end
  return batch


# ---------------------------------------------------------------------------------------------
# The resumable per-process iterator.
# ---------------------------------------------------------------------------------------------


class BatchIterator:
  """Endless, deterministic, resumable batches; each process builds only its slice.

  `next(it)` returns this process's [global_batch_size // process_count, seq_len] rows of the
  next global batch. `state()` is the stream position of the *next* batch (JSON-serialisable
  ints, identical on every process): save it with the train state after that batch's update, and
  `restore` it to continue exactly where the saved run would have.
  """

  def __init__(self, examples: TokenizedExamples, *, global_batch_size: int, seq_len: int,
               seed: int, packing: bool = True, pad_id: int = 0, process_index: int = 0,
               process_count: int = 1):
    if not len(examples):
      raise DataError('data: no training examples (all dropped as longer than seq_len?)')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise DataError(f'data: global batch size {global_batch_size} must be a positive multiple '
                      f'of the process count {process_count}')
    if not 0 <= process_index < process_count:
      raise DataError(f'data: process_index {process_index} not in [0, {process_count})')
    self._examples = examples
    self._lengths = examples.lengths
    self._global_batch_size = global_batch_size
    self._seq_len = seq_len
    self._seed = seed
    self._packing = packing
    self._pad_id = pad_id
    local = global_batch_size // process_count
    self._local = range(process_index * local, (process_index + 1) * local)
    self._epoch = 0
    self._row = 0
    self._cache: tuple[int, list[np.ndarray]] | None = None

  def rows(self, epoch: int) -> list[np.ndarray]:
    """The rows (example indices) of `epoch`; the latest epoch is cached."""
    if self._cache is None or self._cache[0] != epoch:
      self._cache = (epoch, epoch_rows(self._lengths, seq_len=self._seq_len, seed=self._seed,
                                       epoch=epoch, packing=self._packing))
    return self._cache[1]

  @property
  def epoch(self) -> int:
    return self._epoch

  def state(self) -> dict[str, int]:
    """Position of the next batch: {'epoch': e, 'row': r} (row r of epoch e's rows)."""
    return {'epoch': self._epoch, 'row': self._row}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a position returned by `state()` (e.g. read back from a checkpoint)."""
    try:
      epoch, row = int(state['epoch']), int(state['row'])
    except (KeyError, TypeError, ValueError):
      raise DataError(f"data: iterator state {dict(state)!r}: expected ints 'epoch' and 'row'"
                      ) from None
    if epoch < 0 or not 0 <= row < len(self.rows(epoch)):
      raise DataError(f'data: iterator state {dict(state)!r} is outside the data '
                      f'(epoch {epoch} has {len(self.rows(max(epoch, 0)))} rows)')
    self._epoch, self._row = epoch, row

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    local = []
    for j in range(self._global_batch_size):
      rows = self.rows(self._epoch)
      if j in self._local:
        local.append(rows[self._row])
      self._row += 1
      if self._row == len(rows):
        self._epoch, self._row = self._epoch + 1, 0
    return build_batch(self._examples, local, seq_len=self._seq_len, pad_id=self._pad_id)


def make_train_iterator(examples: Sequence[gsm8k.Example], *, tokenizer: Any, seq_len: int,
                        global_batch_size: int, seed: int, packing: bool = True,
                        template: str = gsm8k.DEFAULT_PROMPT_TEMPLATE,
                        strip_calculator: bool = True, process_index: int = 0,
                        process_count: int = 1) -> BatchIterator:
  """`tokenize_examples` + `BatchIterator`: the training batches of a GSM8K split.

  Pass process_index=jax.process_index(), process_count=jax.process_count() in multi-host runs.
  """
  tokenized = tokenize_examples(examples, tokenizer=tokenizer, seq_len=seq_len, template=template,
                                strip_calculator=strip_calculator)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return BatchIterator(tokenized, global_batch_size=global_batch_size, seq_len=seq_len, seed=seed,
                       packing=packing, pad_id=pad_id, process_index=process_index,
                       process_count=process_count)


def to_global_array(local_batch: Mapping[str, np.ndarray],
                    sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles every process's local rows into global jax.Arrays laid out by `sharding`.

  Args:
    local_batch: this process's rows (from `BatchIterator`), [B_local, T] each.
    sharding: the batch sharding, e.g. NamedSharding(mesh, P(('data', 'fsdp'))); its leading axis
      spans the processes in process order, so the global batch is the concatenation of the local
      batches of processes 0, 1, ...

  Returns:
    The same keys as [B_global, T] arrays.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------------
# Statistics (docs/data.md).
# ---------------------------------------------------------------------------------------------


def token_stats(examples: Sequence[gsm8k.Example], *, tokenizer: Any,
                seq_lens: Sequence[int] = (512, 1024), seed: int = 0, epochs: int = 3,
                template: str = gsm8k.DEFAULT_PROMPT_TEMPLATE,
                strip_calculator: bool = True) -> dict[str, Any]:
  """Token-length distribution and packing efficiency of a split.

  Args:
    examples: the split.
    tokenizer: the model's tokenizer.
    seq_lens: row lengths to report packing for.
    seed: shuffle seed.
    epochs: packing numbers are averaged over epochs 0..epochs-1 (each has its own order).
    template: prompt template.
    strip_calculator: remove <<...>> annotations from targets.

  Returns:
    {'num_examples', 'prompt_target_tokens': {min, median, p90, p99, max, mean} (no BOS/EOS),
     'seq_len': {T: {'too_long', 'packed': {...}, 'padded': {...}}}} where 'too_long' counts
    examples that do not fit in T (they are dropped) and each of packed/padded has
    'rows_per_epoch', 'non_pad_fraction' (real positions / all positions) and
    'supervised_fraction' (weight-1 positions / all positions).
  """
  tok = tokenize_examples(examples, tokenizer=tokenizer, template=template,
                          strip_calculator=strip_calculator)
  body = np.asarray([len(t) - 2 for t in tok.tokens])  # Without BOS and EOS.
  q = lambda p: float(np.percentile(body, p))
  out = {
      'num_examples': len(tok),
      'prompt_target_tokens': {'min': int(body.min()), 'median': q(50), 'p90': q(90),
                               'p99': q(99), 'max': int(body.max()),
                               'mean': float(body.mean())},
      'seq_len': {},
  }
  positions = tok.lengths
  supervised = np.asarray([m[1:].sum() for m in tok.loss_masks])
  for seq_len in seq_lens:
    fits = positions <= seq_len
    entry = {'too_long': int((~fits).sum())}
    for mode in ('packed', 'padded'):
      rows = [len(epoch_rows(positions[fits], seq_len=seq_len, seed=seed, epoch=e,
                             packing=mode == 'packed')) for e in range(epochs)]
      total = float(np.mean(rows)) * seq_len
      entry[mode] = {'rows_per_epoch': float(np.mean(rows)),
                     'non_pad_fraction': float(positions[fits].sum() / total),
                     'supervised_fraction': float(supervised[fits].sum() / total)}
    out['seq_len'][seq_len] = entry
  return out


def _main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from gemma_sft_jax.weights import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog='python -m gemma_sft_jax.training.data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--stats', action='store_true', required=True,
                      help='print token-length and packing statistics as JSON')
  parser.add_argument('--source', required=True, help='local GSM8K dir or hub id')
  parser.add_argument('--subset', default='main')
  parser.add_argument('--split', default='train')
  parser.add_argument('--tokenizer', required=True, help="'byte', a .gguf file, HF dir or id")
  parser.add_argument('--seq_lens', default='512,1024')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=3)
  args = parser.parse_args(argv)
  try:
    examples = gsm8k.load_split(args.source, args.subset, args.split)
    tok = tokenizer_lib.load_tokenizer(args.tokenizer)
    stats = token_stats(examples, tokenizer=tok, seed=args.seed, epochs=args.epochs,
                        seq_lens=[int(s) for s in args.seq_lens.split(',')])
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(stats, indent=2))
  return 0


if __name__ == '__main__':
  raise SystemExit(_main())
