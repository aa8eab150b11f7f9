"""The GSM8K evaluator: exact strict/flexible scoring and predictions.jsonl (with the sampler
replaced by known completions), identical prompts for base and SFT, and batch-size invariance
with a real tiny model.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.evaluation import evaluator as evaluate
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.weights import tokenizer as tokenizer_lib

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(evaluate.__file__)), 'assets', 'gsm8k_sample')
TOK = tokenizer_lib.ByteTokenizer()

# question -> (gold, completion the fake model gives, strict correct, flexible correct)
CASES = {
    'Janet has 9 eggs and sells them for $2 each. How much does she make?':
        ('18', ' She makes 9 * 2 = $18.\n#### 18', True, True),
    'A robe takes 6 bolts three times. How many bolts?':
        ('18', ' The answer is 18.', False, True),
    'Josh has 3 boxes of 6 pens. How many pens?':
        ('18', ' 3 * 6 = 17\n#### 17', False, False),
    # The model goes on with a new question: only the text before '\n\nQuestion:' counts.
    'Ten crates hold 100 apples each. How many apples?':
        ('1000', ' 10 * 100 = 1,000\n#### 1,000\n\nQuestion: How many? 5\n#### 5', True, True),
    'Tom picks 18 apples and 3 pears. How many apples?':
        ('18', ' #### 18 apples and 3 pears', True, False),
    'What is 3 + 4?':
        ('7', '', False, False),
}


def _examples():
  return [gsm8k.Example(question=q, answer=f'... #### {gold}', gold=gold)
          for q, (gold, *_) in CASES.items()]


class FakeGenerate:
  """Stands in for `sampler.generate`: the completion for each prompt's (last) question.

  `params` names the model ('base' / 'sft'); the SFT model's completions differ.
  """

  def __init__(self):
    self.calls = []

  def __call__(self, model, params, prompts, *, sampling, eos_id, pad_id=0, seed=0,
               batch_sharding=None, min_bucket=32, batch_size=None, on_done=None):
    self.calls.append({'prompts': [list(p) for p in prompts], 'sampling': sampling,
                       'eos_id': eos_id, 'pad_id': pad_id, 'params': params,
                       'batch_size': batch_size})
    if on_done is not None:
      on_done(len(prompts))
    out = []
    for ids in prompts:
      assert ids[0] == TOK.bos_token_id
      question = TOK.decode(ids).rsplit('Question: ', 1)[1].rsplit('\nAnswer:', 1)[0]
      completion = CASES[question][1] if question in CASES else ' #### 0'
      if params == 'sft':
        completion = ' #### 42'
      out.append(TOK.encode(completion))
    return out


def _generator_of(generate):
  """A stand-in for `sampler.Generator` whose calls go to `generate` (`sampler.generate`'s
  signature)."""
  def make(model, *, sampling, eos_id):
    return functools.partial(generate, model, sampling=sampling, eos_id=eos_id)
  return make


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_scoring_and_predictions_file(tmp_path, monkeypatch):
  fake = FakeGenerate()
  monkeypatch.setattr(sampler, 'Generator', _generator_of(fake))
  questions = _examples()
  spec = evaluate.PromptSpec()
  path = str(tmp_path / 'sub' / 'predictions.jsonl')
  result = evaluate.evaluate_gsm8k(model=None, params='base', tokenizer=TOK, questions=questions,
                                   pool=[], prompts=spec, batch_size=4, max_new_tokens=48,
                                   predictions_path=path, progress=False)

  want_strict = sum(c[2] for c in CASES.values())
  want_flexible = sum(c[3] for c in CASES.values())
  assert (want_strict, want_flexible) == (3, 3)
  assert result['n'] == 6
  assert result['strict_correct'] == want_strict and result['flexible_correct'] == want_flexible
  assert result['strict_accuracy'] == want_strict / 6
  assert result['flexible_accuracy'] == want_flexible / 6
  assert result['strategy'] == 'zero_shot' and result['num_shots'] == 0
  prompt_ids = [data_lib.tokenize_prompt(spec.build(q.question, []), tokenizer=TOK)
                for q in questions]
  assert result['prompt_tokens_mean'] == np.mean([len(x) for x in prompt_ids])

  # Greedy, the tokenizer's EOS, the stop strings as tokens; all prompts in one call that
  # decodes them through batch_size slots.
  assert [(len(c['prompts']), c['batch_size']) for c in fake.calls] == [(6, 4)]
  for call in fake.calls:
    s = call['sampling']
    assert (s.temperature, s.max_new_tokens, call['eos_id']) == (0.0, 48, TOK.eos_token_id)
    assert tuple(TOK.encode('Question:')) in s.stop_sequences
    assert tuple(TOK.encode('\n\nQuestion:')) in s.stop_sequences
  sent = [p for c in fake.calls for p in c['prompts']]
  assert all(p in sent for p in prompt_ids)
  assert sent == sorted(prompt_ids, key=len)  # Sorted by length.

  rows = _read_jsonl(path)
  assert len(rows) == 6
  for row, q in zip(rows, questions):  # The questions' order, not the decode order.
    gold, completion, ok_s, ok_f = CASES[q.question]
    assert set(row) == {'question', 'prompt', 'completion', 'extracted_strict',
                        'extracted_flexible', 'gold', 'correct_strict', 'correct_flexible',
                        'lm_eval_strict_match', 'lm_eval_flexible_extract',
                        'lm_eval_correct_strict_match', 'lm_eval_correct_flexible_extract'}
    assert row['question'] == q.question
    assert row['prompt'] == f'Question: {q.question}\nAnswer:'
    assert row['completion'] == completion  # Untruncated; scoring uses the truncated text.
    assert row['gold'] == gold
    assert (row['correct_strict'], row['correct_flexible']) == (ok_s, ok_f), q.question
  by_q = {r['question']: r for r in rows}
  assert by_q['Ten crates hold 100 apples each. How many apples?']['extracted_strict'] == '1000'
  assert by_q['Ten crates hold 100 apples each. How many apples?']['extracted_flexible'] == '1000'
  assert by_q['Tom picks 18 apples and 3 pears. How many apples?']['extracted_flexible'] == '3'
  assert by_q['A robe takes 6 bolts three times. How many bolts?']['extracted_strict'] is None
  assert by_q['What is 3 + 4?']['extracted_flexible'] is None

  # lm-eval's scores are the means of the predictions file's per-row verdicts.
  for k in ('strict_match', 'flexible_extract'):
    assert result['lm_eval'][k] == np.mean([r[f'lm_eval_correct_{k}'] for r in rows])

  table = evaluate.format_table({'base': result, 'train': {'step': 3}})
  assert len(table.splitlines()) == 2 and '50.00%' in table and '0-shot' in table
  assert 'lm-eval strict' in table


def test_base_and_sft_get_identical_prompts(tmp_path, monkeypatch):
  fake = FakeGenerate()
  monkeypatch.setattr(sampler, 'Generator', _generator_of(fake))
  questions = gsm8k.load_split(SAMPLE, 'main', 'test')[:5]
  pool = gsm8k.load_split(SAMPLE, 'main', 'train')
  spec = evaluate.PromptSpec(strategy='few_shot', num_shots=2, seed=3)
  results = {}
  for label in ('base', 'sft'):
    results[label] = evaluate.evaluate_gsm8k(
        model=None, params=label, tokenizer=TOK, questions=questions, pool=pool, prompts=spec,
        batch_size=2, max_new_tokens=8, predictions_path=str(tmp_path / f'{label}.jsonl'),
        progress=False)
  base, sft = _read_jsonl(tmp_path / 'base.jsonl'), _read_jsonl(tmp_path / 'sft.jsonl')
  assert [r['prompt'] for r in base] == [r['prompt'] for r in sft]
  assert [r['completion'] for r in base] != [r['completion'] for r in sft]
  base_calls = [c for c in fake.calls if c['params'] == 'base']
  sft_calls = [c for c in fake.calls if c['params'] == 'sft']
  assert [c['prompts'] for c in base_calls] == [c['prompts'] for c in sft_calls]
  exemplars = gsm8k.sample_exemplars(pool, k=2, seed=3)
  for row, q in zip(base, questions):
    assert row['prompt'].count('Question: ') == 3  # Two exemplars, then the question.
    assert row['prompt'] == gsm8k.build_prompt(q.question, strategy='few_shot', pool=pool,
                                               num_shots=2, seed=3)
    assert row['prompt'].startswith(f'Question: {exemplars[0].question}\nAnswer:')
    assert '<<' not in row['prompt']  # Calculator annotations stripped from exemplars.
  assert results['base']['num_shots'] == 2 and results['sft']['n'] == 5


def test_batch_size_does_not_change_completions(tmp_path):
  config = dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], num_layers=2,
                               layer_types=(architecture.SLIDING, architecture.GLOBAL))
  model = model_lib.Transformer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # Non-zero norm weights.
      lambda p, x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) if p[-1].key == 'scale' else x,
      params)
  questions = gsm8k.load_split(SAMPLE, 'main', 'test')[:7]
  results, rows = {}, {}
  for batch_size in (3, 8):  # 3 slots that take the next question as they finish, or 8.
    path = str(tmp_path / f'b{batch_size}.jsonl')
    results[batch_size] = evaluate.evaluate_gsm8k(
        model=model, params=params, tokenizer=TOK, questions=questions, pool=[],
        prompts=evaluate.PromptSpec(), batch_size=batch_size, max_new_tokens=12,
        predictions_path=path, progress=False)
    results[batch_size].pop('seconds')
    results[batch_size].pop('compile_seconds')
    rows[batch_size] = _read_jsonl(path)
  assert rows[3] == rows[8]
  assert results[3] == results[8]
  completions = [r['completion'] for r in rows[3]]
  assert len(set(completions)) > 1 and all(completions)


def test_majority_ignores_missing_answers_and_breaks_ties_by_first_seen():
  assert evaluate.majority(['3', None, '4', '4']) == '4'
  assert evaluate.majority([None, '6', '4', '4', '6']) == '6'  # tie: '6' was seen first
  assert evaluate.majority([None, None]) is None


def test_self_consistency_maj_and_pass_at_k(tmp_path, monkeypatch):
  """k = 3 samples per question besides the greedy completion: maj@3 votes over the extracted
  answers, pass@3 asks whether any sample is right; the samples get their own seeds and the
  configured temperature, the greedy pass stays greedy."""
  sampled = {  # question -> (gold, completions of samples 0, 1, 2)
      'Q7?': ('7', [' #### 7', ' so 7', ' #### 3']),
      'Q5?': ('5', [' #### 2', ' #### 5', ' #### 2']),
      'Q9?': ('9', [' #### 4', ' #### 6', ' no idea']),
  }
  calls = []

  def fake(model, params, prompts, *, sampling, eos_id, pad_id=0, seed=0, batch_sharding=None,
           min_bucket=32, batch_size=None, on_done=None):
    calls.append((sampling.temperature, sampling.top_p, seed))
    out = []
    for ids in prompts:
      question = TOK.decode(ids).rsplit('Question: ', 1)[1].rsplit('\nAnswer:', 1)[0]
      if sampling.temperature == 0:
        out.append(TOK.encode(' #### 1'))
      else:
        out.append(TOK.encode(sampled[question][1][seed - 10]))
    return out

  monkeypatch.setattr(sampler, 'Generator', _generator_of(fake))
  questions = [gsm8k.Example(question=q, answer=f'... #### {g}', gold=g)
               for q, (g, _) in sampled.items()]
  path = str(tmp_path / 'predictions.jsonl')
  result = evaluate.evaluate_gsm8k(
      model=None, params='base', tokenizer=TOK, questions=questions, pool=[],
      prompts=evaluate.PromptSpec(), batch_size=4, max_new_tokens=16, predictions_path=path,
      progress=False, consistency=evaluate.SelfConsistency(num_samples=3, temperature=0.8,
                                                           top_p=0.9, seed=10))
  assert result['flexible_accuracy'] == 0  # greedy: '#### 1' everywhere
  sc = result['self_consistency']
  assert (sc['k'], sc['temperature'], sc['top_p']) == (3, 0.8, 0.9)
  assert sc['maj_at_k_flexible'] == 1 / 3  # Q7 only (Q5's majority is 2; Q9 ties 4/6 -> 4)
  assert sc['pass_at_k_flexible'] == 2 / 3  # Q7 and Q5
  # Strict: Q7's votes are 7, none ('so 7' has no ####), 3: a tie that 7 wins by coming first.
  assert sc['maj_at_k_strict'] == 1 / 3 and sc['pass_at_k_strict'] == 2 / 3
  assert calls[0][0] == 0.0 and all(c[:2] == (0.8, 0.9) for c in calls[1:])
  assert len({s for _, _, s in calls[1:]}) == 3  # one seed per sample
  rows = _read_jsonl(path)
  by_q = {r['question']: r for r in rows}
  assert by_q['Q9?']['majority_flexible'] == '4' and by_q['Q9?']['samples'][2] == ' no idea'
  assert by_q['Q5?']['correct_any_flexible'] and not by_q['Q5?']['correct_majority_flexible']
  assert 'maj@3 33.33%  pass@3 66.67%' in evaluate.format_table({'base': result})
  for bad, key in (({'num_samples': 1}, 'num_samples'), ({'num_samples': 2, 'temperature': 0},
                   'temperature'), ({'num_samples': 2, 'top_p': 0.0}, 'top_p')):
    with pytest.raises(ValueError, match=f'eval.{key}'):
      evaluate.SelfConsistency(**bad)


def test_self_consistency_from_the_run_config():
  from gemma_sft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax import runner  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  assert runner.self_consistency(c) is None  # greedy only by default
  c.eval.num_samples, c.eval.temperature, c.eval.top_p, c.train.seed = 5, 0.6, 0.95, 3
  assert runner.self_consistency(c) == evaluate.SelfConsistency(5, 0.6, 0.95, 3)
  c.eval.num_samples = 0
  with pytest.raises(ValueError, match='eval.num_samples'):
    runner.self_consistency(c)
