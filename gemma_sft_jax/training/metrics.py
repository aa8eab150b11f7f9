"""Run metrics: WORKDIR/metrics.jsonl, optional Weights & Biases, a progress bar, FLOPs and MFU.

metrics.jsonl holds one JSON object per logged step, e.g. {"step": 10, "loss": 1.93, ...}; only the
main process writes it, and each line is flushed as it is written so a killed run keeps its lines.
Non-finite floats are written as null so the file is strict JSON (jq, pandas, any reader).

Resume: a run killed after its last checkpoint has lines for steps that the resumed run will
redo. `MetricsWriter(truncate_after_step=k)` drops every line with step > k (the restored step;
-1 for a fresh run, which empties the file), so the file always describes one consistent run.
Leave it None to append without touching earlier lines (e.g. an eval writing into the workdir).

wandb is imported only when its mode is not 'disabled'. 'online' without credentials (no
WANDB_API_KEY, no netrc entry) becomes 'offline', so a run never fails or hangs for want of a key.
Its files go under WORKDIR/wandb, and a resumed run continues the same wandb run (its id is stored
in WORKDIR/wandb/run_id). Only the given config dict and the metrics are logged, never env vars.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import statistics
import time
import urllib.parse
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

WANDB_MODES = ('online', 'offline', 'disabled')

# Dense bf16 peak FLOP/s per device, matched against jax's `device.device_kind` (lower-cased) in
# order: 'TPU v5 lite' is v5e and must be tested before the plain 'tpu v5' of v5p.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('h200', 989e12),
    ('h100', 989e12),
    ('a100', 312e12),
    ('v6 lite', 918e12),
    ('v6e', 918e12),
    ('v5 lite', 197e12),
    ('v5e', 197e12),
    ('v5p', 459e12),
    ('tpu v5', 459e12),
    ('tpu v4', 275e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for needle, flops in PEAK_BF16_FLOPS:
    if needle in kind:
      return flops
  return None


def flops_per_token(*, n_matmul_params: int, seq_len: int, n_layers: int, d_attn: int,
                    lora: bool) -> float:
  """Training FLOPs per token: weight matmuls plus causal attention (forward and backward).

  Weight matmuls cost 2N forward and 2N for the activation gradients; full fine-tuning adds 2N for
  the weight gradients (6N), LoRA does not need them for the frozen weights (4N; the adapters' own
  cost is negligible). Attention scores and the weighted sum are two matmuls of 2·T·d_attn FLOPs
  per token and layer, halved by the causal mask, and three times that with the backward pass:
  6·L·T·d_attn. Sliding-window layers are counted as full causal layers.

  Args:
    n_matmul_params: parameters used in matmuls (all kernels plus the output projection; the
      embedding lookup is not a matmul).
    seq_len: tokens per training sequence T.
    n_layers: transformer layers L.
    d_attn: query heads × head dim.
    lora: whether only adapters are trained.

  Returns:
    FLOPs per trained token.
  """
  weights = (4 if lora else 6) * n_matmul_params
  attention = 6 * n_layers * seq_len * d_attn
  return float(weights + attention)


def mfu(*, tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float | None,
        n_devices: int) -> float | None:
  """Model FLOPs utilisation as a fraction of peak (0..1), or None when the peak is unknown."""
  if not peak_flops_per_device:
    return None
  return tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)


def device_memory(device: Any = None) -> int | None:
  """Peak bytes in use on `device` (default: the first local one); None where not reported (CPU)."""
  device = jax.local_devices()[0] if device is None else device
  stats = device.memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


class CompileTimer:
  """Sums the seconds XLA spends compiling while it is active (`with CompileTimer() as t:`;
  then `t.seconds`). Programs read from the persistent compilation cache do not count."""

  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.seconds = 0.0

  def _listen(self, event: str, seconds: float, **_) -> None:
    if event == self.EVENT:
      self.seconds += seconds

  def __enter__(self) -> 'CompileTimer':
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


def median_seconds(fn, steps: int) -> float:
  """Median wall time of fn() (which must block) over `steps` calls after one warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def emit_json_line(result: Mapping[str, Any], output: str | None) -> None:
  """Prints a benchmark's result as one JSON line and, on process 0, appends it to `output`."""
  line = json.dumps(result)
  print(line, flush=True)
  if output and jax.process_index() == 0:
    with open(output, 'a') as f:
      f.write(line + '\n')


