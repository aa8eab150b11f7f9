r"""Train-step benchmark: the real jitted step on synthetic full-length rows (random init is fine).

  python -m gemma_sft_jax.benchmark --config=configs/gemma2.py:size=2b,method=full \
      --config.model.checkpoint= --config.train.batch_size=8 --config.train.seq_len=512

Prints one JSON line: median step seconds over --steps timed steps (after 2 warm-up steps, the
first of which compiles), tokens/s, MFU against the device's bf16 peak, and peak device memory.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from gemma_sft_jax import metrics as metrics_lib
from gemma_sft_jax import runner
from gemma_sft_jax import sharding
from gemma_sft_jax import train as train_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=False)
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps.')
_OUTPUT = flags.DEFINE_string('output', None, 'Append the JSON result to this file.')
flags.mark_flag_as_required('config')


def _bench(config):
  if not config.model.checkpoint:
    config.model.tokenizer = config.model.tokenizer or 'byte'
  mesh = sharding.make_mesh(**config.mesh)
  setup = train_lib.model_setup(config, with_lora=config.tuning_method == 'lora', mesh=mesh)
  t0 = time.time()
  parts = train_lib.build(config, setup, mesh)
  build_s = time.time() - t0
  b, t = config.train.batch_size, config.train.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, setup.config.vocab_size, size=(b, t + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'weights': np.ones((b, t), np.float32), 'segment_ids': np.ones((b, t), np.int32),
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  state, times = parts.state, []
  for i in range(_STEPS.value + 2):
    t1 = time.time()
    state, m = parts.step_fn(state, parts.frozen, batch)
    loss = float(jax.device_get(m['loss']))  # Blocks until the step is done.
    times.append(time.time() - t1)
  step_s = statistics.median(times[2:])
  c = setup.config
  fpt = metrics_lib.flops_per_token(
      n_matmul_params=train_lib.matmul_params(c), seq_len=t, n_layers=c.num_layers,
      d_attn=c.num_heads * c.head_dim, lora=config.tuning_method == 'lora')
  tps = b * t / step_s
  result = {
      'model': config.model.variant, 'method': config.tuning_method, 'batch': b, 'seq_len': t,
      'mesh': dict(mesh.shape), 'device': jax.devices()[0].device_kind, 'n_devices': mesh.size,
      'param_dtype': config.model.param_dtype, 'state_dtype': config.optim.state_dtype,
      'remat': config.model.remat, 'scan_layers': config.model.scan_layers,
      'logits_dtype': config.model.logits_dtype,
      'trainable_params': parts.n_trainable, 'total_params': parts.n_total,
      'step_s_median': step_s, 'first_step_s': times[0], 'build_s': build_s,
      'tokens_per_s': tps, 'tokens_per_s_per_device': tps / mesh.size,
      'mfu': metrics_lib.mfu(tokens_per_s=tps, flops_per_token=fpt,
                             peak_flops_per_device=metrics_lib.peak_flops_per_device(
                                 jax.devices()[0].device_kind), n_devices=mesh.size),
      'peak_memory_gib': (metrics_lib.device_memory() or 0) / 2 ** 30, 'last_loss': loss,
  }
  line = json.dumps(result)
  print(line, flush=True)
  if _OUTPUT.value and jax.process_index() == 0:
    with open(_OUTPUT.value, 'a') as f:
      f.write(line + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  runner.setup_jax()
  runner.exit_on_bad_input(_bench, _CONFIG.value)


if __name__ == '__main__':
  app.run(main)
