"""The decode and eval entry points end to end, on adapters that a real `main` LoRA run wrote.

One module fixture trains the tiny config with LoRA (a large LR, so the adapters clearly move),
then starts every CLI run at once (they only read the run directory) and collects their outputs;
the tests below check one run each. The in-process test checks that base + adapters decode
exactly like the merged weights in a plain (LoRA-free) model.
"""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemma_sft_jax import pytree
from gemma_sft_jax import runner
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import data as data_lib
from tests.conftest import ROOT, cli_env, tiny_config

PROMPTS = [
    'Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts '
    'in total does it take?\nAnswer:',
    'Question: What is 2 + 2?\nAnswer:',
    'Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:',
]
EVAL_LIMIT = 4
# Gemma 2's tiny variant has 3 layers to Gemma 3's 7: every CLI run compiles less.
CONFIG = '--config=configs/tiny.py:family=gemma2'


class _Proc:
  """A CLI subprocess whose stdout/stderr go to files under `root`."""

  def __init__(self, root, name, module, *flags):
    self.name = name
    self._out = open(os.path.join(root, f'{name}.stdout'), 'w+')
    self._err = open(os.path.join(root, f'{name}.stderr'), 'w+')
    self.proc = subprocess.Popen([sys.executable, '-m', f'gemma_sft_jax.{module}', *flags],
                                 cwd=ROOT, env=cli_env(os.path.join(root, 'jax_cache')),
                                 stdout=self._out, stderr=self._err)

  def result(self, timeout=300):
    rc = self.proc.wait(timeout=timeout)
    texts = []
    for f in (self._out, self._err):
      f.flush()
      f.seek(0)
      texts.append(f.read())
      f.close()
    return rc, texts[0], texts[1]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('cli'))
  workdir = os.path.join(root, 'run')
  prompts = os.path.join(root, 'prompts.jsonl')
  with open(prompts, 'w') as f:
    f.writelines(json.dumps({'prompt': p}) + '\n' for p in PROMPTS)
  bad = os.path.join(root, 'bad.jsonl')
  with open(bad, 'w') as f:
    f.write(json.dumps({'prompt': 'Question: 1 + 1?\nAnswer:'}) + '\n'
            + json.dumps({'text': 'no prompt key'}) + '\n')

  # Two runs at a time (compiling takes one core), in waves, so that later runs find the programs
  # of earlier ones (the random init, decoding) in the cache. Bad input fails before any model is
  # built, and the base model needs no trained run: both start beside the training.
  started = [_Proc(root, 'bad_input', 'decode', CONFIG, f'--prompts={bad}',
                   f'--output={root}/bad_out.jsonl'),
             _Proc(root, 'decode_base', 'decode', CONFIG, f'--prompts={prompts}',
                   f'--output={root}/base.jsonl')]
  rc, out, err = _Proc(root, 'train', 'main', f'{CONFIG},method=lora', f'--workdir={workdir}',
                       '--config.train.steps=10', '--config.optim.lr=0.05',
                       # Trained with scanned (stacked) layers; eval and decode below run the
                       # config's per-layer default and must follow final.json's layout.
                       '--config.model.scan_layers=true',
                       # An SFT eval with other settings than the standalone one below.
                       '--config.eval.run_base=false', f'--config.eval.limit={EVAL_LIMIT}',
                       '--config.eval.max_new_tokens=8').result()
  assert rc == 0, err[-3000:]
  final = os.path.join(workdir, 'final')
  assert os.path.isdir(final)
  with open(os.path.join(workdir, 'results.json')) as f:
    sft_predictions = json.load(f)['sft']['predictions']
  with open(sft_predictions) as f:
    sft_predictions = (sft_predictions, f.read())
  results = {p.name: p.result() for p in started}

  evaluate = ('eval', CONFIG, f'--workdir={workdir}', f'--config.eval.limit={EVAL_LIMIT}',
              '--config.eval.max_new_tokens=16')
  for wave in (
      [_Proc(root, 'decode_adapter', 'decode', CONFIG, f'--prompts={prompts}',
             f'--output={root}/adapter.jsonl', f'--adapter={final}'),
       _Proc(root, 'eval_base', *evaluate, '--base')],
      # --prompt turns a typed '\n' into a newline.
      [_Proc(root, 'decode_prompt', 'decode', CONFIG,
             '--prompt=' + PROMPTS[1].replace('\n', '\\n'), f'--adapter={final}'),
       _Proc(root, 'eval_sft', *evaluate)]):
    results.update({p.name: p.result() for p in wave})
  return {'root': root, 'workdir': workdir, 'final': final, 'bad': bad, 'results': results,
          'sft_predictions': sft_predictions}


def _ok(runs, name):
  rc, out, err = runs['results'][name]
  assert rc == 0, f'{name}: exit {rc}\n{err[-3000:]}'
  return out, err


