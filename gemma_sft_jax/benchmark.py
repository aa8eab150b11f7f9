r"""Train-step benchmark: the real jitted step on synthetic full-length rows (random init is fine).

  python -m gemma_sft_jax.benchmark --config=configs/gemma2.py:size=2b,method=full \
      --config.model.checkpoint= --config.train.batch_size=8 --config.train.seq_len=512 \
      --output=results/bench/DATE-DEVICE.jsonl

Prints (and with --output appends) one JSON line: median step seconds over --steps timed steps
(after 2 warm-up steps, the first of which compiles), tokens/s, MFU against the device's bf16
peak, peak device memory, and the compiled step's memory (arguments, temporaries, outputs).
With --breakdown it then also times the step's halves on their own (forward + backward; the
optimizer update), after the peak memory has been read; --profile traces three steps.
`benchmarks/hf_baseline.py` writes the
same fields for transformers.
"""

import datetime
import os
import statistics
import time

from absl import logging
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from gemma_sft_jax import runner
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import flash_attention
from gemma_sft_jax.training import metrics as metrics_lib
from gemma_sft_jax.training import train as train_lib
from gemma_sft_jax.weights import models

_GIB = 2 ** 30


def _define_flags():
  """This entry point's flags, defined when it runs (`runner.run`)."""
  holders = (
      config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=False),
      flags.DEFINE_integer('steps', 8, 'Timed steps.'),
      flags.DEFINE_string('output', None, 'Append the JSON result to this file.'),
      flags.DEFINE_bool('breakdown', False,
                        'Also time forward+backward and the optimizer update alone.'),
      flags.DEFINE_string('tag', '', 'Free-form label stored in the JSON line.'),
      flags.DEFINE_string(
          'profile', None, 'Also trace 3 steps with jax.profiler into this directory (with a '
          'Perfetto trace, which benchmarks/trace_top.py summarises by kernel).'))
  flags.mark_flag_as_required('config')
  return holders


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {'arguments_gib': m.argument_size_in_bytes / _GIB,
          'temporaries_gib': m.temp_size_in_bytes / _GIB,
          'outputs_gib': m.output_size_in_bytes / _GIB,
          'aliased_gib': m.alias_size_in_bytes / _GIB}


def _breakdown(parts, state, batch, steps: int) -> dict:
  """Seconds of forward+backward alone and of the optimizer update alone (random gradients)."""
  grad = jax.jit(lambda p, f, b: parts.grad_fn(p, f, b, jax.random.key(0)))
  out = {}
  out['grad_s'] = metrics_lib.median_seconds(
      lambda: jax.block_until_ready(grad(state['params'], parts.frozen, batch)), steps)
  # Gradients of the params' own dtype and scale, drawn on the devices, never zeros.
  grads = jax.jit(lambda p: jax.tree.map(
      lambda x: (jax.random.normal(jax.random.key(1), x.shape, jnp.float32) * 1e-3 * 4096
                 ).astype(x.dtype), p))(state['params'])
  update = jax.jit(lambda p, g, s: parts.update(p, g, s, divisor=4096.0, seed=jnp.uint32(0)),
                   donate_argnums=(0, 2))
  params, opt_state = state['params'], state['opt_state']

  def run():
    nonlocal params, opt_state
    params, opt_state, norm = update(params, grads, opt_state)
    jax.block_until_ready(norm)

  out['update_s'] = metrics_lib.median_seconds(run, steps)
  out['update_memory'] = _memory(update.lower(params, grads, opt_state).compile())
  return out


