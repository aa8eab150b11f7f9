r"""Compiled memory of the train step (XLA's memory_analysis), without running it.

  python benchmarks/step_memory.py --config=configs/gemma2.py:size=9b,method=full [--root=DIR]

Builds the model (random init) and optimizer state on the device, compiles the jitted step for a
batch of 8 x 512 and prints one JSON line: arguments, temporaries, outputs and aliased bytes
(GiB). --root runs the package found in DIR (e.g. an older revision exported with `git archive`),
so the same command measures before and after a change.
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='configs/FILE.py:ARGS')
  parser.add_argument('--root', default='.', help='directory holding gemma_sft_jax/ and configs/')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--tag', default='')
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.root))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import gemma_sft_jax  # pylint: disable=g-import-not-at-top
  try:  # pylint: disable=g-import-not-at-top
    from gemma_sft_jax.model import sharding
    from gemma_sft_jax.training import train
    from gemma_sft_jax.weights import models
  except ImportError:  # A --root revision from before the sub-packages.
    from gemma_sft_jax import sharding, train
    models = train

  path, _, arg = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('run_config', os.path.join(args.root, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.unlock()
  config.model.checkpoint, config.model.tokenizer = '', 'byte'
  config.train.batch_size, config.train.seq_len = args.batch, args.seq_len
  mesh = sharding.make_mesh(**config.mesh)
  setup = models.model_setup(config, with_lora=config.tuning_method == 'lora', mesh=mesh)
  parts = train.build(config, setup, mesh)
  b, t = args.batch, args.seq_len
  batch = {'inputs': np.zeros((b, t), np.int32), 'targets': np.zeros((b, t), np.int32),
           'weights': np.ones((b, t), np.float32), 'segment_ids': np.ones((b, t), np.int32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  m = parts.step_fn.lower(parts.state, parts.frozen, batch).compile().memory_analysis()
  gib = 2 ** 30
  print(json.dumps({
      'config': args.config, 'package': os.path.relpath(os.path.dirname(gemma_sft_jax.__file__)),
      'tag': args.tag, 'model': config.model.variant,
      'method': config.tuning_method, 'batch': b, 'seq_len': t, 'remat': config.model.remat,
      'state_dtype': config.optim.state_dtype, 'device': jax.devices()[0].device_kind,
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
      'arguments_gib': m.argument_size_in_bytes / gib,
      'temporaries_gib': m.temp_size_in_bytes / gib,
      'outputs_gib': m.output_size_in_bytes / gib, 'aliased_gib': m.alias_size_in_bytes / gib}),
      flush=True)


if __name__ == '__main__':
  main()
