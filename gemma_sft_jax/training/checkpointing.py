"""Train-state checkpoints (orbax), automatic resume, SIGTERM handling, and final weight export.

A training checkpoint is one orbax step directory under WORKDIR/checkpoints/<step>/ with two items:
  state  a pytree of jax.Arrays (trainable params, optimizer state incl. int8/uint8 codes and fp32
         scales, step, rng key data as uint32), written by every process for the shards it owns;
  extra  a small JSON dict (data-iterator position, config snapshot), written by process 0.

Restoring takes an abstract tree of `jax.ShapeDtypeStruct`s *with shardings*: orbax reads each shard
straight onto its target device, so a checkpoint saved on one mesh restores onto any other (another
data/fsdp split, a single device, another host count). Before reading, the saved tree is checked
against the abstract one so a mismatch is a one-line error naming the first differing key.

Typical use in a training loop:

  ckpt = Checkpointer(workdir, every_steps=500, keep=2)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_fn), state_shardings)
  resumed = restore_or_none(ckpt, abstract_state=abstract)   # None on a fresh run
  with PreemptionGuard() as guard:
    for step in range(start, steps):
      state = update(state, batch)
      if guard.should_stop(step):
        ckpt.save(step, state=state, extra=extra, force=True)
        break                                   # then wait_until_finished(), close(), exit 0
      ckpt.save(step, state=state, extra=extra)  # no-op unless step % every_steps == 0
  ckpt.close()
"""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gemma_sft_jax import pytree

_STATE = 'state'
_EXTRA = 'extra'


def _abspath(path: str) -> str:
  # Orbax wants absolute paths; remote URIs (gs://...) are already absolute.
  return path if '://' in path else os.path.abspath(path)


def _flat_by_path(tree: Any) -> dict[str, Any]:
  # Paths by name only: Orbax metadata turns NamedTuple fields into dict keys.
  return pytree.flatten(tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))


