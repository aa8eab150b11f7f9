r"""Report: Markdown tables and PNG plots from run directories.

  python -m gemma_sft_jax.report results/eval/2026-11-30-h200/base/base_0shot \
      results/runs/seeds/* results/runs/sweep_h200/*/ --output=report/

A run directory may hold results.json (from main: base / sft / train), eval_*.json (from eval)
and metrics.jsonl (from training), final.json (the final weights' metadata). Runs that differ
only in their seed are grouped (`group_key`) and shown with mean ± sample sd. Writes
OUTPUT/report.md, loss.png, learning_rate.png, accuracy.png and sweep.png (full SFT's and LoRA's
0-shot accuracy against peak learning rate). A directory with nothing to report is skipped with a note.
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys
import tempfile
from typing import Any, Sequence

from absl import app
from absl import flags

from gemma_sft_jax import plots

_OUTPUT = flags.DEFINE_string('output', 'report', 'Directory for report.md and the PNGs.')


def _read_json(path: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from None


def _peak_lr(metrics: Sequence[dict[str, Any]]) -> float | None:
  """The largest logged learning rate to 2 significant figures (the configured peak, which the
  schedule is logged near but not exactly at)."""
  lrs = [r['learning_rate'] for r in metrics if r.get('learning_rate') is not None]
  return float(f'{max(lrs):.1e}') if lrs else None


def load_run(path: str) -> dict[str, Any]:
  """Everything a run directory holds that the report uses.

  Args:
    path: a run directory.

  Returns:
    A dict with the run's name, its evaluations ('evals'), training summary ('train'), logged
    metrics ('metrics'), the seed its evaluation settings record ('seed', None if none) and
    'config': what the grouping key is made of (see `group_key`).

  Raises:
    FileNotFoundError: path is not a directory.
    ValueError: a JSON file in it is not valid JSON.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: not a run directory')
  run: dict[str, Any] = {'name': os.path.basename(os.path.normpath(path)), 'evals': [],
                         'train': None, 'seed': None}
  results = os.path.join(path, 'results.json')
  if os.path.exists(results):
    r = _read_json(results)
    run['train'] = r.get('train')
    for label in ('base', 'sft'):
      if isinstance(r.get(label), dict):
        run['evals'].append({'model': label, **r[label]})
  for file in sorted(glob.glob(os.path.join(path, 'eval_*.json'))):
    label = os.path.basename(file).split('_')[1]
    run['evals'].append({'model': label, **_read_json(file)})
  for e in run['evals']:
    seed = (e.get('settings') or {}).get('seed')
    if seed is not None and run['seed'] is None:
      run['seed'] = seed
  metrics = os.path.join(path, 'metrics.jsonl')
  run['metrics'] = []
  if os.path.exists(metrics):
    with open(metrics) as f:
      run['metrics'] = [json.loads(line) for line in f if line.strip()]
  final = os.path.join(path, 'final.json')
  meta = _read_json(final) if os.path.exists(final) else {}
  t = run['train'] or {}
  lora = meta.get('lora') or {}
  run['config'] = {
      'model': meta.get('model_variant'),
      'method': t.get('tuning_method') or meta.get('tuning_method'),
      'lora_rank': lora.get('rank'),
      'scan_layers': meta.get('scan_layers'),
      'peak_lr': _peak_lr(run['metrics']),
      'steps': t.get('step'),
      'tokens_per_step': t.get('tokens_per_step'),
      'strip_calculator': next((e['settings']['strip_calculator'] for e in run['evals']
                                if 'strip_calculator' in (e.get('settings') or {})), None),
  }
  return run


def skip_reason(run: dict[str, Any]) -> str | None:
  """Why a run directory has nothing to report (None if it has something)."""
  if not run['evals'] and not run['metrics'] and not run['train']:
    return 'no results.json, eval_*.json or metrics.jsonl (only final.json, if anything)'
  return None


def group_key(run: dict[str, Any]) -> tuple[Any, ...] | None:
  """What runs of one seed group share; None for a run that was not trained here.

  The key is the run's model variant, tuning method and LoRA rank (final.json), whether its
  layers were scanned (final.json; older runs do not record it), its peak learning rate (the
  largest in metrics.jsonl, 2 significant figures), its number of steps and tokens per step
  (results.json's train), and whether calculator annotations were stripped (its evaluation
  settings). Runs that share it differ in their seed (results.json's sft.settings.seed) or in
  settings the run directories do not record (minimum LR, warmup and LoRA alpha are not kept
  there).
  """
  if not run.get('train'):
    return None
  c = run['config']
  return (c['model'], c['method'], c['lora_rank'], c['scan_layers'], c['peak_lr'], c['steps'],
          c.get('tokens_per_step'), c.get('strip_calculator'))


