"""Tests for gemma_sft_jax.evaluation.gsm8k: extraction, normalisation, formats, few-shot prompts, loading."""

import json
import logging

import pytest

from gemma_sft_jax.evaluation import gsm8k

# (text, strict, flexible)
EXTRACTION_CASES = [
    ('#### 72', '72', '72'),
    ('Natalia sold 48/2 = 24 clips.\n#### 72', '72', '72'),
    ('She has 5 + 3 = 8 apples.\n#### 8\n\nQuestion: Tom has 3 cats', '8', '3'),
    ('#### 1,000', '1000', '1000'),
    ('#### $1,234,567.50', '1234567.5', '1234567.5'),
    ('#### 18.00', '18', '18'),
    ('#### -3', '-3', '-3'),
    ('####-3', '-3', '-3'),
    ('####   42  apples', '42', '42'),
    ('#### $5', '5', '5'),
    ('#### 50%', '50', '50'),
    ('#### .5', '0.5', '0.5'),
    ('#### 7.', '7', '7'),
    ('#### 3\n#### 4', '3', '4'),
    ('#### the answer is 9', None, '9'),
    ('####', None, None),
    ('The answer is 42.', None, '42'),
    ('The answer is 42. I hope that helps!', None, '42'),
    ('He pays $18.00 in total.', None, '18'),
    ('First 3 then 4 then 5', None, '5'),
    ('It dropped to x = -3 degrees', None, '-3'),
    ('between 5-10 apples', None, '10'),
    ('I do not know.', None, None),
    ('', None, None),
    ('about 1,000,000 people', None, '1000000'),
    ('The numbers 1,2,3', None, '3'),
    ('half is .25 of it', None, '0.25'),
    ('So 12 * 3 = 36\n#### 36\n\n', '36', '36'),
]


@pytest.mark.parametrize('text,strict,flexible', EXTRACTION_CASES)
def test_extraction(text, strict, flexible):
  assert gsm8k.extract_strict(text) == strict
  assert gsm8k.extract_flexible(text) == flexible


@pytest.mark.parametrize('raw,norm', [
    ('18.00', '18'), ('18', '18'), ('1,000', '1000'), ('$1,000', '1000'), ('-3', '-3'),
    ('.5', '0.5'), ('0.50', '0.5'), ('50%', '50'), ('7.', '7'), (' 12 ', '12'), ('+4', '4'),
    ('-0', '0'), ('100', '100'), ('1e3', '1000'), ('abc', 'abc'),
])
def test_normalize_number(raw, norm):
  assert gsm8k.normalize_number(raw) == norm


@pytest.mark.parametrize('pred,gold,ok', [
    ('18.00', '18', True), ('1,000', '1000', True), ('$5', '5', True), ('-3', '3', False),
    ('.5', '0.5', True), ('17', '18', False), (None, '18', False), ('abc', 'abc', True),
    ('abc', '18', False),
])
def test_is_correct(pred, gold, ok):
  assert gsm8k.is_correct(pred, gold) is ok


@pytest.mark.parametrize('text,want', [
    (' 6 + 2 = 8\n#### 8\n\nQuestion: Next one?\nAnswer: 5', ' 6 + 2 = 8\n#### 8'),
    (' 8 apples.Question: more', ' 8 apples.'),
    (' #### 3<end_of_turn>junk 99', ' #### 3'),
    (' no stop here 4  \n', ' no stop here 4'),
])
def test_truncate_completion(text, want):
  assert gsm8k.truncate_completion(text) == want


def test_truncated_completion_feeds_extraction():
  completion = ' 3 + 4 = 7\n#### 7\n\nQuestion: A farmer has 12 cows'
  assert gsm8k.extract_flexible(completion) == '12'  # Why truncation matters.
  assert gsm8k.extract_flexible(gsm8k.truncate_completion(completion)) == '7'


EX = gsm8k.Example(
    question='Natalia sold clips to 48 friends. How many?',
    answer='Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72', gold='72')


