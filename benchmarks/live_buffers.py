r"""What a compiled step holds at its memory peak, estimated from its scheduled optimized HLO.

  python benchmarks/live_buffers.py HLO.txt.gz [--top 25]

HLO is a step's module after optimizations (benchmarks/profile_gpu.sh saves it; or XLA_FLAGS
`--xla_dump_to=DIR --xla_dump_hlo_as_text`), whose entry computation lists instructions in the
order they run. Each instruction that computes something gets a buffer per element of its
result; bitcasts, tuples and get-tuple-element share their operands' buffers, and so do a
custom call's outputs aliased to operands and a dynamic-update-slice fusion's result (written in
place). A buffer lives from its instruction to its last use; parameters (the step's arguments)
are not counted. The peak of that sum is an estimate of XLA's temporaries (it ignores XLA's
buffer reuse inside fusions and its exact allocation), good for seeing what is held: the live
buffers at the peak, grouped by shape, pass (forward `fwd` / backward `bwd`) and op_name with
layer numbers dropped. An async-start shares its operands' buffers and its async-done the
result's (its small context is not counted). A while loop's result counts as new buffers (XLA mostly reuses its operand's), so the
estimate is for steps without loops (unrolled layers); scanned steps come out too high.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
from typing import NamedTuple

_BYTES = {'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2,
          's32': 4, 'u32': 4, 's64': 8, 'u64': 8, 'pred': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_DEF = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'([a-z][a-z\-]*)\(')
_OPERAND = re.compile(r'%([\w.\-]+(?:#\d+)?)')
_SHARED = ('bitcast', 'get-tuple-element')


class Instruction(NamedTuple):
  name: str
  opcode: str
  shape: str  # the result's shape text
  operands: list[str]  # `name` or `name#i` (element i of a tuple result)
  op_name: str
  text: str


def nbytes(shape: str) -> int:
  """Bytes of every array in a shape text."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def elements(shape: str) -> list[str] | None:
  """The top-level elements of a tuple shape text, or None for an array."""
  shape = re.sub(r'/\*.*?\*/', '', shape.strip())
  if not shape.startswith('('):
    return None
  out, depth, current = [], 0, ''
  for ch in shape[1:shape.rfind(')')]:
    depth += (ch in '({[') - (ch in ')}]')
    if ch == ',' and depth == 0:
      out.append(current)
      current = ''
    else:
      current += ch
  return out + [current]


def parse(hlo_text: str) -> list[Instruction]:
  """The entry computation's instructions, in order."""
  entry = hlo_text[re.search(r'^ENTRY', hlo_text, re.M).start():]
  out = []
  for line in entry.split('\n')[1:]:
    if line.startswith('}'):
      break
    m = _DEF.match(line)
    if not m:
      continue
    name, rest = m.group(2), m.group(3)
    op = _OPCODE.search(rest)
    depth, end = 0, len(rest)
    for i in range(op.end() - 1, len(rest)):
      depth += {'(': 1, ')': -1}.get(rest[i], 0)
      if depth == 0:
        end = i
        break
    op_name = re.search(r'op_name="([^"]*)"', rest)
    out.append(Instruction(name, op.group(1), rest[:op.start()],
                           _OPERAND.findall(rest[op.end():end]),
                           op_name.group(1) if op_name else '', rest))
  return out


def _aliases(inst: Instruction) -> dict[int, int]:
  """Output element -> operand index, for a custom call's output_to_operand_aliasing."""
  m = re.search(r'output_to_operand_aliasing=\{(.*?)\}\s*(?:,|$)', inst.text)
  if not m:
    return {}
  return {int(out or 0): int(operand)
          for out, operand in re.findall(r'\{(\d*)\}: \((\d+), \{[^}]*\}\)', m.group(1))}


def _get(value: dict, name: str) -> frozenset:
  """The buffers of a value (`name`, or `name#i` for element i of a tuple result)."""
  return value.get(name, value.get(name.split('#')[0], frozenset()))


def _written_into(inst: Instruction, nbytes_: int, value: dict, size: dict) -> frozenset | None:
  """For an in-place update, the buffers of the operand of the result's size (None: none)."""
  for o in inst.operands:
    found = _get(value, o)
    if found and sum(size.get(b, 0) for b in found) == nbytes_:
      return found
  return None