def _group_name(names: Sequence[str]) -> str:
  if len(names) == 1:
    return names[0]
  prefix = re.sub(r'([_-](s|seed))?[_-]*$', '', os.path.commonprefix(list(names)))
  return f"{prefix or names[0]} ({len(names)} runs)"


def group_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Runs in groups that differ only in the seed (see `group_key`), in order of first appearance.

  A run that was not trained here (a base evaluation) is a group of its own. Each group has
  'name', 'key', 'runs' and 'evals': one entry per evaluation (model and prompts) with 'n' runs,
  their per-run accuracies and the mean and sample standard deviation (None for one run).
  """
  groups: dict[Any, dict[str, Any]] = {}
  for i, run in enumerate(runs):
    key = group_key(run)
    groups.setdefault(('run', i) if key is None else key, {'key': key, 'runs': []})['runs'].append(
        run)
  out = []
  for g in groups.values():
    g['name'] = _group_name([r['name'] for r in g['runs']])
    evals: dict[tuple[str, str], dict[str, Any]] = {}
    for run in g['runs']:
      for e in run['evals']:
        entry = evals.setdefault((e['model'], _shots(e)), {
            'model': e['model'], 'shots': _shots(e), 'runs': [], 'seeds': [], 'strict': [],
            'flexible': []})
        entry['runs'].append(run['name'])
        entry['seeds'].append(run['seed'])
        entry['strict'].append(e['strict_accuracy'])
        entry['flexible'].append(e['flexible_accuracy'])
    for entry in evals.values():
      entry['n'] = len(entry['runs'])
      for kind in ('strict', 'flexible'):
        entry[f'{kind}_mean'] = statistics.fmean(entry[kind])
        entry[f'{kind}_sd'] = statistics.stdev(entry[kind]) if entry['n'] > 1 else None
    g['evals'] = list(evals.values())
    out.append(g)
  return out


def _shots(e: dict[str, Any]) -> str:
  return {'zero_shot': '0-shot', 'one_shot': '1-shot'}.get(e['strategy'], f"{e['num_shots']}-shot")


def _median(values: Sequence[float]) -> float | None:
  values = sorted(v for v in values if v is not None)
  return values[len(values) // 2] if values else None


def _lm_eval(e: dict[str, Any], key: str) -> str:
  """lm-evaluation-harness's score for the same completions ('—' for evaluations made before it
  was recorded)."""
  value = (e.get('lm_eval') or {}).get(key)
  return '—' if value is None else f'{100 * value:.2f}%'


def accuracy_table(runs: Sequence[dict[str, Any]]) -> str:
  """Ours (strict `#### N`, flexible last number, numerically compared) beside lm-eval's gsm8k
  filters (strict-match, flexible-extract; string exact match) on the same completions."""
  lines = ['| run | model | prompts | n | strict | flexible | lm-eval strict-match | '
           'lm-eval flexible-extract | eval seconds |',
           '|---|---|---|---|---|---|---|---|---|']
  for run in runs:
    for e in run['evals']:
      lines.append(f"| {run['name']} | {e['model']} | {_shots(e)} | {e['n']} | "
                   f"{100 * e['strict_accuracy']:.2f}% | {100 * e['flexible_accuracy']:.2f}% | "
                   f"{_lm_eval(e, 'strict_match')} | {_lm_eval(e, 'flexible_extract')} | "
                   f"{e['seconds']:.1f} |")
  return '\n'.join(lines)


def _mean_sd(entry: dict[str, Any], kind: str) -> str:
  mean, sd = 100 * entry[f'{kind}_mean'], entry[f'{kind}_sd']
  return f'{mean:.2f}%' if sd is None else f'{mean:.2f}% ± {100 * sd:.2f}'


def _lr(value: float | None) -> str:
  return '—' if value is None else f'{value:.1e}'


def seed_table(groups: Sequence[dict[str, Any]]) -> str:
  """Trained runs grouped by `group_key`: per-run accuracies, n and mean ± sample sd."""
  lines = ['| group | method | peak LR | steps | layers | model | prompts | n | '
           'per run (seed): strict / flexible | strict mean ± sd | flexible mean ± sd |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for g in groups:
    if g['key'] is None:
      continue
    c = g['runs'][0]['config']
    method = c['method'] or '?'
    if c['lora_rank']:
      method += f" r{c['lora_rank']}"
    layers = {True: 'scanned', False: 'unrolled'}.get(c['scan_layers'], 'not recorded')
    for e in g['evals']:
      per_run = '; '.join(
          f"{name}{'' if seed is None else f' (seed {seed})'}: {100 * s:.2f}% / {100 * f:.2f}%"
          for name, seed, s, f in zip(e['runs'], e['seeds'], e['strict'], e['flexible']))
      lines.append(f"| {g['name']} | {method} | {_lr(c['peak_lr'])} | {c['steps']} | {layers} | "
                   f"{e['model']} | {e['shots']} | {e['n']} | {per_run} | "
                   f"{_mean_sd(e, 'strict')} | {_mean_sd(e, 'flexible')} |")
  return '\n'.join(lines)


def training_table(runs: Sequence[dict[str, Any]]) -> str:
  lines = ['| run | method | trainable params | total params | optimizer state | steps | '
           'final loss | median tokens/s | median step s | median MFU | peak GiB | train wall s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for run in runs:
    t, m = run.get('train'), run['metrics']
    if not t or not m:
      continue
    tps = _median([r.get('tokens_per_s') for r in m[1:]] or [None])
    mfu = _median([r.get('mfu') for r in m[1:]] or [None])
    mem = max((r.get('peak_memory_gib') or 0) for r in m)
    opt = t.get('optimizer_state_bytes')
    step_s = t['tokens_per_step'] / tps if tps and t.get('tokens_per_step') else None
    wall = t.get('train_seconds')
    if wall is not None and t.get('steps_run') not in (None, t['step']):
      wall = f"{wall:.0f} ({t['steps_run']} steps, resumed)"
    elif wall is not None:
      wall = f'{wall:.0f}'
    lines.append(
        f"| {run['name']} | {t.get('tuning_method', '?')} | {t['trainable_params']:,} | "
        f"{t['total_params']:,} | {'—' if opt is None else f'{opt / 2 ** 20:,.1f} MiB'} | "
        f"{t['step']} | {t['final_loss']:.3f} | {'' if tps is None else f'{tps:,.0f}'} | "
        f"{'—' if step_s is None else f'{step_s:.3f}'} | "
        f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {mem:.1f} | {wall or '—'} |")
  return '\n'.join(lines)


def plot(runs: Sequence[dict[str, Any]], output: str,
         groups: Sequence[dict[str, Any]] | None = None) -> list[str]:
  """Writes the PNGs into output; returns their file names."""
  if groups is None:
    groups = group_runs(runs)
  return (plots.curves(runs, output) + plots.accuracy(groups, output)
          + plots.sweep(groups, output))


_GROUPING_NOTE = (
    'Runs are grouped when they share model variant, tuning method and LoRA rank (final.json), '
    'scanned or unrolled layers (final.json; not recorded by older runs), peak learning rate (the '
    'largest in metrics.jsonl, 2 significant figures) and steps (results.json). Within a group '
    'they differ in the seed recorded in results.json (sft.settings.seed; shown after the run name '
    'where recorded) or in settings the run directories do not keep. sd is the sample standard '
    'deviation (n − 1); it needs n ≥ 2.')


def write_report(run_dirs: Sequence[str], output: str) -> str:
  """Writes output/report.md and the plots; returns the report's path.

  A run directory with nothing to report (only final.json, say) is skipped with a line on stderr
  and a note in the report.
  """
  runs, skipped = [], []
  for d in run_dirs:
    run = load_run(d)
    reason = skip_reason(run)
    if reason:
      print(f'skipping {d}: {reason}', file=sys.stderr)
      skipped.append(f'- `{d}`: {reason}')
    else:
      runs.append(run)
  os.makedirs(output, exist_ok=True)
  groups = group_runs(runs)
  pngs = plot(runs, output, groups)
  parts = ['# GSM8K fine-tuning report', '', '## Accuracy', '', accuracy_table(runs), '',
           '## Seed groups', '', _GROUPING_NOTE, '', seed_table(groups), '',
           '## Training', '', training_table(runs), '']
  if skipped:
    parts += ['## Skipped run directories', ''] + skipped + ['']
  parts += [f'![{p[:-4]}]({p})' for p in pngs]
  path = os.path.join(output, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(parts) + '\n')
  return path


def check_output(output: str) -> None:
  """The report's directory is (or can be made) a writable directory: a one-line ValueError."""
  if os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f'--output={output}: exists and is not a directory')
  try:
    os.makedirs(output, exist_ok=True)
    with tempfile.TemporaryFile(dir=output):
      pass
  except OSError as e:
    raise ValueError(f'--output={output}: cannot write there ({e.strerror or e})') from None


def run(run_dirs: Sequence[str], output: str) -> int:
  """Writes the report and prints its path; bad input is one line on stderr. Returns the exit
  status (2 for bad input)."""
  try:
    check_output(output)
    print(write_report(run_dirs, output))
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  return 0


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories')
  sys.exit(run(argv[1:], _OUTPUT.value))


if __name__ == '__main__':
  app.run(main)
