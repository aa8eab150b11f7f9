"""GSM8K evaluation: the same prompts for the base and the fine-tuned model, strict and flexible accuracy.

Prompts come from `gsm8k.build_prompt` (zero_shot | one_shot | few_shot) and are tokenised with
`data.tokenize_prompt`, exactly as training tokenises its prompts. Completions are decoded greedily
by `sampler.generate` (prompts sorted by length so each batch pads little), cut at the first stop
string (`gsm8k.truncate_completion`), and scored: strict = the number after '####', flexible = the
last number. Every prediction goes to a JSONL file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
from tqdm import auto as tqdm

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.training import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How evaluation prompts are built; one spec gives identical prompts to base and SFT models."""
  strategy: str = 'zero_shot'
  num_shots: int = 8
  seed: int = 0
  one_shot_example: str = ''  # 'question|||answer' or '' for the first train example
  template: str = gsm8k.DEFAULT_PROMPT_TEMPLATE
  strip_calculator: bool = True

  @property
  def name(self) -> str:
    return {'zero_shot': '0shot', 'one_shot': '1shot'}.get(self.strategy,
                                                          f'{self.num_shots}shot')

  def build(self, question: str, pool: Sequence[gsm8k.Example]) -> str:
    example = gsm8k.parse_example(self.one_shot_example) if self.one_shot_example else None
    return gsm8k.build_prompt(question, strategy=self.strategy, pool=pool,
                              num_shots=self.num_shots, seed=self.seed,
                              one_shot_example=example, template=self.template,
                              strip_calculator=self.strip_calculator)


@dataclasses.dataclass(frozen=True)
class SelfConsistency:
  """Sample `num_samples` completions per question (seeds seed, seed + 1, ...) besides the
  greedy one, and score the majority answer (maj@k) and whether any sample is right (pass@k)."""
  num_samples: int
  temperature: float = 0.7
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.num_samples < 2:
      raise ValueError(f'eval.num_samples={self.num_samples}: self-consistency needs at least 2')
    if self.temperature <= 0:
      raise ValueError(f'eval.temperature={self.temperature} must be > 0 to sample')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'eval.top_p={self.top_p} must be in (0, 1]')


def majority(votes: Sequence[str | None]) -> str | None:
  """The most frequent extracted answer (None votes do not count); a tie goes to the answer
  that appeared first, so the result does not depend on anything but the samples' order."""
  counts: dict[str, int] = {}
  for v in votes:
    if v is not None:
      counts[v] = counts.get(v, 0) + 1
  if not counts:
    return None
  best = max(counts.values())
  return next(v for v in counts if counts[v] == best)  # dicts keep first-seen order