def _to_json_value(key: str, value: Any) -> Any:
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, int):
    return value
  if isinstance(value, (float, np.generic, np.ndarray, jax.Array)):
    array = np.asarray(value)  # Fetches a jax scalar to the host.
    if array.size != 1:
      raise TypeError(f'metrics: {key!r} has shape {array.shape}; log scalars only')
    if array.dtype.kind in 'biu':
      return array.reshape(()).item()
    number = float(array.reshape(()))  # float() also covers bfloat16, which .item() does not.
    return number if math.isfinite(number) else None
  raise TypeError(f'metrics: {key!r} has unsupported type {type(value).__name__}')


def _has_wandb_credentials() -> bool:
  if os.environ.get('WANDB_API_KEY'):
    return True
  host = urllib.parse.urlparse(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')).hostname
  try:
    return netrc.netrc(os.environ.get('NETRC')).authenticators(host or '') is not None
  except (OSError, netrc.NetrcParseError):
    return False


def resolve_wandb_mode(mode: str, *, has_credentials: bool) -> str:
  """The wandb mode to use: 'online' needs credentials and otherwise becomes 'offline'."""
  if mode not in WANDB_MODES:
    raise ValueError(f'wandb.mode must be one of {WANDB_MODES}, got {mode!r}')
  if mode == 'online' and not has_credentials:
    print('wandb: no WANDB_API_KEY (or netrc login) found; logging offline instead '
          '(sync later with `wandb sync`).', flush=True)
    return 'offline'
  return mode


def truncate_jsonl(path: str, *, after_step: int) -> tuple[int, dict[str, Any] | None]:
  """Drops lines of `path` with step > `after_step` (and unreadable ones).

  Returns:
    (how many lines were dropped, the last row kept or None).
  """
  if not os.path.exists(path):
    return 0, None
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  kept, last = [], None
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut short by a kill.
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= after_step:
      kept.append(line if line.endswith('\n') else line + '\n')
      last = row
  if len(kept) != len(lines):
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, path)  # Atomic: a kill now leaves either the old or the new file.
  return len(lines) - len(kept), last


