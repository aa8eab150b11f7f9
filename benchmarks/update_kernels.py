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

import live_buffers  # benchmarks/live_buffers.py: the HLO entry computation's instructions

_PASS_THROUGH = ('get-tuple-element', 'bitcast', 'copy', 'opt-barrier', 'tuple')


def state_writers(hlo_text: str) -> set[str]:
  """Names (as trace kernels spell them: `.` -> `_`) of the entry's fusions feeding its ROOT."""
  insts = live_buffers.parse(hlo_text)
  by_name = {inst.name: inst for inst in insts}
  found, seen = set(), set()
  todo = [o.split('#')[0] for o in insts[-1].operands]  # the ROOT is the entry's last
  while todo:
    name = todo.pop()
    if name in seen or name not in by_name:
      continue
    seen.add(name)
    inst = by_name[name]
    if inst.opcode == 'fusion':
      found.add(name.replace('.', '_'))
    elif inst.opcode in _PASS_THROUGH:
      todo.extend(o.split('#')[0] for o in inst.operands)
  return found


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