def stop_sequences(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
  """Token sequences that end decoding early (text-level truncation stays authoritative)."""
  seqs = {tuple(tokenizer.encode(s, add_special_tokens=False)) for s in gsm8k.STOP_STRINGS}
  return tuple(sorted(s for s in seqs if s))


def evaluate_gsm8k(*, model: model_lib.Transformer, params: Any, tokenizer: Any,
                   questions: Sequence[gsm8k.Example], pool: Sequence[gsm8k.Example],
                   prompts: PromptSpec, batch_size: int, max_new_tokens: int,
                   predictions_path: str | None = None,
                   batch_sharding: jax.sharding.Sharding | None = None,
                   label: str = 'eval', progress: bool = True,
                   consistency: SelfConsistency | None = None) -> dict[str, Any]:
  """Greedy-decodes every question and scores it (and, optionally, k sampled completions).

  Args:
    model: the Transformer; `params` must match it (adapters included for LoRA).
    params: the parameters.
    tokenizer: the checkpoint's tokenizer.
    questions: the test examples.
    pool: exemplar pool for one/few-shot prompts (the train split).
    prompts: the prompt spec.
    batch_size: decode slots (a slot whose completion ended takes the next prompt).
    max_new_tokens: decode budget per question.
    predictions_path: where to write one JSON line per question (None: don't).
    batch_sharding: sharding of the [B, L] prompt batch (e.g. over the mesh's data axes).
    label: a name for progress output.
    progress: show a progress bar.
    consistency: also sample this many completions per question and report maj@k / pass@k
      (`self_consistency` in the result, `samples` per question in the predictions file).

  Returns:
    {'strategy', 'num_shots', 'n', 'strict_correct', 'flexible_correct', 'strict_accuracy',
     'flexible_accuracy', 'seconds', 'compile_seconds' (XLA compilation within 'seconds'),
     'prompt_tokens_mean', 'lm_eval': {'strict_match', 'flexible_extract'}}; the lm_eval fractions are the means of the predictions file's
     `lm_eval_correct_*` fields.
  """
  t0 = time.time()
  texts = [prompts.build(q.question, pool) for q in questions]
  ids = [data_lib.tokenize_prompt(t, tokenizer=tokenizer) for t in texts]
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  stops = stop_sequences(tokenizer)

  compiling = metrics_lib.CompileTimer()

  def decode_all(sampling: sampler.SamplingParams, seed: int, desc: str) -> list[str]:
    generate = sampler.Generator(model, sampling=sampling, eos_id=tokenizer.eos_token_id)
    bar = tqdm.tqdm(total=len(ids), desc=desc, disable=not progress or jax.process_index() != 0)
    with compiling:
      out = generate(params, [ids[i] for i in order], pad_id=tokenizer.pad_token_id or 0,
                     batch_sharding=batch_sharding, seed=seed, batch_size=batch_size,
                     on_done=bar.update)
    bar.close()
    completions: list[str] = [''] * len(ids)
    for i, tokens in zip(order, out):
      completions[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return completions

  completions = decode_all(sampler.SamplingParams(max_new_tokens=max_new_tokens,
                                                  stop_sequences=stops), 0, label)
  samples: list[list[str]] = []
  if consistency is not None:
    sampling = sampler.SamplingParams(max_new_tokens=max_new_tokens, stop_sequences=stops,
                                      temperature=consistency.temperature,
                                      top_p=consistency.top_p)
    samples = [decode_all(sampling, consistency.seed + j,
                          f'{label} sample {j + 1}/{consistency.num_samples}')
               for j in range(consistency.num_samples)]

  strict = flexible = 0
  rows = []
  for q, text, completion in zip(questions, texts, completions):
    answer = gsm8k.truncate_completion(completion)
    s, f = gsm8k.extract_strict(answer), gsm8k.extract_flexible(answer)
    ok_s, ok_f = gsm8k.is_correct(s, q.gold), gsm8k.is_correct(f, q.gold)
    strict += ok_s
    flexible += ok_f
    lm_s, lm_f = (gsm8k.lm_eval_extract(answer, k) for k in gsm8k.LM_EVAL_FILTERS)
    rows.append({'question': q.question, 'prompt': text, 'completion': completion,
                 'extracted_strict': s, 'extracted_flexible': f, 'gold': q.gold,
                 'correct_strict': ok_s, 'correct_flexible': ok_f,
                 'lm_eval_strict_match': lm_s, 'lm_eval_flexible_extract': lm_f,
                 'lm_eval_correct_strict_match': gsm8k.lm_eval_exact_match(lm_s, q.answer),
                 'lm_eval_correct_flexible_extract': gsm8k.lm_eval_exact_match(lm_f, q.answer)})
  for i, row in enumerate(rows if samples else ()):
    answers = [gsm8k.truncate_completion(sample[i]) for sample in samples]
    row['samples'] = [sample[i] for sample in samples]
    for kind, extract in (('strict', gsm8k.extract_strict), ('flexible', gsm8k.extract_flexible)):
      votes = [extract(a) for a in answers]
      row[f'majority_{kind}'] = majority(votes)
      row[f'correct_majority_{kind}'] = gsm8k.is_correct(row[f'majority_{kind}'], row['gold'])
      row[f'correct_any_{kind}'] = any(gsm8k.is_correct(v, row['gold']) for v in votes)
  if predictions_path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(predictions_path) or '.', exist_ok=True)
    with open(predictions_path, 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
  n = len(questions)
  return {'strategy': prompts.strategy, 'num_shots': prompts.num_shots if
          prompts.strategy == 'few_shot' else int(prompts.strategy == 'one_shot'),
          'n': n, 'strict_correct': strict, 'flexible_correct': flexible,
          'strict_accuracy': strict / max(n, 1), 'flexible_accuracy': flexible / max(n, 1),
          'seconds': time.time() - t0, 'compile_seconds': compiling.seconds,
          'prompt_tokens_mean': sum(map(len, ids)) / max(n, 1),
          # What lm-evaluation-harness's gsm8k task scores for these completions (gsm8k.py).
          'lm_eval': {k: sum(r[f'lm_eval_correct_{k}'] for r in rows) / max(n, 1)
                      for k in gsm8k.LM_EVAL_FILTERS},
          **({'self_consistency': {
              'k': consistency.num_samples, 'temperature': consistency.temperature,
              'top_p': consistency.top_p, 'seed': consistency.seed,
              **{f'{name}_at_k_{kind}': sum(r[f'correct_{field}_{kind}'] for r in rows) / max(n, 1)
                 for name, field in (('maj', 'majority'), ('pass', 'any'))
                 for kind in ('strict', 'flexible')}}} if samples else {})}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A readable table of {'base': r, 'sft': r, ...} results."""
  lines = [f'{"model":<10} {"prompts":<8} {"n":>5} {"strict":>8} {"flexible":>9} {"seconds":>8}'
           f' {"lm-eval strict":>15} {"lm-eval flexible":>17}']
  for name, r in results.items():
    if not isinstance(r, dict) or 'n' not in r:
      continue
    shots = {'zero_shot': '0-shot', 'one_shot': '1-shot'}.get(r['strategy'], f"{r['num_shots']}-shot")
    lm = r.get('lm_eval') or {}
    lm_cells = ''.join(f' {100 * lm[k]:>{w - 1}.2f}%' if k in lm else f' {"-":>{w}}'
                       for k, w in (('strict_match', 15), ('flexible_extract', 17)))
    sc = r.get('self_consistency')
    if sc:  # Flexible extraction, as the base-vs-SFT comparison reads best.
      lm_cells += (f'  maj@{sc["k"]} {100 * sc["maj_at_k_flexible"]:.2f}%'
                   f'  pass@{sc["k"]} {100 * sc["pass_at_k_flexible"]:.2f}%')
    lines.append(f'{name:<10} {shots:<8} {r["n"]:>5} {100 * r["strict_accuracy"]:>7.2f}% '
                 f'{100 * r["flexible_accuracy"]:>8.2f}% {r["seconds"]:>8.1f}{lm_cells}')
  return '\n'.join(lines)
