r"""A traced step's device time by kind of work: trace_top's kernels joined with the optimized HLO.

  python benchmarks/fusion_table.py results/bench/2026-11-30-h200-trace.jsonl TAG HLO.txt.gz \
      [--top 12] [--json OUT.jsonl]

TAG picks the line of the trace file (benchmarks/trace_top.py --json); HLO is the step's optimized
module (benchmarks/profile_gpu.sh saves both). Each kernel is put in one group:
  matmul      cuBLAS (nvjet*, cutlass*) and XLA's Triton matmul fusions (gemm_fusion*)
  copy        memcpy / memset (e.g. a scanned layer's weight slices)
  forward     other fusions whose HLO op_name lies in the forward pass (`jvp(`)
  backward    other fusions of the backward pass (`transpose(jvp(`)
  outside     the rest, outside the model's forward and backward: the optimizer update, the
              loss's own loops, the zero-fill of saved-activation stacks
Prints ms per step and share for each group, then the largest kernels of each with their op_name.
"""

import argparse
import collections
import gzip
import json
import re


def op_names(hlo_path: str) -> dict[str, str]:
  """HLO instruction name -> its metadata op_name."""
  opener = gzip.open if hlo_path.endswith('.gz') else open
  names = {}
  pattern = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"')
  with opener(hlo_path, 'rt') as f:
    for line in f:
      m = pattern.match(line)
      if m:
        names[m.group(1)] = m.group(2)
  return names


def group(kernel: str, names: dict[str, str]) -> tuple[str, str]:
  """(group, op_name) of a trace kernel (trace names write `fusion.12` as `fusion_12`)."""
  if kernel.startswith(('nvjet', 'cutlass', 'sm90_', 'gemm_fusion')):
    return 'matmul', names.get(re.sub(r'_(\d+)$', r'.\1', kernel), '')
  if kernel.lower().startswith(('memcpy', 'memset')):
    return 'copy', ''
  op = names.get(re.sub(r'_(\d+)$', r'.\1', kernel), names.get(kernel, ''))
  if 'transpose(jvp(' in op:
    return 'backward', op
  if 'jvp(' in op:
    return 'forward', op
  return 'outside', op


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('trace_jsonl')
  p.add_argument('tag')
  p.add_argument('hlo')
  p.add_argument('--top', type=int, default=6)
  p.add_argument('--json', help='append the group totals as one JSON line to this file')
  args = p.parse_args()
  rows = [json.loads(line) for line in open(args.trace_jsonl) if line.strip()]
  row = next(r for r in rows if r['tag'] == args.tag)
  names = op_names(args.hlo)
  totals = collections.Counter()
  members = collections.defaultdict(list)
  for k in row['kernels']:
    g, op = group(k['name'], names)
    totals[g] += k['ms_per_step']
    members[g].append((k['ms_per_step'], k['launches_per_step'], k['name'], op))
  busy = sum(totals.values())
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps({'tag': args.tag, 'device_ms_per_step': busy,
                          'groups_ms_per_step': dict(totals)}) + '\n')
  print(f"{args.tag}: {busy:.1f} ms of device time per step")
  for g, ms in totals.most_common():
    print(f'  {g:9s} {ms:7.1f} ms {100 * ms / busy:5.1f}%')
  for g, _ in totals.most_common():
    print(f'-- {g}')
    for ms, n, name, op in sorted(members[g], reverse=True)[:args.top]:
      print(f'  {ms:7.2f} ms x{n:<5g} {name[:40]:40s} {op[-70:]}')


if __name__ == '__main__':
  main()
