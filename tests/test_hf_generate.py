"""benchmarks/hf_generate.py, the transformers `generate` baseline of the GSM8K evaluation: on a
tiny random Gemma 3 written by save_pretrained it builds the same few-shot prompts as
`python -m gemma_sft_jax.eval`, generates the same greedy completions (batched, left-padded) and
scores them the same way; bad input is one line and exit 2."""

import glob
import json
import os
import subprocess
import sys

import pytest

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.model import architecture
from gemma_sft_jax.weights import export_formats
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import ROOT, tiny_config, write_hf_checkpoint

_SCRIPT = os.path.join(ROOT, 'benchmarks', 'hf_generate.py')
_N, _NEW, _SHOTS = 4, 12, 2


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope='module')
def both(tmp_path_factory, env):
  root = tmp_path_factory.mktemp('hf_generate')
  base = str(root / 'base')
  config = architecture.VARIANTS['tiny_gemma3']
  write_hf_checkpoint(base, config.to_hf_dict(), seed=1)
  export_formats.write_tokenizer_files(tokenizer_lib.ByteTokenizer(), base, source='',
                                       vocab_size=config.vocab_size)
  data = tiny_config('family=gemma3').data.source
  ours = subprocess.Popen(
      [sys.executable, '-m', 'gemma_sft_jax.eval', '--config=configs/tiny.py:family=gemma3',
       f'--config.model.checkpoint={base}', '--config.model.tokenizer=', '--base',
       f'--config.eval.limit={_N}', f'--config.eval.max_new_tokens={_NEW}',
       '--config.eval.prompt_strategy=few_shot', f'--config.eval.num_shots={_SHOTS}',
       f'--workdir={root / "ours"}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  theirs = subprocess.run(
      [sys.executable, _SCRIPT, f'--model={base}', '--device=cpu', '--dtype=float32',
       '--attn=eager', f'--limit={_N}', '--batch=3', f'--max_new_tokens={_NEW}',
       '--strategy=few_shot', f'--num_shots={_SHOTS}', f'--data={data}',
       f'--output={root / "hf.jsonl"}', f'--predictions={root / "hf_predictions.jsonl"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert theirs.returncode == 0, theirs.stderr[-3000:]
  _, err = ours.communicate(timeout=300)
  assert ours.returncode == 0, err[-3000:]
  [predictions] = glob.glob(str(root / 'ours' / 'predictions_base_*.jsonl'))
  return {'ours': _rows(predictions), 'theirs': _rows(root / 'hf_predictions.jsonl'),
          'line': _rows(root / 'hf.jsonl'), 'stdout': theirs.stdout, 'root': root, 'base': base}


def test_same_prompts_and_greedy_completions_as_our_evaluation(both):
  ours, theirs = both['ours'], both['theirs']
  assert len(ours) == len(theirs) == _N
  for a, b in zip(ours, theirs):
    assert a['prompt'] == b['prompt'] and a['prompt'].count('Question:') == _SHOTS + 1
    # transformers stops at a stop string, ours decodes on and cuts: equal once both are cut.
    assert gsm8k.truncate_completion(a['completion']) == gsm8k.truncate_completion(
        b['completion'])
    for key in ('extracted_strict', 'extracted_flexible', 'gold', 'correct_strict',
                'correct_flexible'):
      assert a[key] == b[key], key


def test_one_json_line_with_the_scores_of_its_predictions(both):
  [line] = both['line']
  assert json.loads(both['stdout'].strip().splitlines()[-1]) == line
  rows = both['theirs']
  assert (line['framework'], line['n'], line['strategy'], line['num_shots'], line['batch'],
          line['max_new_tokens']) == ('transformers', _N, 'few_shot', _SHOTS, 3, _NEW)
  assert line['flexible_accuracy'] == sum(r['correct_flexible'] for r in rows) / _N
  assert line['strict_accuracy'] == sum(r['correct_strict'] for r in rows) / _N
  assert set(line['lm_eval']) == set(gsm8k.LM_EVAL_FILTERS)
  assert line['seconds'] > 0 and line['questions_per_s'] == pytest.approx(_N / line['seconds'])
  assert line['device'] == 'cpu' and line['load_s'] > 0


@pytest.mark.parametrize('flags,named', [
    (['--model=/no/such/model'], '/no/such/model'),
    (['--model={base}', '--tokenizer=/no/such/tokenizer'], '/no/such/tokenizer'),
    (['--model={base}', '--batch=0'], '--batch'),
    (['--model={base}', '--data=/no/such/gsm8k'], '/no/such/gsm8k'),
])
def test_bad_input_is_one_line_exit_2(both, env, flags, named):
  flags = [f.format(base=both['base']) for f in flags]
  proc = subprocess.run([sys.executable, _SCRIPT, '--device=cpu', *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines and lines[-1].startswith('error: '), proc.stderr[-2000:]
  assert named in lines[-1] and 'Traceback' not in proc.stderr