def buffers(insts: list[Instruction]) -> tuple[dict, dict, dict]:
  """(value -> frozenset of buffer ids, buffer id -> bytes, buffer id -> instruction)."""
  value, size, owner = {}, {}, {}

  def new(key, shape, inst):
    size[key], owner[key] = nbytes(shape), inst
    return frozenset((key,))

  get = lambda name: _get(value, name)  # noqa: E731

  for inst in insts:
    parts = elements(inst.shape)
    if inst.opcode == 'tuple':
      for i, o in enumerate(inst.operands):
        value[f'{inst.name}#{i}'] = get(o)
      value[inst.name] = frozenset().union(*(get(o) for o in inst.operands))
    elif inst.opcode in _SHARED:
      value[inst.name] = get(inst.operands[0])
    elif inst.opcode in ('parameter', 'constant'):
      value[inst.name] = frozenset()
    elif inst.opcode == 'async-done':  # the result of its async-start
      value[inst.name] = get(f'{inst.operands[0]}#1')
    elif inst.opcode == 'async-start' and parts is not None and len(parts) >= 2:
      # ((operands), result, context): the operands are shared; an in-place
      # dynamic-update-slice writes its result into the operand of the same size.
      key = f'{inst.name}#1'
      value[f'{inst.name}#0'] = frozenset().union(*(get(o) for o in inst.operands))
      written = (_written_into(inst, nbytes(parts[1]), value, size)
                 if inst.op_name.endswith('dynamic_update_slice') else None)
      value[key] = written if written else new(key, parts[1], inst)
      value[inst.name] = value[f'{inst.name}#0'] | value[key]
    else:
      alias = _aliases(inst)
      in_place = (parts is None and inst.opcode == 'fusion'
                  and inst.op_name.endswith('dynamic_update_slice'))
      ids = []
      for i, part in enumerate(parts if parts is not None else [inst.shape]):
        key = f'{inst.name}#{i}' if parts is not None else inst.name
        shared = None
        if i in alias and alias[i] < len(inst.operands):
          shared = get(inst.operands[alias[i]])
        elif in_place:  # the operand of the result's size is the one written into
          shared = _written_into(inst, nbytes(part), value, size)
        if shared is None or (not shared and i not in alias):  # aliased to an argument: none
          shared = new(key, part, inst)
        value[key] = shared
        ids.append(shared)
      value[inst.name] = frozenset().union(*ids)
  return value, size, owner


def peak(insts: list[Instruction], bufs: tuple[dict, dict, dict] | None = None
         ) -> tuple[int, int, set[str]]:
  """(peak bytes, index of the instruction at the peak, buffer ids live there). `bufs`:
  `buffers(insts)`, where already computed."""
  value, size, owner = bufs or buffers(insts)
  index_of = {inst.name: index for index, inst in enumerate(insts)}
  created_at = collections.defaultdict(list)
  for key, inst in owner.items():
    created_at[index_of[inst.name]].append(key)
  last = {}
  for index, inst in enumerate(insts):
    for o in inst.operands:
      for b in _get(value, o):
        last[b] = index
  kept = _get(value, insts[-1].name)  # the step's outputs

  def walk(stop):
    live, current, best, best_at = set(), 0, 0, 0
    for index in range(len(insts)):
      created = created_at.get(index, [])
      live.update(created)
      current += sum(size[key] for key in created)
      if current > best:
        best, best_at = current, index
      if index == stop:
        break
      for b in [b for b in live if last.get(b, -1) <= index and b not in kept
                and b not in created]:
        live.discard(b)
        current -= size[b]
    return best, best_at, live

  best, at, _ = walk(None)
  return best, at, walk(at)[2]


def groups(live: set[str], insts: list[Instruction], bufs: tuple[dict, dict, dict] | None = None
           ) -> list[tuple[tuple[str, str, str], int, int]]:
  """Live buffers grouped by (shape, pass, op_name without layer numbers): (key, bytes, count),
  largest first. `bufs`: `buffers(insts)`, where already computed."""
  _, size, owner = bufs or buffers(insts)
  total, count = collections.Counter(), collections.Counter()
  for b in live:
    inst = owner[b]
    part = elements(inst.shape)
    shape = (part[int(b.split('#')[1])] if part is not None and '#' in b else inst.shape)
    where = 'bwd' if 'transpose(' in inst.op_name else 'fwd'
    name = re.sub(r'layer_\d+', 'layer_N', inst.op_name)
    key = (shape.split('{')[0].strip(), where, name[-90:])
    total[key] += size[b]
    count[key] += 1
  return [(k, v, count[k]) for k, v in total.most_common()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('hlo')
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args()
  opener = gzip.open if args.hlo.endswith('.gz') else open
  with opener(args.hlo, 'rt') as f:
    insts = parse(f.read())
  bufs = buffers(insts)
  best, at, live = peak(insts, bufs)
  print(f'{len(insts)} instructions; estimated peak {best / 2**30:.2f} GiB at {at} '
        f'({insts[at].name}: {insts[at].op_name})')
  for (shape, where, name), b, n in groups(live, insts, bufs)[:args.top]:
    print(f'{b / 2**30:7.2f} GiB x{n:<4d} {shape:24s} {where} {name}')


if __name__ == '__main__':
  main()
