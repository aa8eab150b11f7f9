"""The report generator on small synthetic run directories."""

import json
import math

import pytest

from gemma_sft_jax import report


def _eval(strategy, shots, strict, flexible):
  return {'strategy': strategy, 'num_shots': shots, 'n': 100, 'strict_correct': strict,
          'flexible_correct': flexible, 'strict_accuracy': strict / 100,
          'flexible_accuracy': flexible / 100, 'seconds': 1.5}


def test_report_tables_and_plots(tmp_path):
  base = tmp_path / 'base'
  base.mkdir()
  (base / 'eval_base_8shot.json').write_text(json.dumps(_eval('few_shot', 8, 1, 2)))
  run = tmp_path / 'full'
  run.mkdir()
  (run / 'results.json').write_text(json.dumps({
      'base': _eval('zero_shot', 0, 0, 1),
      'sft': dict(_eval('zero_shot', 0, 7, 9),
                  lm_eval={'strict_match': 0.07, 'flexible_extract': 0.085}),
      'train': {'step': 20, 'final_loss': 0.5, 'trainable_params': 1000, 'total_params': 1000,
                'tuning_method': 'full', 'tokens_per_step': 2000, 'optimizer_state_bytes': 2 ** 20,
                'train_seconds': 12.4, 'steps_run': 20}}))
  with open(run / 'metrics.jsonl', 'w') as f:
    for step, loss in ((1, 4.0), (10, 1.0), (20, 0.5)):
      f.write(json.dumps({'step': step, 'loss': loss, 'learning_rate': 1e-4 * step,
                          'tokens_per_s': 1000.0 * step, 'mfu': 0.1}) + '\n')
  path = report.write_report([str(base), str(run)], str(tmp_path / 'out'))
  text = open(path).read()
  assert '| base | base | 8-shot | 100 | 1.00% | 2.00% | — | — |' in text  # made before lm-eval
  assert '| full | sft | 0-shot | 100 | 7.00% | 9.00% | 7.00% | 8.50% |' in text
  # Median tokens/s over the windows after the first (10k, 20k: the upper one); step time is
  # tokens_per_step over it; no peak memory was logged.
  assert ('| full | full | 1,000 | 1,000 | 1.0 MiB | 20 | 0.500 | 20,000 | 0.100 | 10.0% | 0.0 | '
          '12 |') in text
  for png in ('loss.png', 'learning_rate.png', 'accuracy.png'):
    data = (tmp_path / 'out' / png).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    assert f']({png})' in text


def _trained_run(root, name, *, method='full', lr=2e-4, steps=20, seed=0, strict=7,
                 flexible=9, scan_layers=True):
  """A run directory as main writes it: results.json, metrics.jsonl and final.json."""
  run = root / name
  run.mkdir()
  sft = dict(_eval('zero_shot', 0, strict, flexible), settings={'seed': seed})
  (run / 'results.json').write_text(json.dumps({
      'sft': sft,
      'train': {'step': steps, 'final_loss': 0.5, 'trainable_params': 1000,
                'total_params': 1000, 'tuning_method': method}}))
  with open(run / 'metrics.jsonl', 'w') as f:
    # Warmup to just under the peak at the logged steps, then down to a tenth of it.
    for step, frac in ((1, 0.0), (5, 0.9951), (10, 0.5), (steps, 0.1)):
      f.write(json.dumps({'step': step, 'loss': 1.0, 'learning_rate': lr * frac}) + '\n')
  (run / 'final.json').write_text(json.dumps({
      'tuning_method': method, 'model_variant': 'gemma3_270m', 'step': steps,
      'scan_layers': scan_layers,
      'lora': {'rank': 16, 'alpha': 32.0} if method == 'lora' else None}))
  return run


def _seed_runs(tmp_path):
  dirs = [_trained_run(tmp_path, f'full_s{s}', seed=s, strict=st, flexible=fl)
          for s, st, fl in ((0, 7, 9), (1, 8, 10), (2, 9, 14))]
  dirs.append(_trained_run(tmp_path, 'full_lr1e-4', lr=1e-4, strict=5, flexible=6))
  dirs.append(_trained_run(tmp_path, 'lora_s0', method='lora', strict=3, flexible=4))
  dirs.append(_trained_run(tmp_path, 'full_unrolled', scan_layers=None, strict=1, flexible=2))
  return [str(d) for d in dirs]