class MetricsWriter:
  """Writes metrics of the main process to WORKDIR/metrics.jsonl and, if enabled, to wandb."""

  def __init__(self, workdir: str, *, is_main_process: bool, truncate_after_step: int | None = None,
               wandb_mode: str = 'disabled', wandb_project: str = 'gemma_sft_jax',
               wandb_name: str = '', wandb_config: Mapping[str, Any] | None = None):
    """Opens WORKDIR/metrics.jsonl for appending (main process only).

    Args:
      workdir: run directory.
      is_main_process: only the main process (jax.process_index() == 0) writes anything.
      truncate_after_step: drop existing lines with a larger step first (the restored step on
        resume, -1 for a fresh run); None keeps the file as is.
      wandb_mode: 'online' | 'offline' | 'disabled'.
      wandb_project: wandb project name.
      wandb_name: wandb run name ('' lets wandb choose).
      wandb_config: JSON-like dict recorded as the wandb run config (e.g. the run config).
    """
    self.path = os.path.join(workdir, 'metrics.jsonl')
    # The last row already in the file that is kept (main process, when truncating), e.g. the
    # final step's metrics for a rerun that finds training finished.
    self.last_row: dict[str, Any] | None = None
    self._file = None
    self._wandb_run = None
    if wandb_mode not in WANDB_MODES:
      raise ValueError(f'wandb.mode must be one of {WANDB_MODES}, got {wandb_mode!r}')
    if not is_main_process:
      return
    os.makedirs(workdir, exist_ok=True)
    if truncate_after_step is not None:
      dropped, self.last_row = truncate_jsonl(self.path, after_step=truncate_after_step)
      if dropped:
        print(f'{self.path}: dropped {dropped} line(s) after step {truncate_after_step} '
              '(logged after the last checkpoint of the previous run).', flush=True)
    self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    if wandb_mode != 'disabled':
      mode = resolve_wandb_mode(wandb_mode, has_credentials=_has_wandb_credentials())
      self._wandb_run = _start_wandb(workdir, mode=mode, project=wandb_project, name=wandb_name,
                                     config=dict(wandb_config or {}))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (scalars: Python numbers, numpy or jax scalars, strings) for `step`."""
    if self._file is None:
      return  # Not the main process: no host transfers, no files.
    row = {'step': int(step)}
    row.update({k: _to_json_value(k, v) for k, v in metrics.items()})
    self._file.write(json.dumps(row, allow_nan=False) + '\n')
    self._file.flush()
    if self._wandb_run is not None:
      self._wandb_run.log({k: v for k, v in row.items() if k != 'step'}, step=row['step'])

  def close(self) -> None:
    """Closes the file and finishes the wandb run."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._wandb_run is not None:
      self._wandb_run.finish()
      self._wandb_run = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _start_wandb(workdir: str, *, mode: str, project: str, name: str,
                 config: dict[str, Any]) -> Any:
  """A wandb run under WORKDIR/wandb resuming the id stored there; None if wandb is missing."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f'wandb: not installed; wandb.mode={mode!r} ignored (metrics.jsonl is still written).',
          flush=True)
    return None
  wandb_dir = os.path.join(workdir, 'wandb')
  os.makedirs(wandb_dir, exist_ok=True)
  id_path = os.path.join(wandb_dir, 'run_id')
  if os.path.exists(id_path):
    with open(id_path, encoding='utf-8') as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]  # wandb ids: lowercase alphanumerics.
    with open(id_path, 'w', encoding='utf-8') as f:
      f.write(run_id + '\n')
  # console='off': wandb's stdout capture would record every progress-bar redraw.
  settings = wandb.Settings(console='off', save_code=False)
  return wandb.init(project=project, name=name or None, config=config, dir=workdir, mode=mode,
                    id=run_id, resume='allow', settings=settings)


def _si(value: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(value) >= scale:
      return f'{value / scale:.1f}{unit}'
  return f'{value:.1f}'


def format_postfix(*, loss: float | None = None, learning_rate: float | None = None,
                   tokens_per_s: float | None = None, mfu_fraction: float | None = None,
                   ) -> dict[str, str]:
  """Short strings for the progress bar; quantities that are None are left out."""
  postfix = {}
  if loss is not None:
    postfix['loss'] = f'{float(loss):.4f}'
  if learning_rate is not None:
    postfix['lr'] = f'{float(learning_rate):.2e}'
  if tokens_per_s is not None:
    postfix['tok/s'] = _si(float(tokens_per_s))
  if mfu_fraction is not None:
    postfix['mfu'] = f'{100 * float(mfu_fraction):.1f}%'
  return postfix


class ProgressBar:
  """A tqdm bar over training steps with loss, lr, tokens/s and MFU; silent when not enabled."""

  def __init__(self, *, total: int, initial: int = 0, enabled: bool = True, desc: str = 'train'):
    """Creates the bar (nothing is drawn when not enabled).

    Args:
      total: the last training step.
      initial: the step training starts from (the restored step on resume).
      enabled: whether to draw it; pass `jax.process_index() == 0`.
      desc: label in front of the bar.
    """
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                          dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, *, loss: float | None = None, learning_rate: float | None = None,
             tokens_per_s: float | None = None, mfu_fraction: float | None = None) -> None:
    """Moves the bar to `step` (steps completed) and shows the given quantities."""
    self._bar.set_postfix(format_postfix(loss=loss, learning_rate=learning_rate,
                                         tokens_per_s=tokens_per_s, mfu_fraction=mfu_fraction),
                          refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, message: str) -> None:
    """Prints a line without breaking the bar."""
    if not self._bar.disable:
      self._bar.write(message)

  def close(self) -> None:
    """Finishes the bar."""
    self._bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