def test_prompt_and_target_format():
  prompt = gsm8k.format_prompt(EX.question)
  target = gsm8k.format_target(EX.answer)
  assert prompt == 'Question: Natalia sold clips to 48 friends. How many?\nAnswer:'
  assert target == ' Natalia sold 48/2 = 24 clips in May.\n#### 72'
  assert prompt + target == ('Question: Natalia sold clips to 48 friends. How many?\n'
                             'Answer: Natalia sold 48/2 = 24 clips in May.\n#### 72')
  assert gsm8k.format_target(EX.answer, strip_calculator=False) == ' ' + EX.answer
  assert gsm8k.format_prompt('Q {x}?', template='Q: {question} A:') == 'Q: Q {x}? A:'
  with pytest.raises(gsm8k.DataError, match='question'):
    gsm8k.format_prompt('q', template='no field')


def test_strip_calculator_annotations():
  assert gsm8k.strip_calculator_annotations('a <<2*3=6>>6 and $<<0.2*50=10>>10.') == 'a 6 and $10.'
  assert gsm8k.strip_calculator_annotations('no annotation 5 < 6 > 4') == 'no annotation 5 < 6 > 4'


def _pool(n=20):
  return [gsm8k.Example(question=f'What is {i} + 1?', answer=f'{i} + 1 = <<{i}+1={i+1}>>{i+1}\n'
                        f'#### {i+1}', gold=str(i + 1)) for i in range(n)]


def test_zero_and_one_shot_prompts():
  pool = _pool()
  assert gsm8k.build_prompt('Q?', strategy='zero_shot') == 'Question: Q?\nAnswer:'
  one = gsm8k.build_prompt('Q?', strategy='one_shot', pool=pool)
  assert one == 'Question: What is 0 + 1?\nAnswer: 0 + 1 = 1\n#### 1\n\nQuestion: Q?\nAnswer:'
  # The question itself is never its own exemplar.
  assert gsm8k.build_prompt(pool[0].question, strategy='one_shot', pool=pool).startswith(
      'Question: What is 1 + 1?')
  fixed = gsm8k.parse_example('What is 2+2?|||2+2=4\n#### 4')
  assert fixed.gold == '4'
  assert gsm8k.build_prompt('Q?', strategy='one_shot', one_shot_example=fixed) == (
      'Question: What is 2+2?\nAnswer: 2+2=4\n#### 4\n\nQuestion: Q?\nAnswer:')
  with pytest.raises(gsm8k.DataError, match='strategy'):
    gsm8k.build_prompt('Q?', strategy='two_shot')


def test_few_shot_format_and_determinism():
  pool = _pool()
  p1 = gsm8k.build_prompt('Q?', strategy='few_shot', pool=pool, num_shots=3, seed=7)
  blocks = p1.split('\n\n')
  assert len(blocks) == 4 and blocks[-1] == 'Question: Q?\nAnswer:'
  for block in blocks[:3]:
    assert block.startswith('Question: What is ') and '\nAnswer: ' in block
    assert '<<' not in block and block.split('\n')[-1].startswith('#### ')
  assert p1 == gsm8k.build_prompt('Q?', strategy='few_shot', pool=pool, num_shots=3, seed=7)
  assert p1 != gsm8k.build_prompt('Q?', strategy='few_shot', pool=pool, num_shots=3, seed=8)
  # Every question gets the same exemplars for a seed...
  other = gsm8k.build_prompt('Other?', strategy='few_shot', pool=pool, num_shots=3, seed=7)
  assert other.rsplit('\n\n', 1)[0] == p1.rsplit('\n\n', 1)[0]


def test_few_shot_excludes_the_question_itself():
  pool = _pool()
  chosen = gsm8k.sample_exemplars(pool, k=3, seed=7)
  q = chosen[1].question
  prompt = gsm8k.build_prompt(q, strategy='few_shot', pool=pool, num_shots=3, seed=7)
  assert prompt.count(q) == 1 and prompt.endswith(f'Question: {q}\nAnswer:')
  assert len(prompt.split('\n\n')) == 4  # ... and is replaced, so there are still 3 exemplars.
  with pytest.raises(gsm8k.DataError, match='only'):
    gsm8k.sample_exemplars(pool[:2], k=3, seed=0)


def test_load_local_splits(gsm8k_dir):
  train = gsm8k.load_split(gsm8k_dir, 'main', 'train')
  test = gsm8k.load_split(gsm8k_dir, 'main', 'test')
  socratic = gsm8k.load_split(gsm8k_dir, 'socratic', 'test')
  assert (len(train), len(test), len(socratic)) == (7473, 1319, 1319)
  assert train[0].question.startswith('Natalia sold clips') and train[0].gold == '72'
  assert all(e.gold == gsm8k.extract_strict(e.answer) for e in train + test + socratic)
  assert '**' in socratic[0].answer and socratic[0].question == test[0].question
  assert test[0].gold == socratic[0].gold == '18'


