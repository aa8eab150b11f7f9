"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), read and written.

Names: PEFT keeps the adapter of a projection under the HF name of that projection (from the key
table in loading.py), `base_model.model.` + 'model.layers.0.self_attn.q_proj' +
'.lora_A.weight' / '.lora_B.weight'.

Layout: our kernel flattened to [in, out] is the HF weight [out, in] transposed, so PEFT's
lora_A [R, in] is our lora_a [in..., R] flattened and transposed, and lora_B [out, R] is our
lora_b [R, out...] flattened and transposed. PEFT scales B·A by lora_alpha / r, as we scale by
alpha / R (by lora_alpha / sqrt(r) with use_rslora, which we read as alpha = lora_alpha·sqrt(r)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from gemma_sft_jax import pytree
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import models

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'
_KEY = re.compile(re.escape(_PREFIX) + r'(?P<module>.+)\.lora_(?P<which>[AB])\.weight')
# adapter_config.json fields for PEFT features our LoRA does not have: each must be off.
_UNSUPPORTED = ('use_dora', 'lora_bias', 'modules_to_save', 'rank_pattern', 'alpha_pattern',
                'layer_replication', 'exclude_modules', 'trainable_token_indices',
                'target_parameters', 'alora_invocation_tokens', 'use_qalora', 'use_bdlora',
                'fan_in_fan_out')


def is_peft_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def module_name(kernel_path: str) -> str:
  """'layer_0/attn/q_proj/kernel' -> 'model.layers.0.self_attn.q_proj' (the adapted module)."""
  return checkpoints.path_to_hf(kernel_path)[:-len('.weight')]


def tensor_name(kernel_path: str, which: str) -> str:
  """The PEFT tensor name of the 'A' or 'B' matrix adapting our kernel at `kernel_path`."""
  return f'{_PREFIX}{module_name(kernel_path)}.lora_{which}.weight'


def to_peft_a(a: Any, c: Any = None) -> Any:
  """Our lora_a [in..., R] -> PEFT lora_A [R, in]."""
  del c
  return a.reshape(-1, a.shape[-1]).T


def to_peft_b(b: Any, c: Any = None) -> Any:
  """Our lora_b [R, out...] -> PEFT lora_B [out, R]."""
  del c
  return b.reshape(b.shape[0], -1).T


def adapter_config(spec: lora.LoraSpec, kernel_paths: list[str], *, base: str,
                   num_layers: int) -> dict[str, Any]:
  """The adapter_config.json PEFT reads for adapters on `kernel_paths` (per-layer paths).

  target_modules is the list of projection names when every layer has the same ones, else a
  regex over the exact module names (PEFT matches a string with re.fullmatch).
  """
  modules = sorted(module_name(p) for p in kernel_paths)
  targets: Any = '|'.join(map(re.escape, modules))
  if in_every_layer(kernel_paths, num_layers):
    targets = sorted({m.rsplit('.', 1)[1] for m in modules})
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base or None,
      'r': spec.rank, 'lora_alpha': spec.alpha, 'lora_dropout': spec.dropout,
      'target_modules': targets, 'bias': 'none', 'use_rslora': False, 'use_dora': False,
      'fan_in_fan_out': False, 'inference_mode': True, 'init_lora_weights': True,
      'modules_to_save': None, 'layers_to_transform': None, 'layers_pattern': None,
      'rank_pattern': {}, 'alpha_pattern': {},
  }


def _kinds(kernel_paths: list[str]) -> list[str]:
  # 'layer_3/attn/q_proj/kernel' -> 'attn/q_proj': the projection, whatever layer it is in.
  return sorted({p.split('/', 1)[1].rsplit('/', 1)[0] for p in kernel_paths})


def in_every_layer(kernel_paths: list[str], num_layers: int) -> bool:
  """Whether the same projections are adapted in every layer (what scanned layers need)."""
  return set(kernel_paths) == {f'layer_{i}/{k}/kernel' for i in range(num_layers)
                               for k in _kinds(kernel_paths)}


