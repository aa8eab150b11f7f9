r"""The evaluation-speed table from `benchmarks/eval_speed_gpu.sh` output directories.

  python benchmarks/eval_table.py results/eval/2026-11-30-h200/base results/eval/2026-11-30-h200/sft

For each directory: our evaluations (`<name>/eval_*.json` or `eval_*.json`; seconds, XLA
compilation seconds inside them) beside transformers' (`hf_generate.jsonl`) on the same model and
prompts, and the process wall times of ours (`wall.txt`). Questions per second exclude compilation
for ours (transformers compiles nothing; its model load is excluded too); the ratio is ours over
transformers'. Prints a markdown table.
"""

import glob
import json
import os
import sys


def _ours(directory: str) -> list[tuple[str, dict]]:
  found = sorted(glob.glob(os.path.join(directory, '*', 'eval_*.json')) +
                 glob.glob(os.path.join(directory, 'eval_*.json')))
  out = []
  for path in found:
    name = os.path.basename(os.path.dirname(path))
    if name == os.path.basename(directory.rstrip('/')):
      name = os.path.basename(path)[len('eval_'):].rsplit('_', 1)[0]
    with open(path) as f:
      out.append((name, json.load(f)))
  return out


def _walls(directory: str) -> dict[str, float]:
  walls = {}
  path = os.path.join(directory, 'wall.txt')
  if os.path.exists(path):
    for line in open(path):
      parts = dict(p.split('=', 1) for p in line.split()[1:] if '=' in p)
      if parts.get('rc') == '0' and 'wall_s' in parts:
        walls[line.split()[0]] = float(parts['wall_s'])
  return walls


def rows(directory: str) -> list[str]:
  with open(os.path.join(directory, 'hf_generate.jsonl')) as f:
    hf = {r['strategy']: r for r in map(json.loads, f) if r.get('n')}
  walls = _walls(directory)
  out = []
  for name, r in _ours(directory):
    theirs = hf.get(r['strategy'])
    run_s = r['seconds'] - r.get('compile_seconds', 0.0)
    qps = r['n'] / run_s
    shots = '0-shot' if r['strategy'] == 'zero_shot' else f"{r['num_shots']}-shot"
    cache = 'warm' if name.endswith('_warm') else 'cold'
    cells = [name, shots, cache, str(r['n']), f"{r['seconds']:.1f}",
             f"{r.get('compile_seconds', 0.0):.1f}", f'{qps:.0f}',
             f"{walls[name]:.1f}" if name in walls else '—',
             f"{100 * r['flexible_accuracy']:.2f}%"]
    if theirs:
      cells += [f"{theirs['seconds']:.1f}", f"{theirs['questions_per_s']:.2f}",
                f"{100 * theirs['flexible_accuracy']:.2f}%",
                f"{qps / theirs['questions_per_s']:.1f}×"]
    else:
      cells += ['—'] * 4
    out.append('| ' + ' | '.join(cells) + ' |')
  return out


def main(argv: list[str]) -> None:
  print('| run | prompts | compilation cache | n | ours s | of which compiling | ours q/s '
        '(no compile) | process wall s | ours flexible | transformers s | transformers q/s | '
        'transformers flexible | ratio |')
  print('|' + '---|' * 13)
  for directory in argv:
    print('\n'.join(rows(directory)))


if __name__ == '__main__':
  main(sys.argv[1:])