def abstract_tree(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with each array's current sharding) for a tree of jax.Arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_tree(saved: Any, target: Any, *, where: str, check_dtype: bool = True) -> None:
  """Raises a one-line ValueError naming the first key where `saved` and `target` disagree.

  Args:
    saved: the checkpoint's metadata tree (leaves with .shape and .dtype).
    target: the abstract tree to restore into; every leaf needs a sharding.
    where: the checkpoint path, for the message.
    check_dtype: also require equal dtypes (off where a cast on load is intended).
  """
  saved_flat, target_flat = _flat_by_path(saved), _flat_by_path(target)
  only_target = sorted(target_flat.keys() - saved_flat.keys())
  if only_target:
    raise ValueError(f'checkpoint {where}: key {only_target[0]!r} is in the target tree but not '
                     'in the checkpoint')
  only_saved = sorted(saved_flat.keys() - target_flat.keys())
  if only_saved:
    raise ValueError(f'checkpoint {where}: key {only_saved[0]!r} is in the checkpoint but not '
                     'in the target tree')
  for key in sorted(target_flat):
    s, t = saved_flat[key], target_flat[key]
    if tuple(s.shape) != tuple(t.shape):
      raise ValueError(f'checkpoint {where}: key {key!r} has shape {tuple(s.shape)} in the '
                       f'checkpoint but {tuple(t.shape)} in the target tree')
    if check_dtype and jax.numpy.dtype(s.dtype) != jax.numpy.dtype(t.dtype):
      raise ValueError(f'checkpoint {where}: key {key!r} has dtype {s.dtype} in the checkpoint '
                       f'but {t.dtype} in the target tree')
    if getattr(t, 'sharding', None) is None:
      # Without a target sharding orbax would reuse the saved one, which fails on another mesh.
      raise ValueError(f'checkpoint {where}: target key {key!r} has no sharding (use '
                       'jax.ShapeDtypeStruct(shape, dtype, sharding=...))')


def _metadata_tree(metadata: Any) -> Any:
  # Orbax 0.12 wraps the tree in a TreeMetadata object; older releases return the tree itself.
  return getattr(metadata, 'tree', metadata)


class Checkpointer:
  """Periodic, asynchronous train-state checkpoints under WORKDIR/checkpoints, keeping the last N.

  All processes must call `save`/`restore` with the same arguments (orbax synchronises them).
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
    """Opens (or creates) WORKDIR/checkpoints.

    Args:
      workdir: the run directory; checkpoints go in its `checkpoints` subdirectory.
      every_steps: `save` writes only on steps that are multiples of this (unless forced).
      keep: how many of the most recent checkpoints to keep (older ones are deleted).
      async_save: write in a background thread so training continues during the write.
    """
    if every_steps < 1 or keep < 1:
      raise ValueError(f'checkpoint: every_steps and keep must be >= 1, got {every_steps}, {keep}')
    self.every_steps = every_steps
    self.directory = os.path.join(_abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    # Naming the handlers up front lets a fresh manager read metadata of steps it did not write.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _EXTRA: ocp.JsonCheckpointHandler()})

  def is_due(self, step: int) -> bool:
    """Whether `save(step, ...)` would write a periodic checkpoint."""
    return step % self.every_steps == 0 and step not in self._manager.all_steps()

  def read_extra(self, step: int) -> dict[str, Any]:
    """The `extra` dict of checkpoint `step` alone (no arrays are read)."""
    args = ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return dict(restored[_EXTRA] or {})

  def latest_step(self) -> int | None:
    """The newest finished checkpoint step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, state: Any, extra: Mapping[str, Any], force: bool = False) -> bool:
    """Starts saving `state` and `extra` as checkpoint `step` if it is due (or `force`).

    The write continues in the background; `state`'s arrays are copied first, so they may be
    donated to the next train step right away. A step that already exists is not rewritten.

    Args:
      step: the training step the state is at.
      state: pytree of jax.Arrays.
      extra: JSON-serialisable dict.
      force: save even when `step` is not a multiple of `every_steps` (preemption, last step).

    Returns:
      Whether a save was started.
    """
    if step in self._manager.all_steps():
      return False  # E.g. the final step coincided with a periodic save.
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _EXTRA: ocp.args.JsonSave(dict(extra))})
    return bool(self._manager.save(step, args=args, force=force))

  def restore(self, step: int | None = None, *,
              abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Reads checkpoint `step` (default: the latest) onto the shardings in `abstract_state`.

    Args:
      step: which checkpoint; None for the latest.
      abstract_state: pytree of jax.ShapeDtypeStruct with `sharding` set, same structure as saved.

    Returns:
      (state, extra): state as jax.Arrays with the requested shardings, extra as saved.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the directory.
      ValueError: the saved tree differs from `abstract_state` (first mismatching key named).
    """
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f'checkpoint: no step {step} in {self.directory} '
                              f'(have {self.all_steps()})')
    where = os.path.join(self.directory, str(step))
    saved = _metadata_tree(self._manager.item_metadata(step)[_STATE])
    check_tree(saved, abstract_state, where=where)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state),
                                 _EXTRA: ocp.args.JsonRestore()})
    restored = self._manager.restore(step, args=args)
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def wait_until_finished(self) -> None:
    """Blocks until any background save has been committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _preemption_service_running() -> bool:
  """Whether JAX's preemption service (which catches SIGTERM natively) runs in this process."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, 'preemption_sync_manager', None) is not None


class PreemptionGuard:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the training loop polls, so a stopped run
  saves a checkpoint at the next step boundary; a second Ctrl-C stops at once, saving nothing.

  Single process: a Python handler (installed from the main thread only) sets a flag, and the
  previous handlers come back on exit. Several processes: `jax.distributed.initialize()` already
  runs JAX's preemption service, which catches SIGTERM natively and agrees with the other hosts on
  one step at which all of them stop (a per-host flag could make hosts stop on different steps and
  deadlock in the save), so only SIGINT gets a Python handler then, which passes the signal on to
  that service as a SIGTERM. If the service was disabled (`jax_enable_preemption_service=False`),
  each process falls back to its own flag.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._stop = threading.Event()
    self._use_sync_point = False
    self.received: str | None = None  # Name of the first signal received.

  def _note(self, signum: int) -> bool:
    """Records the signal; False when it is a second Ctrl-C (the caller then stops at once)."""
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      return False
    if self.received is None:
      self.received = name
      print(f'Received signal {name}: will save a checkpoint and stop at the next step '
            '(Ctrl-C again stops without saving).', flush=True)
    return True

  def _handler(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if not self._note(signum):
      raise KeyboardInterrupt
    self._stop.set()

  def _forward_to_service(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if not self._note(signum):
      raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service catches it.

  def _install(self, signals: Sequence[int], handler: Any) -> None:
    if threading.current_thread() is not threading.main_thread():
      # signal.signal only works in the main thread; a flag that can never be set is harmless.
      print('PreemptionGuard: not in the main thread, signals are not intercepted.', flush=True)
      return
    for sig in signals:
      previous = signal.signal(sig, handler)
      self._previous.setdefault(sig, previous)

  def __enter__(self) -> PreemptionGuard:
    self._use_sync_point = jax.process_count() > 1
    if self._use_sync_point and _preemption_service_running():
      self._install([s for s in self._signals if s == signal.SIGINT], self._forward_to_service)
    elif not self._use_sync_point:
      self._install(self._signals, self._handler)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()

  def request_stop(self) -> None:
    """Sets the flag as a signal would (tests, or a loop that wants to stop for its own reason).

    With several processes, call it on all of them: each one's flag is local.
    """
    self._stop.set()

  @property
  def stop_requested(self) -> bool:
    """Whether this process has received a stop signal (or request_stop was called)."""
    return self._stop.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it on every step, on every process.

    Args:
      step: the current training step (increasing by one between calls, the same on all hosts).

    Returns:
      True on the step at which all processes should save a checkpoint and exit.
    """
    if self._use_sync_point:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step)) or self._stop.is_set()
      except RuntimeError:
        print('PreemptionGuard: JAX preemption service is off; using a per-process SIGTERM flag.',
              flush=True)
        self._use_sync_point = False
        self._install(self._signals, self._handler)
    return self._stop.is_set()