def test_decode_cli_adapter_changes_the_output(runs):
  _ok(runs, 'decode_base')
  _ok(runs, 'decode_adapter')
  base = _read_jsonl(os.path.join(runs['root'], 'base.jsonl'))
  adapted = _read_jsonl(os.path.join(runs['root'], 'adapter.jsonl'))
  for rows in (base, adapted):
    assert [set(r) for r in rows] == [{'prompt', 'completion'}] * len(PROMPTS)
    assert [r['prompt'] for r in rows] == PROMPTS
    assert all(isinstance(r['completion'], str) for r in rows)
  assert [r['completion'] for r in base] != [r['completion'] for r in adapted]
  with open(os.path.join(runs['workdir'], 'final.json')) as f:
    assert json.load(f)['tuning_method'] == 'lora'


def test_decode_cli_single_prompt_prints_its_completion(runs):
  out, _ = _ok(runs, 'decode_prompt')
  adapted = _read_jsonl(os.path.join(runs['root'], 'adapter.jsonl'))
  assert out == adapted[1]['completion'] + '\n'


def test_decode_cli_bad_input_is_one_line_exit_2(runs):
  rc, _, err = runs['results']['bad_input']
  assert rc == 2
  assert err.strip().splitlines()[-1] == f'error: {runs["bad"]}:2: expected {{"prompt": str}}'
  assert 'Traceback' not in err
  assert not os.path.exists(os.path.join(runs['root'], 'bad_out.jsonl'))


def test_adapters_decode_like_merged_weights(runs):
  """base + adapters (the LoRA forward) == W + (alpha/r)·A·B in a model without LoRA."""
  config = tiny_config('family=gemma2')
  mesh = sharding.make_mesh(**config.mesh)
  setup, params = runner.load_trained(config, runs['final'], mesh=mesh)
  assert setup.model.lora.rank == config.lora.rank
  trained, _ = lora.split(params, 'lora')
  assert max(float(np.abs(b).max()) for b in jax.tree.leaves(trained)) > 0  # B moved off zero.
  merged = lora.merge_weights(params, setup.model.lora)
  assert setup.model.scan_layers and not config.model.scan_layers  # Layout from final.json.
  plain = setup.model.clone(lora=lora.LoraSpec())
  assert not any(lora.is_adapter_path(p) for p in jax.tree.leaves(pytree.paths(merged)))

  tok = setup.tokenizer
  ids = [data_lib.tokenize_prompt(p, tokenizer=tok) for p in PROMPTS]
  sampling = sampler.SamplingParams(max_new_tokens=config.decode.max_new_tokens)
  with_adapters = sampler.generate(setup.model, params, ids, sampling=sampling,
                                   eos_id=tok.eos_token_id)
  with_merged = sampler.generate(plain, merged, ids, sampling=sampling, eos_id=tok.eos_token_id)
  assert with_adapters == with_merged
  # And the CLI decoded exactly this.
  adapted = _read_jsonl(os.path.join(runs['root'], 'adapter.jsonl'))
  assert [tok.decode(x) for x in with_adapters] == [r['completion'] for r in adapted]


def test_eval_cli_writes_results_and_predictions(runs):
  results = {}
  for label in ('sft', 'base'):
    out, _ = _ok(runs, f'eval_{label}')
    [path] = glob.glob(os.path.join(runs['workdir'], f'eval_{label}_0shot_*.json'))
    assert f'results: {path}' in out
    with open(path) as f:
      result = json.load(f)
    rows = _read_jsonl(result['predictions'])
    # Both files are named by the evaluation's settings (a digest after the prompt strategy).
    digest = os.path.basename(path)[:-len('.json')].split('_')[-1]
    assert result['predictions'] == os.path.join(runs['workdir'],
                                                 f'predictions_{label}_0shot_{digest}.jsonl')
    assert result['settings']['limit'] == EVAL_LIMIT
    assert result['n'] == len(rows) == EVAL_LIMIT
    assert result['strict_correct'] == sum(r['correct_strict'] for r in rows)
    assert result['flexible_correct'] == sum(r['correct_flexible'] for r in rows)
    assert result['strict_accuracy'] == result['strict_correct'] / EVAL_LIMIT
    assert result['strategy'] == 'zero_shot'
    results[label] = rows
  # The standalone eval (other settings) left the predictions results.json refers to alone.
  path, text = runs['sft_predictions']
  with open(path) as f:
    assert f.read() == text
  with open(os.path.join(runs['workdir'], 'results.json')) as f:
    assert json.load(f)['sft']['predictions'] == path
  assert [r['prompt'] for r in results['sft']] == [r['prompt'] for r in results['base']]
  assert [r['completion'] for r in results['sft']] != [r['completion'] for r in results['base']]
