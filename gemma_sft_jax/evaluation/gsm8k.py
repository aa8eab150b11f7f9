"""The GSM8K task: loading, prompt/target formats, few-shot prompts, answer extraction.

This is the one tested copy; training data (`training/data.py`) and evaluation both use it, so the
prompt a model is fine-tuned on is token for token the prompt it is evaluated on.

Formats (defaults; the reference baseline used exactly these):

  prompt  = 'Question: {question}\\nAnswer:'
  target  = ' ' + solution            # calculator annotations <<48/2=24>> removed, ends '#### N'
  prompt + target = 'Question: ...\\nAnswer: Natalia sold 48/2 = 24 clips ...\\n#### 72'

  few-shot prompt = exemplar_1 + '\\n\\n' + ... + exemplar_k + '\\n\\n' + prompt
  where exemplar_i = prompt_i + target_i (a full solved train example).

Answers: `extract_strict` takes the number right after the first '####' (the format SFT teaches);
`extract_flexible` takes the last number in the text (fairer to base models). Both are applied to
the *completion only* (never the prompt, whose exemplars contain numbers), after
`truncate_completion` has cut it at the first stop string (default: the start of a new
'Question:', which base models produce after answering). Truncation happens here, in the
evaluator's post-processing, even if the sampler also stops early on those strings, so that
predictions do not depend on how the sampler stops.

Loading: `load_split(source, subset, split)` reads a local directory of the original JSONL files
(`train.jsonl`, `test.jsonl` for 'main'; `train_socratic.jsonl`, `test_socratic.jsonl` for
'socratic'; each may be gzipped, `NAME.jsonl.gz`) or, for anything that is not an existing path,
the hub with `datasets.load_dataset(source, subset, split=split)` (e.g. 'openai/gsm8k'; needs
network or its cache). The package ships GSM8K itself in `BUNDLED_DIR`, the configs' default.
"""

from __future__ import annotations

import dataclasses
import decimal
import gzip
import json
import os
import re
from typing import Any, Sequence

from absl import logging
import numpy as np

DEFAULT_PROMPT_TEMPLATE = 'Question: {question}\nAnswer:'
EXEMPLAR_SEPARATOR = '\n\n'
# A base model that has answered goes on with a new 'Question:'; an instruction-tuned one may end
# its turn. The first stop string found (earliest position) wins.
STOP_STRINGS = ('\n\nQuestion:', 'Question:', '<end_of_turn>')
STRATEGIES = ('zero_shot', 'one_shot', 'few_shot')
# GSM8K as released (MIT licence beside it): main train and test, socratic test; gzipped JSONL.
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                           'gsm8k')
SUBSETS = {'main': '{split}.jsonl', 'socratic': '{split}_socratic.jsonl'}

_CALCULATOR = re.compile(r'<<[^<>]*>>')
# A number: optional sign (a '-' right after a word/digit is a range or a minus sign, not a sign),
# optional '$', digits with well-formed thousands commas or plain digits, optional decimals; or '.5'.
_SIGN = r'(?:(?<![\w.])-)?'
_NUMBER = (rf'{_SIGN}\$?(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?:\.\d+)?'
           rf'|{_SIGN}\$?\.\d+')
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(rf'\s*({_NUMBER})')


class DataError(ValueError):
  """Bad input data or data options; the message is one line naming the cause (file:line, key)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One GSM8K problem.

  Attributes:
    question: the problem text.
    answer: the raw solution text, calculator annotations included, ending with '#### N'.
    gold: the final answer N, normalised with `normalize_number` (e.g. '1000' for '1,000').
  """
  question: str
  answer: str
  gold: str


# ---------------------------------------------------------------------------------------------
# Answers.
# ---------------------------------------------------------------------------------------------


def normalize_number(s: str) -> str:
  """Canonical form of a number string: '1,000' -> '1000', '$18.00' -> '18', '.5' -> '0.5'.

  Removes commas, '$', '%', surrounding whitespace, a leading '+' and a trailing '.'; a value that
  parses as a decimal is written without exponent or trailing zeros. Anything else is returned
  cleaned but otherwise unchanged, so comparisons still work on it as a string.
  """
  s = s.strip().replace(',', '').replace('$', '').replace('%', '').strip().rstrip('.')
  s = s.removeprefix('+')
  try:
    d = decimal.Decimal(s)
  except decimal.InvalidOperation:
    return s
  if not d.is_finite():
    return s
  out = format(d.normalize(), 'f')
  return '0' if out == '-0' else out


