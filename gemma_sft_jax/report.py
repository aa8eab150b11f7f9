r"""Report: Markdown tables and PNG plots from run directories.

  python -m gemma_sft_jax.report results/runs/g3_270m_base results/runs/g3_270m_full \
      results/runs/g3_270m_lora --output=report/

A run directory may hold results.json (from main: base / sft / train), eval_*.json (from eval)
and metrics.jsonl (from training). Writes OUTPUT/report.md, loss.png, learning_rate.png and
accuracy.png.
"""

from __future__ import annotations

import glob
import json
import os
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


def load_run(path: str) -> dict[str, Any]:
  """Everything a run directory holds that the report uses."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: not a run directory')
  run: dict[str, Any] = {'name': os.path.basename(os.path.normpath(path)), 'evals': []}
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
  metrics = os.path.join(path, 'metrics.jsonl')
  run['metrics'] = []
  if os.path.exists(metrics):
    with open(metrics) as f:
      run['metrics'] = [json.loads(line) for line in f if line.strip()]
  return run


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


def plot(runs: Sequence[dict[str, Any]], output: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  written = []
  trained = [r for r in runs if r['metrics']]
  for key, ylabel, file in (('loss', 'train loss (per supervised token)', 'loss.png'),
                            ('learning_rate', 'learning rate', 'learning_rate.png')):
    if not trained:
      break
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in trained:
      ax.plot([r['step'] for r in run['metrics']], [r[key] for r in run['metrics']],
              label=run['name'], marker='.')
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    if key == 'loss':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, file), dpi=120)
    plt.close(fig)
    written.append(file)

  bars = [(f"{run['name']}\n{e['model']} {_shots(e)}", e) for run in runs for e in run['evals']]
  if bars:
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(bars)), 4.5))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [100 * e['strict_accuracy'] for _, e in bars], 0.4,
           label='strict (#### N)')
    ax.bar([x + 0.2 for x in xs], [100 * e['flexible_accuracy'] for _, e in bars], 0.4,
           label='flexible (last number)')
    ax.set_xticks(list(xs))
    ax.set_xticklabels([name for name, _ in bars], fontsize=8)
    ax.set_ylabel('GSM8K test accuracy (%)')
    ax.grid(axis='y', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, 'accuracy.png'), dpi=120)
    plt.close(fig)
    written.append('accuracy.png')
  return written


def write_report(run_dirs: Sequence[str], output: str) -> str:
  """Writes output/report.md and the plots; returns the report's path."""
  runs = [load_run(d) for d in run_dirs]
  os.makedirs(output, exist_ok=True)
  pngs = plot(runs, output)
  parts = ['# GSM8K fine-tuning report', '', '## Accuracy', '', accuracy_table(runs), '',
           '## Training', '', training_table(runs), '']
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