def test_group_runs_seed_mean_and_sd(tmp_path):
  runs = [report.load_run(d) for d in _seed_runs(tmp_path)]
  assert [r['seed'] for r in runs[:3]] == [0, 1, 2]
  assert runs[0]['config']['peak_lr'] == 2e-4  # 1.99e-4 logged, 2 significant figures
  groups = report.group_runs(runs)
  # The three seeds share one group; another LR, LoRA and unrecorded layer scan stand alone.
  assert [[r['name'] for r in g['runs']] for g in groups] == [
      ['full_s0', 'full_s1', 'full_s2'], ['full_lr1e-4'], ['lora_s0'], ['full_unrolled']]
  assert groups[0]['name'] == 'full (3 runs)'
  (e,) = groups[0]['evals']
  assert e['n'] == 3 and e['seeds'] == [0, 1, 2]
  assert e['strict_mean'] == pytest.approx(0.08)
  assert e['strict_sd'] == pytest.approx(0.01)  # 7, 8, 9 of 100: sample sd 1 point
  assert e['flexible_mean'] == pytest.approx(0.11)
  assert e['flexible_sd'] == pytest.approx(math.sqrt(7) / 100)  # 9, 10, 14: (4 + 1 + 9) / 2
  (single,) = groups[1]['evals']
  assert single['n'] == 1 and single['flexible_sd'] is None


def test_report_seed_table_skip_and_plots(tmp_path, capsys):
  base = tmp_path / 'base'
  base.mkdir()
  (base / 'eval_base_0shot.json').write_text(json.dumps(_eval('zero_shot', 0, 0, 3)))
  only_final = tmp_path / 'lora_s1'
  only_final.mkdir()
  (only_final / 'final.json').write_text(json.dumps({'tuning_method': 'lora', 'step': 20}))
  dirs = [str(base)] + _seed_runs(tmp_path) + [str(only_final)]
  path = report.write_report(dirs, str(tmp_path / 'out'))
  text = open(path).read()
  assert f'skipping {only_final}: no results.json' in capsys.readouterr().err
  assert f'- `{only_final}`: no results.json' in text
  assert '| lora_s1 |' not in text
  assert ('| full (3 runs) | full | 2.0e-04 | 20 | scanned | sft | 0-shot | 3 | '
          'full_s0 (seed 0): 7.00% / 9.00%; full_s1 (seed 1): 8.00% / 10.00%; '
          'full_s2 (seed 2): 9.00% / 14.00% | 8.00% ± 1.00 | 11.00% ± 2.65 |') in text
  assert ('| full_lr1e-4 | full | 1.0e-04 | 20 | scanned | sft | 0-shot | 1 | '
          'full_lr1e-4 (seed 0): 5.00% / 6.00% | 5.00% | 6.00% |') in text
  assert '| lora_s0 | lora r16 | 2.0e-04 | 20 | scanned |' in text
  assert '| full_unrolled | full | 2.0e-04 | 20 | not recorded |' in text
  for png in ('loss.png', 'learning_rate.png', 'accuracy.png', 'sweep.png'):
    data = (tmp_path / 'out' / png).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    assert f']({png})' in text


def test_sweep_plot_needs_trained_runs(tmp_path):
  base = tmp_path / 'base'
  base.mkdir()
  (base / 'eval_base_0shot.json').write_text(json.dumps(_eval('zero_shot', 0, 0, 3)))
  report.write_report([str(base)], str(tmp_path / 'only_base'))
  assert not (tmp_path / 'only_base' / 'sweep.png').exists()
  run = _trained_run(tmp_path, 'lora_s0', method='lora')
  report.write_report([str(base), str(run)], str(tmp_path / 'out'))
  assert (tmp_path / 'out' / 'sweep.png').read_bytes()[:4] == b'\x89PNG'