def save_params(path: str, params: Any) -> None:
  """Writes a tree of jax.Arrays (final params or LoRA adapters) to `path`, replacing it.

  Blocks until the write is complete, so `path` is ready for eval/decode when this returns.
  """
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_abspath(path), params, force=True)
    checkpointer.wait_until_finished()


def load_params(path: str, abstract: Any, *, cast: bool = True) -> Any:
  """Reads a tree written by `save_params` onto the shardings (and dtypes) in `abstract`.

  Args:
    path: directory written by `save_params`.
    abstract: pytree of jax.ShapeDtypeStruct with `sharding` set.
    cast: allow dtypes to differ from the saved ones (e.g. fp32 adapters read as bf16);
      structure and shapes must still match.

  Returns:
    The tree as jax.Arrays.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the saved tree differs from `abstract` (first mismatching key named).
  """
  path = _abspath(path)
  if '://' not in path and not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint: no saved parameters at {path}')
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    # Orbax 0.12 wraps it as StepMetadata(item_metadata=TreeMetadata(tree=...)).
    metadata = getattr(metadata, 'item_metadata', metadata)
    check_tree(_metadata_tree(metadata), abstract, where=path, check_dtype=not cast)
    return checkpointer.restore(path, abstract)


def restore_or_none(checkpointer: Checkpointer, *, abstract_state: Any,
                    ) -> tuple[Any, dict[str, Any]] | None:
  """(state, extra) of the latest checkpoint, or None for a fresh run (the auto-resume pattern)."""
  if checkpointer.latest_step() is None:
    return None
  return checkpointer.restore(abstract_state=abstract_state)

