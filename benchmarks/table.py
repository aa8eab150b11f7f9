r"""Markdown tables from a benchmark JSONL file (benchmarks/compare.sh writes it).

  python benchmarks/table.py results/bench/2026-11-29-h200.jsonl            # print the tables
  python benchmarks/table.py --write BENCHMARKS.md README.md           # refresh the marked tables

The tables in BENCHMARKS.md and the README sit between `<!-- bench:NAME:begin source=FILE -->`
and `<!-- bench:NAME:end -->` markers; `--write` replaces each with the table generated from its
FILE (a path from the repository root), and tests/test_bench_tables.py checks that they match.
NAME is `compare` (gemma_sft_jax beside transformers on one GPU) or `scaling` (tokens/s per GPU at
mesh.fsdp=2 against one GPU).
"""

import argparse
import json
import os
import re
import sys

_CASES = (('gemma2_2b', 'full', 'Gemma 2 2B full SFT'),
          ('gemma2_9b', 'lora', 'Gemma 2 9B LoRA r16, all linear layers'),
          ('gemma2_9b', 'full', 'Gemma 2 9B full SFT, 8-bit AdamW states'))


def load(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _ours_all(rows, model, method, n_devices=1):
  """Every gemma_sft_jax line of a case (the config default first, then tagged variants)."""
  found = [r for r in rows if r['framework'] == 'gemma_sft_jax' and r['model'] == model
           and r['method'] == method and r['n_devices'] == n_devices]
  return sorted(found, key=lambda r: bool(r.get('tag')))


def _ours(rows, model, method, n_devices=1):
  """The untagged (config default at the time of the run) gemma_sft_jax line of a case."""
  found = [r for r in _ours_all(rows, model, method, n_devices) if not r.get('tag')]
  return found[-1] if found else None


def _theirs(rows, model, method):
  found = [r for r in rows if r['framework'] == 'transformers' and r['model'] == model
           and r['method'] == method]
  return found[-1] if found else None


def _hf_settings(r: dict) -> str:
  parts = [r['optimizer'], r['attn_implementation']]
  if r.get('gradient_checkpointing'):
    parts.append('gradient checkpointing')
  return ', '.join(parts)


def compare_table(rows: list[dict]) -> str:
  """gemma_sft_jax beside transformers for the three cases, with the ratio of tokens/s."""
  out = ['| case | gemma_sft_jax tokens/s | MFU | peak GiB | remat | transformers tokens/s | '
         'peak GiB | transformers settings | ratio |',
         '|---|---|---|---|---|---|---|---|---|']
  for model, method, name in _CASES:
    theirs = _theirs(rows, model, method)
    for ours in _ours_all(rows, model, method) if theirs else ():
      out.append(
          f"| {name} | {ours['tokens_per_s']:,.0f} | {ours['mfu']:.1%} | "
          f"{ours['peak_memory_gib']:.1f} | `{ours['remat']}` | {theirs['tokens_per_s']:,.0f} | "
          f"{theirs['peak_memory_gib']:.1f} | {_hf_settings(theirs)} | "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× |")
  return '\n'.join(out)


def scaling_table(rows: list[dict]) -> str:
  """Per-GPU tokens/s at mesh.fsdp=2 (per-GPU batch unchanged) against one GPU."""
  out = ['| case | 1 GPU tokens/s | 2 GPUs tokens/s per GPU | peak GiB per GPU | efficiency |',
         '|---|---|---|---|---|']
  for model, method, name in _CASES:
    one, two = _ours(rows, model, method, 1), _ours(rows, model, method, 2)
    if one is None or two is None:
      continue
    out.append(f"| {name} | {one['tokens_per_s']:,.0f} | {two['tokens_per_s_per_device']:,.0f} | "
               f"{two['peak_memory_gib']:.1f} | "
               f"{two['tokens_per_s_per_device'] / one['tokens_per_s']:.0%} |")
  return '\n'.join(out)


TABLES = {'compare': compare_table, 'scaling': scaling_table}


BLOCK = re.compile(r'(<!-- bench:(\w+):begin source=(\S+) -->\n)(.*?)\n?(<!-- bench:\2:end -->)',
                   re.S)


def blocks(text: str) -> list[tuple[str, str, str]]:
  """(name, source, current table) of every marked table in a document."""
  return [(m.group(2), m.group(3), m.group(4)) for m in BLOCK.finditer(text)]


def render(name: str, source: str, root: str = '.') -> str:
  return TABLES[name](load(os.path.join(root, source)))


def write(path: str, root: str = '.') -> int:
  """Replaces every marked table in `path`; returns how many it replaced."""
  with open(path) as f:
    text = f.read()
  text, count = BLOCK.subn(
      lambda m: m.group(1) + render(m.group(2), m.group(3), root) + '\n' + m.group(5), text)
  with open(path, 'w') as f:
    f.write(text)
  return count


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('jsonl', nargs='?', help='print the tables of this file')
  parser.add_argument('--write', nargs='*', default=[], help='files whose marked tables to replace')
  args = parser.parse_args(argv)
  if args.jsonl:
    rows = load(args.jsonl)
    for name, fn in TABLES.items():
      print(f'{name}:\n{fn(rows)}\n')
  for path in args.write:
    if not write(path):
      print(f'error: {path} has no <!-- bench:NAME:begin --> marker', file=sys.stderr)
      return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
