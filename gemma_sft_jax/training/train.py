"""Training: one readable top-to-bottom `train` function, plus the jitted train step.

Full SFT and LoRA share this one path; they differ only in which part of the parameter tree is
trainable (`lora.split`). The train state is a dict {'step', 'params' (trainable), 'opt_state',
'rng'}; frozen parameters (the LoRA base) live beside it and are never donated or checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import loss as loss_lib
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import checkpointing
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.training import metrics as metrics_lib
from gemma_sft_jax.training import optimizer as optimizer_lib
from gemma_sft_jax.training import resume
from gemma_sft_jax.training import update as update_lib
from gemma_sft_jax.weights import models

# The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept.
TrainingError = resume.TrainingError


def matmul_params(config: architecture.ModelConfig) -> int:
  """N for 6·N FLOPs/token: every projection plus the (tied) output head."""
  c = config
  per_layer = (c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
               + c.num_heads * c.head_dim * c.embed_dim + 3 * c.embed_dim * c.hidden_dim)
  return c.num_layers * per_layer + c.vocab_size * c.embed_dim


def make_grad_fn(*, model: model_lib.Transformer, logits_dtype: Any = jnp.float32,
                 save_logits: bool = False, unroll_saved: bool = True) -> Callable[..., Any]:
  """grad_fn(trainable, frozen, batch, rng) -> ((loss_sum, weight_sum), gradient sums).

  `save_logits` and `unroll_saved` are `loss.chunked_cross_entropy`'s: `build` unrolls the
  saved chunks on one device and keeps them in a loop on a mesh of several."""
  softcap = model.config.final_logit_softcap

  def loss_sums(trainable, frozen, micro, rng):
    params = lora.join(frozen, trainable)
    hidden, _ = model.apply({'params': params}, micro['inputs'], micro['positions'],
                            micro['segment_ids'], deterministic=False, return_hidden=True,
                            rngs={'dropout': rng})
    return loss_lib.chunked_cross_entropy(
        hidden, params['embedder']['embedding'], micro['targets'], micro['weights'],
        softcap=softcap, logits_dtype=logits_dtype, save_logits=save_logits,
        unroll_saved=unroll_saved)

  return jax.value_and_grad(loss_sums, has_aux=True)


def make_train_step(*, grad_fn: Callable[..., Any], update: Callable[..., Any],
                    grad_accum: int) -> Callable[..., Any]:
  """The step: microbatched forward/backward, then the fused optimizer update.

  Returns train_step(state, frozen, batch) -> (state, metrics). Gradient sums over microbatches
  are divided once by the global number of supervised tokens (inside `update`), so the result
  does not depend on `grad_accum`, packing or the number of processes. With one microbatch the
  gradients stay in the params' dtype (no fp32 copy of the model); with several they are summed
  in fp32.

  Args:
    grad_fn: from `make_grad_fn`.
    update: from `update.make_update`.
    grad_accum: microbatches per step.
  """
  def train_step(state, frozen, batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state['rng']))
    total_weight = jnp.maximum(batch['weights'].sum(), 1.0)
    if grad_accum == 1:
      (loss_sum, _), grads = grad_fn(state['params'], frozen, batch,
                                     jax.random.fold_in(step_rng, 0))
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, xs):
        grads, loss_sum = carry
        mb, i = xs
        (l, _), g = grad_fn(state['params'], frozen, mb, jax.random.fold_in(step_rng, i))
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), loss_sum + l), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state['params'])
      (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                          (micro, jnp.arange(grad_accum)))
    seed = jax.random.bits(jax.random.fold_in(step_rng, 1 << 20), (), jnp.uint32)
    params, opt_state, grad_norm = update(state['params'], grads, state['opt_state'],
                                          divisor=total_weight, seed=seed)
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
                 'rng': jax.random.key_data(rng)}
    metrics = {'loss': loss_sum / total_weight, 'grad_norm': grad_norm,
               'supervised_tokens': batch['weights'].sum()}
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Parts:
  """Everything a training loop (or a benchmark) needs besides data."""
  state: dict[str, Any]
  frozen: dict[str, Any]
  schedule: Callable[[Any], Any]
  step_fn: Callable[..., Any]  # (state, frozen, batch) -> (state, metrics); donates state
  # The step's two halves, unjitted, for benchmarks: grad_fn(trainable, frozen, batch, rng) and
  # update(params, grad_sums, opt_state, *, divisor, seed) (update.make_update).
  grad_fn: Callable[..., Any]
  update: Callable[..., Any]
  n_trainable: int
  n_total: int


def build(config: ml_collections.ConfigDict, setup: models.Setup, mesh: jax.sharding.Mesh) -> Parts:
  """Parameters (shapes -> shardings -> init/load), optimizer state, and the jitted train step."""
  method = config.tuning_method
  params = models.init_params(setup, mesh=mesh, seed=config.train.seed,
                              base_sharding=config.lora.base_sharding)
  trainable, frozen = lora.split(params, method)
  del params
  n_trainable = model_lib.count_params(trainable)
  n_total = n_trainable + model_lib.count_params(frozen)
  logging.info('parameters: %s trainable of %s (%s)', f'{n_trainable:,}', f'{n_total:,}', method)

  o = config.optim
  decay_mask = optimizer_lib.default_decay_mask(trainable, decay_embeddings=o.decay_embeddings)
  tx, schedule = optimizer_lib.make_optimizer(
      lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
      decay_steps=o.decay_steps or config.train.steps, weight_decay=o.weight_decay,
      clip_norm=o.clip_norm, b1=o.b1, b2=o.b2, eps=o.eps, state_dtype=o.state_dtype,
      decay_mask=decay_mask)
  # The chain gives the state (and its shardings); the step applies the same maths fused.
  trainable_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  update = update_lib.make_update(
      schedule=schedule, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
      decay_mask=decay_mask, chunks=update_lib.chunk_plan(trainable), b1=o.b1, b2=o.b2,
      eps=o.eps, stochastic_rounding=o.stochastic_rounding,
      kernels=update_lib.kernel_plan(trainable, o.update_kernel))
  opt_shardings = optimizer_lib.state_shardings(tx, trainable, trainable_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  repl = sharding.replicated(mesh)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': opt_state,
           'rng': jax.random.key_data(jax.random.key(config.train.seed + 1))}
  state = jax.device_put(state, {'step': repl, 'params': trainable_shardings,
                                 'opt_state': opt_shardings, 'rng': repl})
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  grad_fn = make_grad_fn(model=setup.model,
                         logits_dtype=models.dtype_of(config.model.logits_dtype, 'model.logits_dtype'),
                         save_logits=config.model.save_loss_logits,
                         unroll_saved=mesh.devices.size == 1)
  step_fn = jax.jit(
      make_train_step(grad_fn=grad_fn, update=update, grad_accum=o.grad_accum),
      in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, repl), donate_argnums=(0,))
  return Parts(state, frozen, schedule, step_fn, grad_fn, update, n_trainable, n_total)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (a killed run never leaves a half-written file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def train_batches(config: ml_collections.ConfigDict, tokenizer: Any) -> data_lib.BatchIterator:
  """This process's share of the training batches: the train split (its first data.limit
  examples when that is set), tokenized, packed and shuffled per the config."""
  d = config.data
  examples = gsm8k.load_split(d.source, d.subset, d.train_split, skip_bad_rows=d.skip_bad_rows)
  if d.limit:
    examples = examples[:d.limit]
  return data_lib.make_train_iterator(
      examples, tokenizer=tokenizer, seq_len=config.train.seq_len,
      global_batch_size=config.train.batch_size, seed=config.train.seed, packing=d.packing,
      template=d.prompt_template, strip_calculator=d.strip_calculator,
      process_index=jax.process_index(), process_count=jax.process_count())


def train(config: ml_collections.ConfigDict, workdir: str, *,
          on_ready: Callable[[models.Setup, Any], None] | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Args:
    config: the run config (gemma_sft_jax.config).
    workdir: where checkpoints/, metrics.jsonl and final/ go.
    on_ready: called once with (setup, params) after the model is loaded and before training,
      e.g. to evaluate the base model; skipped when resuming past step 0.

  Returns:
    A summary dict: steps, final loss, where the final weights went, timing.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  method = config.tuning_method

  # ---- Mesh. ------------------------------------------------------------------------------
  mesh = sharding.make_mesh(**config.mesh)
  logging.info('mesh %s over %d devices (%s)', dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind)

  # ---- The checkpoint to resume from, checked against this config before anything loads. -----
  ckpt = checkpointing.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep)
  resume_step = resume.resume_point(config, ckpt)

  # ---- Model and tokenizer. -----------------------------------------------------------------
  setup = models.model_setup(config, with_lora=method == 'lora', mesh=mesh)

  # ---- Data. ------------------------------------------------------------------------------
  batches = train_batches(config, setup.tokenizer)
  if config.train.batch_size % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise ValueError(f'train.batch_size={config.train.batch_size} is not divisible by the '
                     f"data-parallel mesh size {mesh.shape['data'] * mesh.shape['fsdp']}")
  if config.train.batch_size % config.optim.grad_accum:
    raise ValueError(f'optim.grad_accum={config.optim.grad_accum} does not divide '
                     f'train.batch_size={config.train.batch_size}')

  # ---- Parameters, optimizer, the jitted step. ------------------------------------------------
  parts = build(config, setup, mesh)
  state, frozen, schedule = parts.state, parts.frozen, parts.schedule
  n_trainable, n_total = parts.n_trainable, parts.n_total

  # ---- Resume. ----------------------------------------------------------------------------
  start = 0
  if resume_step is not None:
    state, extra = resume.restore_finite(ckpt, checkpointing.abstract_tree(state))
    batches.restore(extra['data'])
    start = int(state['step'])
    logging.info('resumed from %s at step %d', os.path.join(workdir, 'checkpoints'), start)
  elif on_ready is not None:
    on_ready(setup, lora.join(frozen, state['params']))
  if start >= config.train.steps:
    print(f'{workdir}: training already finished at step {start}', flush=True)

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = parts.step_fn

  # ---- Loop. ------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(
      workdir, is_main_process=is_main, truncate_after_step=start if start else -1,
      wandb_mode=config.wandb.mode, wandb_project=config.wandb.project,
      wandb_name=config.wandb.name or os.path.basename(os.path.normpath(workdir)),
      wandb_config=config.to_dict())
  c = setup.config
  flops_per_token = metrics_lib.flops_per_token(
      n_matmul_params=matmul_params(c), seq_len=config.train.seq_len, n_layers=c.num_layers,
      d_attn=c.num_heads * c.head_dim, lora=method == 'lora')
  peak_flops = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  steps = config.train.steps
  progress = metrics_lib.ProgressBar(total=steps, initial=start, enabled=is_main)
  t_window, tokens_window, first_step_time = time.time(), 0, None
  loop_start = time.time()
  # A rerun after the last step trains nothing; its final loss is the one already logged.
  last_loss = float((writer.last_row or {}).get('loss', math.nan))
  health = resume.Health(mesh)
  snapshot = resume.snapshot(config)

  def save(step, data_state, force=False):
    if force or ckpt.is_due(step):
      health.check(state, step=step, ckpt=ckpt)  # Never a non-finite checkpoint.
      ckpt.save(step, state=state, extra={'data': data_state, 'config': snapshot}, force=force)

  def close():
    ckpt.close()
    writer.close()
    progress.close()

  pending = None  # Metrics of the step dispatched before the latest one.
  with checkpointing.PreemptionGuard() as guard:
    for step in range(start, steps):
      data_state = batches.state()  # Of the batch below: saved with the state before it.
      batch = data_lib.to_global_array(next(batches), batch_sharding)
      if guard.should_stop(step):
        save(step, data_state, force=True)
        logging.warning('%s: saved step %d; exiting', guard.received or 'preemption signal', step)
        close()
        return {'preempted': True, 'step': step, 'signal': guard.received}
      t0 = time.time()
      state, m = step_fn(state, frozen, batch)
      if pending is not None:
        # Two steps in flight at most: this one was dispatched while the one before ran
        # (dispatching a step of ~1000 arrays, as unrolled layers make, takes milliseconds
        # that the device would otherwise wait for), and the host waits for that one before
        # preparing the next batch. So a signal is acted on at most one step after the step
        # it arrived in, not after many queued behind it.
        jax.block_until_ready(pending)
      pending = m
      health.note(m, step + 1)
      tokens_window += config.train.batch_size * config.train.seq_len
      done = step + 1
      if done % config.train.log_every == 0 or done == steps or done == start + 1:
        m = jax.device_get(m)
        last_loss = float(m['loss'])
        if first_step_time is None:
          first_step_time = time.time() - t0  # Includes compilation.
        health.check(None, step=done, ckpt=ckpt)
        elapsed = time.time() - t_window
        tps = tokens_window / elapsed
        row = {'step': done, 'loss': last_loss, 'learning_rate': float(schedule(done - 1)),
               'grad_norm': float(m['grad_norm']), 'supervised_tokens': int(m['supervised_tokens']),
               'tokens_per_s': tps, 'epoch': batches.epoch}
        mfu = metrics_lib.mfu(tokens_per_s=tps, flops_per_token=flops_per_token,
                              peak_flops_per_device=peak_flops, n_devices=mesh.size)
        if mfu is not None:
          row['mfu'] = mfu
        mem = metrics_lib.device_memory()
        if mem is not None:
          row['peak_memory_gib'] = mem / 2 ** 30
        writer.write(done, row)
        progress.update(done, loss=last_loss, learning_rate=row['learning_rate'],
                        tokens_per_s=tps, mfu_fraction=mfu)
        t_window, tokens_window = time.time(), 0
      else:
        progress.update(done)
      save(done, batches.state())
  save(steps, batches.state(), force=True)
  close()

  # ---- Final weights, in the form eval/decode load. ------------------------------------------
  final_dir = os.path.join(workdir, 'final')
  meta = {'tuning_method': method, 'model_checkpoint': config.model.checkpoint,
          'model_variant': config.model.variant, 'step': steps,
          'scan_layers': config.model.scan_layers,  # The saved tree's layout.
          'lora': dict(config.lora) if method == 'lora' else None}
  meta_path = os.path.join(workdir, 'final.json')
  if start < steps or _read_json(meta_path) != meta:  # A finished run's weights are there.
    checkpointing.save_params(final_dir, state['params'])
    if is_main:
      write_json(meta_path, meta)
  return {'step': steps, 'final_loss': last_loss, 'final_dir': final_dir,
          'already_finished': start >= steps,
          'trainable_params': n_trainable, 'total_params': n_total,
          'first_step_seconds': first_step_time,
          # This process's training loop (a resumed run counts only the steps it ran).
          'train_seconds': time.time() - loop_start, 'steps_run': steps - start,
          'tokens_per_step': config.train.batch_size * config.train.seq_len,
          'optimizer_state_bytes': optimizer_lib.state_bytes(state['params'],
                                                             config.optim.state_dtype),
          'state': state, 'frozen': frozen, 'setup': setup}
