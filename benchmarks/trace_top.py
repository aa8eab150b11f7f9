r"""Where a traced step's device time goes: the kernels of a Perfetto trace, summed by name.

  python benchmarks/trace_top.py TRACE_DIR [--top 40] [--steps 3] [--json OUT.jsonl] [--device N]

TRACE_DIR is what `python -m gemma_sft_jax.benchmark --profile=TRACE_DIR` wrote (the newest
`perfetto_trace.json.gz` under it is read). Only events on device (GPU/TPU) tracks count. Prints
each kernel's total time per step, its share, and the number of launches per step (the --top
largest); with --json, appends one JSON line with every kernel. --device N keeps device N's tracks
only (a multi-GPU trace); the line then also says how long that device had any kernel running
(`device_union_ms_per_step`: kernels on several streams, such as NCCL's beside compute, counted
once), so that the step time minus it is the device's idle time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re


def device_events(path: str, device: int | None = None) -> list[dict]:
  """The complete ('X') events of a Perfetto JSON trace that lie on device tracks (of device
  number `device` only, if given)."""
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, name in names.items() if '/device:' in name and (
      device is None or re.search(rf'/device:[A-Za-z_]+:{device}(\D|$)', name))}
  return [e for e in events if e.get('ph') == 'X' and e.get('pid') in devices]


def summarise(events: list[dict], steps: int) -> list[dict]:
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    total[e['name']] += float(e.get('dur', 0.0))
    count[e['name']] += 1
  busy = sum(total.values()) or 1.0
  return [{'name': name, 'ms_per_step': us / steps / 1e3, 'share': us / busy,
           'launches_per_step': count[name] / steps} for name, us in total.most_common()]


def union_ms(events: list[dict], steps: int) -> float:
  """Per step, the time during which at least one of the events runs (overlaps counted once)."""
  spans = sorted((e['ts'], e['ts'] + e.get('dur', 0)) for e in events)
  total, end = 0.0, float('-inf')
  for start, stop in spans:
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total / steps / 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--top', type=int, default=40)
  parser.add_argument('--steps', type=int, default=3, help='steps the trace covers')
  parser.add_argument('--json', help='append the table as one JSON line to this file')
  parser.add_argument('--tag', default='', help='label stored in the JSON line')
  parser.add_argument('--device', type=int, help='only this device\'s tracks (e.g. 0)')
  args = parser.parse_args()
  found = sorted(glob.glob(os.path.join(args.trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not found:
    raise SystemExit(f'trace_top: no perfetto_trace.json.gz under {args.trace_dir}')
  events = device_events(found[-1], args.device)
  if not events:
    raise SystemExit(f'trace_top: {found[-1]} has no events on a device track')
  rows = summarise(events, args.steps)
  busy = sum(r['ms_per_step'] for r in rows)
  union = union_ms(events, args.steps)
  print(f'{found[-1]}: {busy:.1f} ms of device time per step ({union:.1f} ms with any kernel '
        f'running), {len(rows)} kernels')
  for r in rows[:args.top]:
    print(f"{r['ms_per_step']:9.3f} ms {100 * r['share']:5.1f}% x{r['launches_per_step']:<6g} "
          f"{r['name'][:110]}")
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps({'tag': args.tag, 'trace': found[-1], 'device': args.device,
                          'device_ms_per_step': busy, 'device_union_ms_per_step': union,
                          'kernels': rows}) + '\n')


if __name__ == '__main__':
  main()