def _flat(tree: Any) -> dict[str, Any]:
  return pytree.flatten(tree)


def _read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, CONFIG_FILE)
  try:
    with open(file) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}:{e.lineno}: invalid JSON ({e.msg})') from None
  if cfg.get('peft_type') != 'LORA':
    raise ValueError(f'{file}: peft_type {cfg.get("peft_type")!r} is not LORA')
  for key in _UNSUPPORTED:
    if cfg.get(key):
      raise ValueError(f'{file}: {key}={cfg[key]!r} is not supported (plain LoRA only)')
  if cfg.get('bias', 'none') != 'none':
    raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported (plain LoRA only)")
  return cfg


def _expected_modules(cfg: dict[str, Any], modules: list[str]) -> set[str] | None:
  """The base's modules PEFT would adapt for a list of target_modules (None: not checkable)."""
  targets = cfg.get('target_modules')
  if not isinstance(targets, list):
    return None
  layers = cfg.get('layers_to_transform')
  layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
  out = set()
  for m in modules:
    layer = int(re.search(r'\.layers\.(\d+)\.', m).group(1))
    if any(m == t or m.endswith('.' + t) for t in targets) and (layers is None or layer in layers):
      out.add(m)
  return out


def _check_targets(cfg: dict[str, Any], modules: list[str], path: str, base: str) -> None:
  """Every name in a list of target_modules names a module of the base (or of the adapter)."""
  targets = cfg.get('target_modules')
  for t in targets if isinstance(targets, list) else ():
    if not any(m == t or m.endswith('.' + t) for m in modules):
      raise ValueError(f'{path}: target_modules names {t!r}, which is no module of the base '
                       f'model ({base})')


def read(path: str, config: architecture.ModelConfig, *,
         base: str) -> tuple[lora.LoraSpec, dict[str, np.ndarray]]:
  """Reads a PEFT LoRA adapter for the model `config` describes.

  Args:
    path: the adapter directory (adapter_config.json, adapter_model.safetensors).
    config: the base model's architecture.
    base: the base checkpoint's name, for messages.

  Returns:
    The LoraSpec (targets: exactly the adapted kernels) and {'layer_i/.../lora_a': array} in our
    layout, float32.

  Raises:
    ValueError: an unsupported PEFT feature, a tensor for a module or layer the base does not
      have, a shape the base does not match, or a module the config targets without weights.
  """
  cfg = _read_config(path)
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{file}: not found (PEFT adapters are read from safetensors)')
  rank = int(cfg['r'])
  alpha = float(cfg['lora_alpha']) * (math.sqrt(rank) if cfg.get('use_rslora') else 1.0)
  other = f"another base (its {CONFIG_FILE} names {cfg.get('base_model_name_or_path')!r})"
  # Every projection of the base with an adapter: the shapes our leaves would have.
  everything = lora.LoraSpec(rank=rank, alpha=alpha, targets=r'.*')
  shapes = _flat(model_lib.param_shapes(model_lib.Transformer(config, lora=everything)))
  kernels = {module_name(p): p for p in shapes if p.endswith('/kernel')}
  out: dict[str, np.ndarray] = {}
  tensors = checkpoints.read_safetensors(file)
  matches = {key: _KEY.fullmatch(key) for key in tensors}
  _check_targets(cfg, list(kernels) + [m['module'] for m in matches.values() if m], path, base)
  for key, array in tensors.items():
    m = matches[key]
    if not m:
      raise ValueError(f'{file}: tensor {key!r} is not the lora_A/lora_B weight of a projection '
                       '(plain LoRA on linear layers only)')
    try:
      mapped = checkpoints.hf_to_path(m['module'] + '.weight')
    except checkpoints.CheckpointError:
      mapped = ('', None)
    if mapped is None:
      continue  # A module we read past on purpose (the vision tower of multimodal Gemma 3).
    kernel = mapped[0]
    if kernel not in shapes or not kernel.endswith('/kernel'):
      raise ValueError(f'{path}: the adapter targets {m["module"]!r}, which the base model '
                       f'({base}) does not have: trained on {other}?')
    leaf = kernel[:-len('kernel')] + ('lora_a' if m['which'] == 'A' else 'lora_b')
    want = shapes[leaf].shape
    want_peft = (rank, math.prod(want[:-1])) if m['which'] == 'A' else (math.prod(want[1:]), rank)
    if tuple(array.shape) != want_peft:
      raise ValueError(f'{path}: tensor {key!r} has shape {tuple(array.shape)}, the base model '
                       f'({base}) needs {want_peft} for rank {rank}: trained on {other}?')
    array = np.asarray(array, np.float32).T
    out[leaf] = array.reshape(want)
  adapted = sorted({p.rsplit('/', 1)[0] + '/kernel' for p in out})
  for p in adapted:
    for leaf in ('lora_a', 'lora_b'):
      if p[:-len('kernel')] + leaf not in out:
        raise ValueError(f'{file}: {module_name(p)!r} has no lora_{leaf[-1].upper()} weight')
  if not adapted:
    raise ValueError(f'{file}: no LoRA weights for this base model ({base})')
  expected = _expected_modules(cfg, sorted(kernels))
  missing = sorted(expected - {module_name(p) for p in adapted}) if expected is not None else []
  if missing:
    raise ValueError(f'{path}: target_modules={cfg["target_modules"]} covers {missing[0]!r} of '
                     f'the base model ({base}) but the adapter has no weights for it: trained on '
                     f'{other}?')
  targets = '|'.join(map(re.escape, adapted))
  if in_every_layer(adapted, config.num_layers):
    targets = rf'layer_\d+/({"|".join(_kinds(adapted))})/kernel'
  return lora.LoraSpec(rank=rank, alpha=alpha, dropout=float(cfg.get('lora_dropout', 0.0)),
                            targets=targets), out


