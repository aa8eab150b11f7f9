r"""Start-up benchmark: the decode CLI on the Gemma 3 270M base against the tiny config, on CPU.

  python benchmarks/startup.py --label=after --output=results/startup/2026-11-29-cpu.jsonl
  python benchmarks/startup.py --summary results/startup/2026-11-29-cpu.jsonl

Runs `python -m gemma_sft_jax.decode --config=C --prompt='Question: 2+3?\nAnswer:'
--config.decode.max_new_tokens=N [--flags]` for each config C and each N in subprocesses (JAX on
CPU): once with an empty JAX compilation cache ('cold'), then --repeats times with that cache
filled ('warm'). The cache is a fresh directory named by JAX_COMPILATION_CACHE_DIR, so the runs
neither use nor fill the per-user cache. A bare `import gemma_sft_jax.decode` is timed the same
way ('imports'). Checkpoint and tokenizer caches beside the GGUF are used as they are.

Every run appends one JSON line: the command, config, N, the cache state, wall seconds, exit
status, the machine's 1-minute load average before the run, and the start-up phases the command
logged (each absl log line: its message, when it came in seconds since the command started, and
how long until the next one). --summary prints a Markdown table of the median warm wall times and
the 270M / tiny ratio from such a file.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROMPT = r'Question: 2+3?\nAnswer:'
_CONFIGS = ('configs/gemma3.py:size=270m', 'configs/tiny.py')
# absl's prefix: I1129 20:18:54.649255 140610017774464 runner.py:190] message
_ABSL_LINE = re.compile(r'^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d{6}) +\d+ [^\]]+\] (.*)$')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--label', default='after', help="What the code is: 'before' or 'after'.")
  p.add_argument('--output', help='Append the JSON lines to this file.')
  p.add_argument('--repeats', type=int, default=3, help='Warm runs per command.')
  p.add_argument('--max_new_tokens', default='8,256', help='Comma-separated decode lengths.')
  p.add_argument('--configs', default=','.join(_CONFIGS), help='Comma-separated --config values.')
  p.add_argument('--flags', default='',
                 help='Space-separated extra decode flags, e.g. --config.model.scan_layers=false.')
  p.add_argument('--summary', metavar='JSONL', help='Print the table of a results file and exit.')
  return p.parse_args(argv)


def _commit() -> str:
  def git(*args):
    return subprocess.run(['git', *args], cwd=_ROOT, capture_output=True, text=True).stdout.strip()
  # Uncommitted edits of tracked files make the numbers those of no commit: say so.
  dirty = git('status', '--porcelain', '-uno')
  return git('rev-parse', '--short', 'HEAD') + ('-dirty' if dirty else '')


def _phases(stderr: str, started: float, ended: float) -> list[dict]:
  """The absl log lines of a run: message, seconds since start, seconds until the next line."""
  year = datetime.datetime.fromtimestamp(started).year
  marks = []
  for line in stderr.splitlines():
    m = _ABSL_LINE.match(line)
    if m:
      stamp = datetime.datetime.strptime(f'{year}{m[1]} {m[2]}', '%Y%m%d %H:%M:%S.%f').timestamp()
      marks.append((stamp - started, m[3]))
  ends = [t for t, _ in marks[1:]] + [ended - started]
  return [{'message': msg, 'at_s': round(t, 2), 's': round(end - t, 2)}
          for (t, msg), end in zip(marks, ends)]


def _run(argv: list[str], cache_dir: str) -> tuple[int, float, list[dict], str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, env.get('PYTHONPATH')])))
  started = time.time()
  proc = subprocess.run([sys.executable, *argv], cwd=_ROOT, env=env, capture_output=True,
                        text=True)
  ended = time.time()
  return proc.returncode, ended - started, _phases(proc.stderr, started, ended), proc.stderr


def measure(args: argparse.Namespace) -> list[dict]:
  """Runs every command cold once and warm --repeats times; returns (and appends) the lines."""
  base = {'date': datetime.date.today().isoformat(), 'machine': f'{os.cpu_count()}-core CPU',
          'label': args.label, 'commit': _commit()}
  cases = [('imports', None, ['-c', 'import gemma_sft_jax.decode'])]
  for n in [int(x) for x in args.max_new_tokens.split(',')]:
    for config in args.configs.split(','):
      cases.append((config, n, ['-m', 'gemma_sft_jax.decode', f'--config={config}',
                                f'--prompt={_PROMPT}', f'--config.decode.max_new_tokens={n}',
                                *args.flags.split()]))
  rows = []
  for config, n, argv in cases:
    with tempfile.TemporaryDirectory(prefix='jax_cache_') as cache_dir:
      for run in range(args.repeats + 1):
        load = os.getloadavg()[0]  # Other work on the machine shows here (2 cores are few).
        rc, wall, phases, stderr = _run(argv, cache_dir)
        row = dict(base, command=shlex.join(['python', *argv]), config=config, max_new_tokens=n,
                   cache='cold' if run == 0 else 'warm', run=run, wall_s=round(wall, 2), rc=rc,
                   load_1min=round(load, 2), phases=phases)
        print(json.dumps(row), flush=True)
        if rc:
          print(stderr[-2000:], file=sys.stderr)
        rows.append(row)
        if args.output:
          os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
          with open(args.output, 'a') as f:
            f.write(json.dumps(row) + '\n')
  return rows


def summary(rows: list[dict]) -> str:
  """Markdown: median warm (and the cold) wall seconds per label and length, and the ratio."""
  def wall(label, config, n, cache):
    walls = [r['wall_s'] for r in rows if (r['label'], r['config'], r['max_new_tokens'],
                                           r['cache'], r['rc']) == (label, config, n, cache, 0)]
    return statistics.median(walls) if walls else None

  lines = ['| code | new tokens | 270M warm s | tiny warm s | 270M / tiny | 270M cold s | '
           'tiny cold s | import s |', '|---|---|---|---|---|---|---|---|']
  labels = list(dict.fromkeys(r['label'] for r in rows))
  lengths = sorted({r['max_new_tokens'] for r in rows if r['max_new_tokens'] is not None})
  for label in labels:
    imports = wall(label, 'imports', None, 'warm')
    for n in lengths:
      big, tiny = wall(label, _CONFIGS[0], n, 'warm'), wall(label, _CONFIGS[1], n, 'warm')
      if big is None or tiny is None:
        continue
      cold = [wall(label, c, n, 'cold') for c in _CONFIGS]
      cells = [big, tiny, f'{big / tiny:.1f}x', *cold, imports]
      lines.append(f'| {label} | {n} | ' + ' | '.join(
          '—' if c is None else c if isinstance(c, str) else f'{c:.1f}' for c in cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.summary:
    with open(args.summary) as f:
      print(summary([json.loads(line) for line in f if line.strip()]))
    return
  print(summary(measure(args)))


if __name__ == '__main__':
  main()
