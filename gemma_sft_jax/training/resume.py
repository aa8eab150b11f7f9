"""Resuming a run safely: the config a checkpoint was trained with, which fields a rerun may
change, and checkpoints that are never non-finite.

Every training checkpoint stores the run config (`snapshot`) beside the train state. A rerun of
the same workdir compares its config with the latest checkpoint's (`check`) before loading
anything: fields that change what is trained (model, method, data, batch, length, steps, the
optimizer and its schedule, the seed) must match, and the error names each differing key with
both values. Fields that only change how the run is watched, evaluated or laid out on the
devices may change (`SAFE_TO_CHANGE`, listed in the README).

A checkpoint is only saved after `Health.check` has found every step's loss and gradient norm,
and the state itself, finite; so retention (`checkpoint.keep`) only ever drops older good
checkpoints, and the error of a diverged run names one to go back to.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from gemma_sft_jax import pytree
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import checkpointing


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# Exact keys, or prefixes ending in '.', that a resumed run may change.
SAFE_TO_CHANGE = (
    'eval.',            # What the evaluations after training measure.
    'decode.',          # Only the decode entry point reads these.
    'wandb.',           # Where metrics are sent.
    'checkpoint.',      # Cadence and retention of later checkpoints.
    'train.log_every',  # How often metrics are logged.
    'mesh.',            # The layout: checkpoints restore onto any mesh.
    'lora.base_sharding',  # Where the frozen base lies; it is never checkpointed.
    'model.remat',      # Memory for speed; the same maths.
    'model.remat_prevent_cse',  # Likewise.
    'model.remat_after_cotangent',  # Likewise.
    'model.save_loss_logits',  # Likewise.
    'model.attention',  # Fused kernels or the einsum path: the same maths.
    'optim.grad_accum',  # Microbatching; the same global batch and normalisation.
    'optim.update_kernel',  # Where the same update runs (a Pallas kernel or XLA); same state.
    'data.source',      # Where the same data lives (a local copy or the hub).
    'data.test_split',  # Only evaluations read it.
)


def is_safe_to_change(key: str) -> bool:
  """Whether a rerun may give `key` (dotted, e.g. 'eval.limit') another value."""
  return any(key == s or (s.endswith('.') and key.startswith(s)) for s in SAFE_TO_CHANGE)


def snapshot(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as flat {'a.b': value} JSON values, as a checkpoint stores it."""
  # The JSON round trip turns tuples into lists, as reading the stored copy back does.
  return json.loads(json.dumps(
      pytree.flatten(config.to_dict(), sep='.', is_leaf=lambda x: not isinstance(x, dict))))


def differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for each training-relevant field that differs.

  Keys only one side has (fields added or removed between versions) are not compared, nor are
  the LoRA settings of a full-SFT run.
  """
  now = snapshot(config)
  full = saved.get('tuning_method') == now.get('tuning_method') == 'full'
  return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys())
          if saved[k] != now[k] and not is_safe_to_change(k)
          and not (full and k.startswith('lora.'))]


def check(saved: Mapping[str, Any] | None, config: ml_collections.ConfigDict, *,
          where: str) -> None:
  """Raises a one-line ValueError when `config` may not resume from a checkpoint trained with
  `saved` (None: a checkpoint that stored no config, accepted)."""
  if saved is None:
    return
  diffs = differences(saved, config)
  if diffs:
    listed = '; '.join(f'{k}: {v!r} in the checkpoint, {w!r} now' for k, v, w in diffs)
    raise ValueError(f'cannot resume {where}: the config differs from the one it was trained '
                     f'with ({listed}); rerun with those values or use a new --workdir')


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


_all_finite_jit = jax.jit(_all_finite)


class Health:
  """Records, on the devices, the first step whose loss or gradient norm is not finite.

  `note` is called every step and only queues a tiny computation; `check` (a host sync) runs
  where the loop syncs anyway or is about to save, and raises before anything non-finite is
  written, naming the newest checkpoint (which, being saved only after a check, is finite).
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    # Made by a jitted function: device_put of host values would compare them across processes,
    # and NaN never equals itself.
    self._first = jax.jit(
        lambda: {'step': jnp.zeros((), jnp.int32), 'loss': jnp.full((), jnp.nan, jnp.float32),
                 'grad_norm': jnp.full((), jnp.nan, jnp.float32)},
        out_shardings=sharding.replicated(mesh))()
    self._note = jax.jit(self._update)

  @staticmethod
  def _update(first, metrics, step):
    bad = ~(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']))
    new = {'step': jnp.asarray(step, jnp.int32), 'loss': metrics['loss'].astype(jnp.float32),
           'grad_norm': metrics['grad_norm'].astype(jnp.float32)}
    take = bad & (first['step'] == 0)
    return jax.tree.map(lambda a, b: jnp.where(take, b, a), first, new)

  def note(self, metrics: dict[str, jax.Array], step: int) -> None:
    self._first = self._note(self._first, metrics, step)

  def check(self, state: Any, *, step: int, ckpt: checkpointing.Checkpointer) -> None:
    """Raises TrainingError if a step so far was not finite, or `state` (None: skip) is not."""
    first = jax.device_get(self._first)
    if int(first['step']):
      cause = (f"step {int(first['step'])}: loss {float(first['loss'])}, gradient norm "
               f"{float(first['grad_norm'])}")
    elif state is not None and not bool(_all_finite_jit(state)):
      cause = f'step {step}: the parameters or optimizer state are not finite'
    else:
      return
    ckpt.wait_until_finished()
    good = ckpt.latest_step()
    where = (f'the last good checkpoint is step {good} in {ckpt.directory}' if good is not None
             else 'no checkpoint was saved')
    raise TrainingError(f'{cause}; stopped without saving ({where}; lower optim.lr or check '
                        'the data before rerunning)')


def resume_point(config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer
                 ) -> int | None:
  """The step a rerun resumes from (None: a fresh run), after checking that `config` may resume
  from it (`resume.check`: a one-line error naming each training field that differs)."""
  step = ckpt.latest_step()
  if step is not None:
    saved = ckpt.read_extra(step).get('config')
    check(saved, config, where=os.path.join(ckpt.directory, str(step)))
  return step


def restore_finite(ckpt: checkpointing.Checkpointer, abstract: Any) -> tuple[Any, dict[str, Any]]:
  """The newest checkpoint whose arrays are all finite (older releases could save NaNs)."""
  for step in reversed(ckpt.all_steps()):
    state, extra = ckpt.restore(step, abstract_state=abstract)
    if bool(_all_finite_jit(state)):
      return state, extra
    logging.warning('checkpoint %d in %s is not finite: trying an older one', step,
                    ckpt.directory)
  raise TrainingError(f'no finite checkpoint in {ckpt.directory}: use a new --workdir')
