r"""Build and compile time of the train step against depth, unrolled vs scanned layers (CPU).

  python benchmarks/build_time.py --output=results/bench/DATE-cpu-build-time.jsonl

The Gemma 2 9B config (`configs/gemma2.py:size=9b`: alternating sliding/global layers, remat
`full`, int8 AdamW states) with its widths shrunk (vocab 512, D 64, F 128, 4 heads, 2 kv heads,
head dim 16) so that only the depth and the program's structure cost time; batch 2 x 64, random
init. For each case, in a fresh process: `build` is `train.build` (random init, optimizer init,
the step's jit wrapper), `compile` is `step_fn.lower(...).compile()`, `hlo_chars` the size of the
lowered program's text. One JSON line per case, with the machine's 1-minute load average.
"""

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (layers, method, scanned, state dtype)
CASES = ((42, 'lora', False, 'int8'), (42, 'lora', False, 'float32'), (6, 'lora', False, 'int8'),
         (42, 'lora', True, 'int8'), (42, 'full', True, 'int8'), (6, 'lora', True, 'int8'))


def measure(layers: int, method: str, scanned: bool, state_dtype: str) -> dict:
  """One case, in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.model import architecture  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  from gemma_sft_jax.weights import models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(_ROOT, 'configs'))
  import gemma2  # pylint: disable=g-import-not-at-top

  base = architecture.VARIANTS['gemma2_9b']
  name = f'gemma2_9b_narrow_{layers}'
  architecture.VARIANTS[name] = dataclasses.replace(
      base, vocab_size=512, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
      head_dim=16, query_pre_attn_scalar=16, num_layers=layers,
      layer_types=tuple(base.layer_types[i % 2] for i in range(layers)))
  config = gemma2.get_config(f'size=9b,method={method}')
  config.model.checkpoint = ''
  config.model.tokenizer = 'byte'
  config.model.variant = name
  config.model.scan_layers = scanned
  config.optim.state_dtype = state_dtype
  config.train.batch_size, config.train.seq_len = 2, 64
  mesh = sharding.make_mesh(**config.mesh)
  setup = models.model_setup(config, with_lora=method == 'lora', mesh=mesh)
  t0 = time.perf_counter()
  parts = train_lib.build(config, setup, mesh)
  jax.block_until_ready(parts.state)
  build_s = time.perf_counter() - t0
  b, t = 2, 64
  tokens = np.random.default_rng(0).integers(3, 512, size=(b, t)).astype(np.int32)
  batch = {'inputs': tokens, 'targets': tokens, 'weights': np.ones((b, t), np.float32),
           'segment_ids': np.ones((b, t), np.int32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  t0 = time.perf_counter()
  lowered = parts.step_fn.lower(parts.state, parts.frozen, batch)
  lowered.compile()
  compile_s = time.perf_counter() - t0
  return {'bench': 'build_time', 'layers': layers, 'method': method, 'scan_layers': scanned,
          'state_dtype': state_dtype, 'build_s': build_s, 'compile_s': compile_s,
          'hlo_chars': len(lowered.as_text()), 'device': jax.devices()[0].device_kind,
          'jax': jax.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output')
  parser.add_argument('--case', help=argparse.SUPPRESS)  # internal: one case, this process
  args = parser.parse_args()
  if args.case:
    layers, method, scanned, state_dtype = args.case.split(',')
    print(json.dumps(measure(int(layers), method, scanned == 'True', state_dtype)))
    return
  for layers, method, scanned, state_dtype in CASES:
    load = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__),
         f'--case={layers},{method},{scanned},{state_dtype}'],
        cwd=_ROOT, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                                                       'JAX_COMPILATION_CACHE_DIR': ''})
    if out.returncode:
      raise SystemExit(f'build_time: case {layers},{method},{scanned} failed:\n'
                       f'{out.stderr[-2000:]}')
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(load_average=load,
                  date=datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    line = json.dumps(result)
    print(line, flush=True)
    if args.output:
      with open(args.output, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  main()
