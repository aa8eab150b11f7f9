"""The report generator on small synthetic run directories."""

import json

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
  assert ('| full | full | 1,000 | 1,000 | 1.0 MiB | 20 | 0.500 | 20,000 | 0.100 | 10.0% | 0.0 | 12 |'
          in text)
  for png in ('loss.png', 'learning_rate.png', 'accuracy.png'):
    data = (tmp_path / 'out' / png).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    assert f']({png})' in text
