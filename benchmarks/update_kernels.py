r"""The optimizer update's kernels in a traced step: the fusions that write the step's new state.

  python benchmarks/update_kernels.py TRACE.jsonl TAG HLO.txt.gz

TRACE and TAG pick a line of benchmarks/trace_top.py's --json output, HLO is the same step's
optimized module (benchmarks/profile_gpu.sh saves both). The update's kernels are the XLA fusions
whose results reach the entry computation's ROOT tuple (the new params, moments and counters)
through get-tuple-element, bitcast, copy or optimization barriers; Pallas kernels (the 8-bit
update) are custom calls, not counted here. Prints one JSON line: ms per step, launches per step,
the kernel names and the step's device ms.
"""

import argparse
import gzip
import json
import re

_DEF = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'([a-z][a-z\-]*)\(')  # the first `name(` after the (tuple) type
_PASS_THROUGH = ('get-tuple-element', 'bitcast', 'copy', 'opt-barrier')


def state_writers(hlo_text: str) -> set[str]:
  """Names (as trace kernels spell them: `.` -> `_`) of the entry's fusions feeding its ROOT."""
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  defs, root = {}, []
  for line in entry.split('\n')[1:]:
    m = _DEF.match(line)
    if not m:
      continue
    defs[m.group(2)] = _instruction(m.group(3))
    if m.group(1):
      root = defs[m.group(2)][1]
      break
  found = set()
  todo, seen = list(root), set()
  while todo:
    name = todo.pop()
    if name in seen or name not in defs:
      continue
    seen.add(name)
    opcode, operands = defs[name]
    if opcode == 'fusion':
      found.add(name.replace('.', '_'))
    elif opcode in _PASS_THROUGH:
      todo.extend(operands)
  return found


def _instruction(rest: str) -> tuple[str, list[str]]:
  """(opcode, %operand names) of an HLO instruction's right-hand side."""
  m = _OPCODE.search(rest)
  if not m:
    return '', []
  depth = 0
  for i in range(m.end() - 1, len(rest)):
    depth += {'(': 1, ')': -1}.get(rest[i], 0)
    if depth == 0:
      return m.group(1), re.findall(r'%([\w.\-]+)', rest[m.end():i])
  return m.group(1), re.findall(r'%([\w.\-]+)', rest[m.end():])


def summary(trace_line: dict, names: set[str]) -> dict:
  kernels = [k for k in trace_line['kernels'] if k['name'] in names]
  return {'tag': trace_line['tag'],
          'update_ms_per_step': sum(k['ms_per_step'] for k in kernels),
          'update_launches_per_step': sum(k['launches_per_step'] for k in kernels),
          'update_kernels': sorted(k['name'] for k in kernels),
          'device_ms_per_step': trace_line['device_ms_per_step']}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('trace')
  parser.add_argument('tag')
  parser.add_argument('hlo')
  args = parser.parse_args()
  with open(args.trace) as f:
    line = next(d for d in map(json.loads, f) if d['tag'] == args.tag)
  opener = gzip.open if args.hlo.endswith('.gz') else open
  with opener(args.hlo, 'rt') as f:
    names = state_writers(f.read())
  print(json.dumps(summary(line, names)))


if __name__ == '__main__':
  main()