def test_missing_files_name_the_path(tmp_path, gsm8k_dir):
  with pytest.raises(gsm8k.DataError, match='train_socratic.jsonl.*file names'):
    gsm8k.load_split(gsm8k_dir, 'socratic', 'train')
  with pytest.raises(gsm8k.DataError, match='not a directory'):
    gsm8k.load_split(str(tmp_path / 'nope'), 'main', 'train')
  with pytest.raises(gsm8k.DataError, match='subset'):
    gsm8k.load_split(gsm8k_dir, 'mian', 'train')


GOOD = json.dumps({'question': 'What is 1+1?', 'answer': '1+1=<<1+1=2>>2\n#### 2'})


@pytest.mark.parametrize('bad,reason', [
    ('{"question": "q", "answer": "a #### 1"', 'malformed JSON'),
    ('[1, 2]', 'expected a JSON object'),
    ('{"answer": "#### 1"}', "missing key 'question'"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": "q", "answer": "1 + 1 = 2"}', "no '#### N'"),
    ('{"question": "q", "answer": "#### two"}', 'not followed by a number'),
    ('{"question": 3, "answer": "#### 3"}', "'question' must be a non-empty string"),
])
def test_bad_rows_are_one_line_errors_with_file_and_line(tmp_path, bad, reason):
  (tmp_path / 'train.jsonl').write_text('\n'.join([GOOD, GOOD, bad, GOOD]) + '\n')
  with pytest.raises(gsm8k.DataError) as e:
    gsm8k.load_split(str(tmp_path), 'main', 'train')
  msg = str(e.value)
  assert msg.startswith(f'{tmp_path / "train.jsonl"}:3: ') and reason in msg and '\n' not in msg


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
  lines = [GOOD, '{oops', '', GOOD, '{"question": "q", "answer": "no answer"}', GOOD]
  path = tmp_path / 'test_socratic.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  examples, skipped = gsm8k.read_jsonl(str(path), skip_bad_rows=True)
  assert len(examples) == 3 and examples[0].gold == '2'
  assert [s.split(': ')[0] for s in skipped] == [f'{path}:2', f'{path}:5']
  with caplog.at_level(logging.WARNING):
    loaded = gsm8k.load_split(str(tmp_path), 'socratic', 'test', skip_bad_rows=True)
  assert loaded == examples
  assert 'skipped 2 bad rows' in caplog.text


_ANSWER = 'Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72'


@pytest.mark.parametrize('completion,strict,flexible,ok_strict,ok_flexible', [
    (' She sold 72 clips.\n#### 72', '72', '72', True, True),
    (' #### 72.', '72.', '72.', True, True),            # the final '.' is ignored
    (' The answer is $72.', '[invalid]', '$72.', False, True),  # '$' is ignored
    (' So 72.00 clips', '[invalid]', '72.00', False, False),  # no numeric equality in lm-eval
    (' #### 1,072', '1,072', '1,072', False, False),
    (' #### -3 then 72', '-3', '72', False, True),      # strict: first match; flexible: last
    (' x 5 and 7', '[invalid]', '7', False, False),     # single digits: the second alternative
    (' nothing', '[invalid]', '[invalid]', False, False),
])
def test_lm_eval_filters_and_exact_match(completion, strict, flexible, ok_strict, ok_flexible):
  assert gsm8k.lm_eval_extract(completion, 'strict_match') == strict
  assert gsm8k.lm_eval_extract(completion, 'flexible_extract') == flexible
  assert gsm8k.lm_eval_exact_match(strict, _ANSWER) == ok_strict
  assert gsm8k.lm_eval_exact_match(flexible, _ANSWER) == ok_flexible


def test_lm_eval_scores_differ_from_ours_where_documented():
  completions = [' #### 72', ' 72.00', ' The answer is 72.']
  assert gsm8k.lm_eval_scores(completions, [_ANSWER] * 3) == {
      'strict_match': 1 / 3, 'flexible_extract': 2 / 3}
  # Ours normalises numbers: '72.00' is 72.
  assert sum(gsm8k.is_correct(gsm8k.extract_flexible(c), '72') for c in completions) == 3
