r"""Where a traced step's device time goes: the kernels of a Perfetto trace, summed by name.

  python benchmarks/trace_top.py TRACE_DIR [--top 40] [--steps 3] [--json OUT.jsonl]

TRACE_DIR is what `python -m gemma_sft_jax.benchmark --profile=TRACE_DIR` wrote (the newest
`perfetto_trace.json.gz` under it is read). Only events on device (GPU/TPU) tracks count. Prints
each kernel's total time per step, its share, and the number of launches per step (the --top
largest); with --json, appends one JSON line with every kernel.
"""

import argparse
import collections
import glob
import gzip
import json
import os


def device_events(path: str) -> list[dict]:
  """The complete ('X') events of a Perfetto JSON trace that lie on device tracks."""
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, name in names.items() if '/device:' in name}
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--top', type=int, default=40)
  parser.add_argument('--steps', type=int, default=3, help='steps the trace covers')
  parser.add_argument('--json', help='append the table as one JSON line to this file')
  parser.add_argument('--tag', default='', help='label stored in the JSON line')
  args = parser.parse_args()
  found = sorted(glob.glob(os.path.join(args.trace_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not found:
    raise SystemExit(f'trace_top: no perfetto_trace.json.gz under {args.trace_dir}')
  events = device_events(found[-1])
  if not events:
    raise SystemExit(f'trace_top: {found[-1]} has no events on a device track')
  rows = summarise(events, args.steps)
  busy = sum(r['ms_per_step'] for r in rows)
  print(f'{found[-1]}: {busy:.1f} ms of device time per step, {len(rows)} kernels')
  for r in rows[:args.top]:
    print(f"{r['ms_per_step']:9.3f} ms {100 * r['share']:5.1f}% x{r['launches_per_step']:<6g} "
          f"{r['name'][:110]}")
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps({'tag': args.tag, 'trace': found[-1], 'device_ms_per_step': busy,
                          'kernels': rows}) + '\n')


if __name__ == '__main__':
  main()