def _bench(config, steps, output, breakdown, tag, profile):
  if not config.model.checkpoint:
    config.model.tokenizer = config.model.tokenizer or 'byte'
  mesh = sharding.make_mesh(**config.mesh)
  setup = models.model_setup(config, with_lora=config.tuning_method == 'lora', mesh=mesh)
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
  t1 = time.time()
  compiled = parts.step_fn.lower(parts.state, parts.frozen, batch).compile()
  compile_s = time.time() - t1
  logging.info('compiled step in %.1f s; memory: %s', compile_s, _memory(compiled))
  # As the training loop runs: each step is dispatched before the host waits for the one before
  # it. A step's time is from the previous step's end (the first: from its dispatch) to its own.
  state, pending, ends = parts.state, None, []

  def finish(m):  # Blocks until the step of metrics m is done; its loss.
    loss = float(jax.device_get(m['loss']))
    ends.append(time.time())
    return loss

  t1 = time.time()
  for _ in range(steps + 2):
    state, m = compiled(state, parts.frozen, batch)
    if pending is not None:
      finish(pending)
    pending = m
  loss = finish(pending)
  times = [float(x) for x in np.diff([t1] + ends)]
  if not np.isfinite(loss):  # A broken step (e.g. a kernel writing garbage) can run fast.
    raise RuntimeError(f'benchmark: the loss after {len(times)} steps is {loss}; the step is '
                       'broken, so no line is written')
  step_s = statistics.median(times[2:])
  c = setup.config
  fpt = metrics_lib.flops_per_token(
      n_matmul_params=train_lib.matmul_params(c), seq_len=t, n_layers=c.num_layers,
      d_attn=c.num_heads * c.head_dim, lora=config.tuning_method == 'lora')
  tps = b * t / step_s
  # The attention the step ran (model.attention 'auto' resolves per backend and shape).
  flash = flash_attention.use(config.model.attention, (b, t, c.num_heads, c.head_dim),
                              (b, c.num_kv_heads, t, c.head_dim), setup.model.activation_sharding)
  attention = 'flash' if flash else 'einsum'
  device = jax.devices()[0].device_kind
  result = {
      'framework': 'gemma_sft_jax', 'model': config.model.variant,
      'method': config.tuning_method, 'batch': b, 'seq_len': t, 'n_devices': mesh.size,
      'tokens_per_s': tps, 'tokens_per_s_per_device': tps / mesh.size,
      'peak_memory_gib': (metrics_lib.device_memory() or 0) / _GIB, 'device': device,
      'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
      'mesh': dict(mesh.shape), 'param_dtype': config.model.param_dtype,
      'state_dtype': config.optim.state_dtype, 'remat': config.model.remat,
      'scan_layers': config.model.scan_layers,
      'remat_prevent_cse': config.model.remat_prevent_cse,
      'remat_after_cotangent': config.model.remat_after_cotangent,
      'logits_dtype': config.model.logits_dtype,
      'attention': attention,
      'save_loss_logits': config.model.save_loss_logits,
      'stochastic_rounding': config.optim.stochastic_rounding,
      'update_kernel': config.optim.update_kernel,
      'trainable_params': parts.n_trainable, 'total_params': parts.n_total,
      'step_s_median': step_s, 'first_step_s': times[0], 'step_s': times,
      'compile_s': compile_s,
      'build_s': build_s,
      'mfu': metrics_lib.mfu(tokens_per_s=tps, flops_per_token=fpt,
                             peak_flops_per_device=metrics_lib.peak_flops_per_device(device),
                             n_devices=mesh.size),
      'step_memory': _memory(compiled), 'last_loss': loss, 'jax': jax.__version__,
      # compile_s and first_step_s are a cache read when this directory already held the step.
      'compilation_cache': jax.config.jax_compilation_cache_dir,
  }
  if parts.frozen:  # How the LoRA base lies along fsdp (lora.base_sharding, resolved).
    split = any('fsdp' in jax.tree.leaves(tuple(x.sharding.spec))
                for x in jax.tree.leaves(parts.frozen))
    result['lora_base_sharding'] = 'fsdp' if split else 'replicated'
  if tag:
    result['tag'] = tag
  if profile:
    os.makedirs(profile, exist_ok=True)
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      for _ in range(3):
        state, m = compiled(state, parts.frozen, batch)
      jax.block_until_ready(m)
  if breakdown:
    result.update(_breakdown(parts, state, batch, steps))
  metrics_lib.emit_json_line(result, output)


if __name__ == '__main__':
  runner.run(_bench, _define_flags)