def extract_strict(text: str) -> str | None:
  """The number right after the first '####', normalised; None without '####' or number there."""
  _, sep, rest = text.partition('####')
  if not sep:
    return None
  m = _STRICT_RE.match(rest)
  return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
  """The last number anywhere in the text, normalised; None when there is no number."""
  matches = _NUMBER_RE.findall(text)
  return normalize_number(matches[-1]) if matches else None


def truncate_completion(text: str, stop: Sequence[str] = STOP_STRINGS) -> str:
  """Cuts a model completion at the earliest stop string (exclusive) and strips trailing space."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut].rstrip()


def is_correct(pred: str | None, gold: str) -> bool:
  """Whether a prediction equals the gold answer, numerically when both parse as numbers."""
  if pred is None:
    return False
  p, g = normalize_number(pred), normalize_number(gold)
  try:
    return decimal.Decimal(p) == decimal.Decimal(g)
  except decimal.InvalidOperation:
    return p == g


# lm-evaluation-harness's `gsm8k` task scores the same completions with its own filters, so our
# numbers can be set beside published ones. Its two filters (a regex, then the first result):
LM_EVAL_FILTERS = {
    'strict_match': (re.compile(r'#### (\-?[0-9\.\,]+)'), 0),         # first match
    'flexible_extract': (re.compile(r'(-?[$0-9.,]{2,})|(-?[0-9]+)'), -1),  # last match
}
# ...then `exact_match` with ignore_case and these removed from prediction and reference alike.
LM_EVAL_IGNORE = tuple(re.compile(r) for r in (',', r'\$', r'(?s).*#### ', r'\.$'))
LM_EVAL_FALLBACK = '[invalid]'


def lm_eval_extract(completion: str, name: str) -> str:
  """What lm-eval's filter `name` ('strict_match' | 'flexible_extract') keeps of a completion.

  As its RegexFilter: all matches, the `group_select`-th of them; for a pattern with groups the
  first non-empty group; stripped; '[invalid]' when nothing matches.
  """
  regex, select = LM_EVAL_FILTERS[name]
  matches = regex.findall(completion)
  if not matches:
    return LM_EVAL_FALLBACK
  match = matches[select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), LM_EVAL_FALLBACK)
  return match.strip()


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
  """lm-eval's exact_match for gsm8k: ignore case and the regexes above, then compare strings.

  The reference is the full GSM8K answer ('... #### 18'); '(?s).*#### ' leaves its number. Unlike
  `is_correct`, '18.00' does not equal '18' and '1,000.' equals '1000' only through the ignored
  ',' and final '.'.
  """
  def clean(s: str) -> str:
    for regex in LM_EVAL_IGNORE:
      s = regex.sub('', s)
    return s.lower()
  return clean(prediction) == clean(reference)


def lm_eval_scores(completions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
  """{'strict_match', 'flexible_extract'}: lm-eval's gsm8k accuracies (fractions, unrounded) of
  completions (already cut at the stop strings) against the raw GSM8K answers."""
  n = max(len(completions), 1)
  return {name: sum(lm_eval_exact_match(lm_eval_extract(c, name), a)
                    for c, a in zip(completions, answers)) / n
          for name in LM_EVAL_FILTERS}


# ---------------------------------------------------------------------------------------------
# Prompts and targets.
# ---------------------------------------------------------------------------------------------


def strip_calculator_annotations(text: str) -> str:
  """Removes GSM8K calculator annotations: '48/2 = <<48/2=24>>24' -> '48/2 = 24'."""
  return _CALCULATOR.sub('', text)


def format_prompt(question: str, *, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
  """The prompt for one question: `template` with '{question}' replaced."""
  if '{question}' not in template:
    raise DataError(f"prompt template {template!r} has no '{{question}}' field")
  # str.replace, not str.format: a template may hold literal braces.
  return template.replace('{question}', question.strip())


def format_target(answer: str, *, strip_calculator: bool = True) -> str:
  """The training target for a raw GSM8K answer: ' ' + solution, ending with '#### N'."""
  text = strip_calculator_annotations(answer) if strip_calculator else answer
  return ' ' + text.strip()


def format_exemplar(example: Example, *, template: str = DEFAULT_PROMPT_TEMPLATE,
                    strip_calculator: bool = True) -> str:
  """A solved example as it appears in a few-shot prefix: prompt + target."""
  return (format_prompt(example.question, template=template)
          + format_target(example.answer, strip_calculator=strip_calculator))


def sample_exemplars(pool: Sequence[Example], *, k: int, seed: int,
                     exclude_question: str | None = None) -> list[Example]:
  """k exemplars from `pool`, the same for every question given the seed.

  The pool is permuted with `np.random.default_rng(seed)` and the first k examples whose question
  is not `exclude_question` are taken, so a train question never sees itself as an exemplar, and
  every other question gets the same k exemplars.
  """
  if k < 0:
    raise DataError(f'num_shots must be >= 0, got {k}')
  order = np.random.default_rng(seed).permutation(len(pool))
  out = []
  for i in order:
    if len(out) == k:
      break
    if pool[i].question.strip() != (exclude_question or '').strip():
      out.append(pool[i])
  if len(out) < k:
    raise DataError(f'few-shot: asked for {k} exemplars but the pool has only {len(out)}')
  return out


def parse_example(spec: str) -> Example:
  """An explicit exemplar from the config string 'question|||answer' (answer ends '#### N')."""
  question, sep, answer = spec.partition('|||')
  if not sep or not question.strip():
    raise DataError(f"one-shot example {spec[:40]!r}...: expected 'question|||answer'")
  gold = extract_strict(answer)
  if gold is None:
    raise DataError(f"one-shot example {spec[:40]!r}...: answer has no '#### N'")
  return Example(question=question.strip(), answer=answer.strip(), gold=gold)


def build_prompt(question: str, *, strategy: str = 'zero_shot', pool: Sequence[Example] = (),
                 num_shots: int = 8, seed: int = 0, one_shot_example: Example | None = None,
                 template: str = DEFAULT_PROMPT_TEMPLATE, strip_calculator: bool = True) -> str:
  """The evaluation prompt for one question; identical for base and fine-tuned models.

  Args:
    question: the test question.
    strategy: 'zero_shot' (the bare prompt), 'one_shot' (`one_shot_example`, or else the first
      example of `pool` that is not this question), or 'few_shot' (`num_shots` exemplars drawn
      from `pool` with `seed`, see `sample_exemplars`).
    pool: exemplar source, normally the train split.
    num_shots: k for 'few_shot'.
    seed: exemplar sampling seed for 'few_shot'.
    one_shot_example: a fixed exemplar for 'one_shot'.
    template: prompt template with a '{question}' field.
    strip_calculator: whether exemplar solutions lose their <<...>> annotations.

  Returns:
    exemplars (prompt + target each, separated by blank lines), a blank line, then the prompt.
  """
  if strategy == 'zero_shot':
    exemplars = []
  elif strategy == 'one_shot':
    if one_shot_example is not None:
      exemplars = [one_shot_example]
    else:
      exemplars = [e for e in pool[:2] if e.question.strip() != question.strip()][:1]
      if not exemplars:
        raise DataError('one_shot: no exemplar given and the exemplar pool is empty')
  elif strategy == 'few_shot':
    exemplars = sample_exemplars(pool, k=num_shots, seed=seed, exclude_question=question)
  else:
    raise DataError(f'prompt strategy {strategy!r}: expected one of {", ".join(STRATEGIES)}')
  parts = [format_exemplar(e, template=template, strip_calculator=strip_calculator)
           for e in exemplars]
  parts.append(format_prompt(question, template=template))
  return EXEMPLAR_SEPARATOR.join(parts)


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


def _parse_row(row: Any, where: str) -> Example:
  """Validates one raw row; errors are one line starting with `where` (path:line)."""
  if not isinstance(row, dict):
    raise DataError(f'{where}: expected a JSON object, got {type(row).__name__}')
  for key in ('question', 'answer'):
    if key not in row:
      raise DataError(f'{where}: missing key {key!r}')
    if not isinstance(row[key], str) or not row[key].strip():
      raise DataError(f'{where}: key {key!r} must be a non-empty string')
  if '####' not in row['answer']:
    raise DataError(f"{where}: answer has no '#### N' final answer")
  gold = extract_strict(row['answer'])
  if gold is None:
    raise DataError(f"{where}: answer's '####' is not followed by a number")
  return Example(question=row['question'].strip(), answer=row['answer'].strip(), gold=gold)


def read_jsonl(path: str, *, skip_bad_rows: bool = False) -> tuple[list[Example], list[str]]:
  """Reads a GSM8K JSONL file.

  Args:
    path: file with one {"question": ..., "answer": "... #### N"} object per line.
    skip_bad_rows: skip malformed rows instead of raising.

  Returns:
    The examples, and one 'path:line: reason' message per skipped row.

  Raises:
    DataError: 'path:line: reason' for the first bad row (unless skipped), or a missing file.
  """
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file')
  examples, skipped = [], []
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue  # Blank lines (e.g. a trailing newline) are not rows.
      where = f'{path}:{lineno}'
      try:
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f'{where}: malformed JSON ({e.msg} at column {e.colno})') from None
        examples.append(_parse_row(row, where))
      except DataError as e:
        if not skip_bad_rows:
          raise
        skipped.append(str(e))
  return examples, skipped


def local_path(directory: str, subset: str, split: str) -> str:
  """The JSONL file of (subset, split) inside a local GSM8K directory: NAME.jsonl, or
  NAME.jsonl.gz when only that exists (the copy shipped in `BUNDLED_DIR` is compressed)."""
  if subset not in SUBSETS:
    raise DataError(f'GSM8K subset {subset!r}: expected one of {", ".join(SUBSETS)}')
  path = os.path.join(directory, SUBSETS[subset].format(split=split))
  return path + '.gz' if not os.path.isfile(path) and os.path.isfile(path + '.gz') else path


def has_split(directory: str, subset: str, split: str) -> bool:
  """Whether a local GSM8K directory holds (subset, split)."""
  return os.path.isfile(local_path(directory, subset, split))


def _is_local(source: str) -> bool:
  return os.path.exists(source) or source.startswith(('/', './', '../', '~'))


def load_split(source: str, subset: str = 'main', split: str = 'train', *,
               skip_bad_rows: bool = False) -> list[Example]:
  """Loads one GSM8K split.

  Args:
    source: a local directory of GSM8K JSONL files, or a hub dataset id such as 'openai/gsm8k'
      (anything that is not an existing path; loaded with `datasets.load_dataset`, needs network).
    subset: 'main' or 'socratic'.
    split: 'train' or 'test' (for hub ids, anything `datasets` accepts, e.g. 'train[:100]').
    skip_bad_rows: skip malformed rows (their count and the first reason are logged) instead of
      raising.

  Returns:
    The examples in file order.

  Raises:
    DataError: a missing directory or file (naming the expected files), or a bad row
      ('path:line: reason').
  """
  if subset not in SUBSETS:
    raise DataError(f'GSM8K subset {subset!r}: expected one of {", ".join(SUBSETS)}')
  if _is_local(source):
    source = os.path.expanduser(source)
    if not os.path.isdir(source):
      raise DataError(f'GSM8K source {source}: not a directory')
    path = local_path(source, subset, split)
    if not os.path.isfile(path):
      expected = ', '.join(f.format(split=s) for f in SUBSETS.values() for s in ('train', 'test'))
      raise DataError(f'GSM8K source {source}: no {os.path.basename(path)} for subset={subset} '
                      f'split={split} (file names: {expected})')
    examples, skipped = read_jsonl(path, skip_bad_rows=skip_bad_rows)
    name = path
  else:
    import datasets  # pylint: disable=g-import-not-at-top  # heavy, and only the hub path needs it
    rows = datasets.load_dataset(source, subset, split=split)
    name = f'{source}/{subset}/{split}'
    examples, skipped = [], []
    for i, row in enumerate(rows):
      try:
        examples.append(_parse_row(dict(row), f'{name} row {i}'))
      except DataError as e:
        if not skip_bad_rows:
          raise
        skipped.append(str(e))
  if skipped:
    logging.warning('%s: skipped %d bad rows (first: %s)', name, len(skipped), skipped[0])
  if not examples:
    raise DataError(f'{name}: no usable examples')
  return examples