def load(config: ml_collections.ConfigDict, adapter_dir: str, *,
         mesh: jax.sharding.Mesh) -> tuple[models.Setup, Any]:
  """The base model of `config` plus a PEFT adapter, as (setup, params) for eval and decode."""
  base_setup = models.model_setup(config, with_lora=False, mesh=mesh)
  base_name = config.model.checkpoint or config.model.variant
  spec, arrays = read(adapter_dir, base_setup.config, base=base_name)
  with open(os.path.join(adapter_dir, CONFIG_FILE)) as f:
    named = json.load(f).get('base_model_name_or_path')
  if named and config.model.checkpoint and named != config.model.checkpoint:
    logging.warning('%s was trained on %r; loading it onto model.checkpoint=%r (same shapes)',
                    adapter_dir, named, config.model.checkpoint)
  kernel_paths = sorted({p.rsplit('/', 1)[0] + '/kernel' for p in arrays})
  # Scanned layers share one structure: an adapter on some layers only is loaded unrolled.
  scan = base_setup.model.scan_layers and in_every_layer(kernel_paths,
                                                         base_setup.config.num_layers)
  base_model = base_setup.model.clone(scan_layers=scan)
  setup = dataclasses.replace(base_setup, model=base_model.clone(lora=spec))
  params = models.init_params(dataclasses.replace(base_setup, model=base_model), mesh=mesh,
                                 seed=config.train.seed)
  shapes, _ = lora.split(model_lib.param_shapes(setup.model), 'lora')
  shardings = sharding.param_shardings(shapes, mesh)

  def place(path, spec_, sharding_):
    if path.startswith('layers/'):  # Stacked: layer i's leaf at index i.
      rest = path[len('layers/'):]
      value = np.stack([arrays[f'layer_{i}/{rest}'] for i in range(spec_.shape[0])])
    else:
      value = arrays[path]
    return jax.device_put(value.astype(spec_.dtype), sharding_)

  adapters = jax.tree.map(place, pytree.paths(shapes), shapes, shardings)
  logging.info('PEFT adapter %s: rank %d, alpha %g, %d projections', adapter_dir, spec.rank,
               spec.alpha, len(kernel_paths))
  return setup, lora.join(params, adapters)
