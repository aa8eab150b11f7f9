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


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _plot_curves(runs: Sequence[dict[str, Any]], output: str) -> list[str]:
  plt = _pyplot()
  written = []
  trained = [r for r in runs if r['metrics']]
  for key, ylabel, file in (('loss', 'train loss (per supervised token)', 'loss.png'),
                            ('learning_rate', 'learning rate', 'learning_rate.png')):
    if not trained:
      break
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in trained:
      logged = [r for r in run['metrics'] if r.get(key) is not None and r[key] > 0]  # log scale
      ax.plot([r['step'] for r in logged], [r[key] for r in logged], label=run['name'],
              marker='.', linewidth=1)
    ax.set_xlabel('step')
    ax.set_ylabel(f'{ylabel} (log scale)')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(output, file), dpi=120)
    plt.close(fig)
    written.append(file)
  return written


def _plot_accuracy(groups: Sequence[dict[str, Any]], output: str) -> list[str]:
  """Bars: the mean over each group's runs, ± one sample sd; dots: the runs."""
  plt = _pyplot()
  bars = [(g, e) for g in groups for e in g['evals']]
  if not bars:
    return []
  fig, ax = plt.subplots(figsize=(max(7, 1.25 * len(bars)), 5))
  xs = list(range(len(bars)))
  for kind, dx, label in (('strict', -0.2, 'strict (#### N)'),
                          ('flexible', 0.2, 'flexible (last number)')):
    means = [100 * e[f'{kind}_mean'] for _, e in bars]
    sds = [None if e[f'{kind}_sd'] is None else 100 * e[f'{kind}_sd'] for _, e in bars]
    ax.bar([x + dx for x in xs], means, 0.4, label=f'{label}, mean')
    for x, (_, e), mean, sd in zip(xs, bars, means, sds):
      if e['n'] > 1:
        ax.errorbar([x + dx], [mean], yerr=[sd], color='black', capsize=5, elinewidth=1.2,
                    zorder=4)
        ax.scatter([x + dx] * e['n'], [100 * v for v in e[kind]], s=14, color='black',
                   zorder=3)
  ax.scatter([], [], s=14, color='black', label='single runs of a group')
  ax.errorbar([], [], yerr=[], color='black', capsize=4, label='± 1 sample sd (n ≥ 2)')
  ax.set_xticks(xs)
  ax.set_xticklabels([f"{g['name']}\n{e['model']} {e['shots']}, n={e['n']}" for g, e in bars],
                     fontsize=7, rotation=25, ha='right', rotation_mode='anchor')
  ax.set_ylabel('GSM8K test accuracy (%)')
  ax.set_xlabel('run or seed group, model, prompts, runs in the group')
  ax.set_title('GSM8K test accuracy (bars: mean over the runs of a group)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(output, 'accuracy.png'), dpi=120)
  plt.close(fig)
  return ['accuracy.png']


def _series(c: dict[str, Any]) -> str:
  """A sweep plot's series: what a group's runs share besides the peak learning rate."""
  rows = f"{c['tokens_per_step']:,} tokens" if c.get('tokens_per_step') else 'batch not recorded'
  rank = f"r{c['lora_rank']}, " if c['method'] == 'lora' else ''
  calc = ', calculator kept' if c.get('strip_calculator') is False else ''
  return f"{rank}{rows} × {c['steps']} steps{calc}"


def _plot_sweep(groups: Sequence[dict[str, Any]], output: str) -> list[str]:
  """0-shot flexible accuracy against peak learning rate: full SFT and LoRA side by side, one
  colour per series (LoRA rank, tokens per step, steps), seed groups with mean ± sd."""
  plt = _pyplot()
  panels = {'full': [], 'lora': []}  # method -> [(series, group, eval entry)]
  for g in groups:
    c = g['runs'][0]['config']
    if g['key'] is None or c['method'] not in panels or c['peak_lr'] is None:
      continue
    for e in g['evals']:
      if e['model'] == 'sft' and e['shots'] == '0-shot':
        panels[c['method']].append((_series(c), g, e))
  panels = {m: p for m, p in panels.items() if p}
  if not panels:
    return []
  fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.2), sharey=True,
                           squeeze=False)
  base = [e for g in groups if g['key'] is None for e in g['evals']
          if e['model'] == 'base' and e['shots'] == '0-shot']
  markers = 'osD^v<>'
  for ax, (method, points) in zip(axes[0], panels.items()):
    for i, series in enumerate(sorted({p[0] for p in points})):
      color = f'C{i}'
      first_run = first_mean = True
      for _, g, e in (p for p in points if p[0] == series):
        lr = g['runs'][0]['config']['peak_lr']
        ax.scatter([lr] * e['n'], [100 * v for v in e['flexible']], color=color, alpha=0.6,
                   s=22, marker=markers[i % len(markers)],
                   label=f'{series}: a run' if first_run else None)
        first_run = False
        if e['n'] > 1:
          ax.errorbar([lr * 1.06], [100 * e['flexible_mean']], yerr=[100 * e['flexible_sd']],
                      color=color, fmt='_', markersize=14, capsize=5, elinewidth=1.5,
                      label=f'{series}: mean ± sd' if first_mean else None)
          ax.annotate(f"n={e['n']}", (lr * 1.14, 100 * e['flexible_mean']), fontsize=8,
                      color=color, va='center')
          first_mean = False
    if base:
      ax.axhline(100 * base[0]['flexible_mean'], color='gray', linestyle='--', linewidth=1,
                 label='base model, 0-shot')
    ax.set_xscale('log')
    lrs = [g['runs'][0]['config']['peak_lr'] for _, g, _ in points]
    ax.set_xlim(min(lrs) / 1.3, max(lrs) * 1.5)
    ax.set_xlabel('peak learning rate (log scale)')
    ax.set_ylabel('GSM8K test accuracy, 0-shot flexible (%)')
    ax.set_title(f"{'Full SFT' if method == 'full' else 'LoRA'}: accuracy against peak "
                 'learning rate')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(os.path.join(output, 'sweep.png'), dpi=120)
  plt.close(fig)
  return ['sweep.png']


def plot(runs: Sequence[dict[str, Any]], output: str,
         groups: Sequence[dict[str, Any]] | None = None) -> list[str]:
  """Writes the PNGs into output; returns their file names."""
  if groups is None:
    groups = group_runs(runs)
  return (_plot_curves(runs, output) + _plot_accuracy(groups, output)
          + _plot_sweep(groups, output))


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
