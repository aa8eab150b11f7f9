"""The report's PNG plots (report.py): training curves, accuracy per run group, and the learning
rate sweep. matplotlib is imported when a plot is drawn, not with this module.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def curves(runs: Sequence[dict[str, Any]], output: str) -> list[str]:
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


def accuracy(groups: Sequence[dict[str, Any]], output: str) -> list[str]:
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


def sweep(groups: Sequence[dict[str, Any]], output: str) -> list[str]:
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
