"""Exports a run's weights, or the base model, as a Hugging Face directory, a PEFT adapter or GGUF.

What is exported: RUN/final as trained (full SFT weights, or the base with the LoRA adapters
merged in: W + alpha/R·A·B in float32 before the cast), with `base` the checkpoint the config
names, and for 'peft' the LoRA adapters alone (the base weights are not read). The files
themselves are written by export_formats.py.

Memory: the weights stay on the mesh they were read onto and leave it one tensor at a time. A
jitted program takes one layer of a stacked (scanned) parameter, merges its adapter, converts it
to HF's layout (checkpoints' key table, inversely) and dtype, and replicates the result, so every
process reads the whole tensor from a local device: on several hosts that is the per-tensor
gather. Process 0 writes it and lets it go before the next one, so no host holds more than one
full tensor.

Output: written into a temporary directory beside it and renamed into place at the end, so a
failed export leaves nothing behind; an existing output is replaced only with `overwrite`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import ml_dtypes
import numpy as np

from gemma_sft_jax import pytree
from gemma_sft_jax import runner
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import checkpointing
from gemma_sft_jax.weights import export_formats
from gemma_sft_jax.weights import gguf_file
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import models
from gemma_sft_jax.weights import peft_adapters

FORMATS = ('hf', 'peft', 'gguf')
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}
Tensor = export_formats.Tensor


# ----------------------------------------------------------------------------------------------
# Tensors off the mesh, one at a time.
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _program(mesh: jax.sharding.Mesh, convert: Callable[[Any, Any], Any], config: Any,
             dtype: np.dtype, spec: lora.LoraSpec | None, stacked: bool) -> Callable:
  """(param, lora_a, lora_b, layer) -> that layer's tensor, adapter merged, converted, replicated.

  Cached per kind of tensor, so the layers of a model reuse one compiled program.
  """
  def run(x, a, b, i):
    if stacked:
      x, a, b = jax.tree.map(lambda t: t[i], (x, a, b))
    if a is not None:
      node = {'kernel': x.astype(jnp.float32), 'lora_a': a, 'lora_b': b}
      x = lora.merge_weights({'p': node}, spec)['p']['kernel']
    return convert(x, config).astype(dtype)
  return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def _tensor(name: str, convert: Callable[[Any, Any], Any], config: Any,
            dtype_of: Callable[[tuple[int, ...]], np.dtype], spec: lora.LoraSpec | None,
            mesh: jax.sharding.Mesh, x: Any, a: Any = None, b: Any = None,
            layer: int | None = None) -> Tensor:
  stacked = layer is not None
  shape = jax.eval_shape(lambda t: convert(t, config),
                         jax.ShapeDtypeStruct(x.shape[1:] if stacked else x.shape, x.dtype)).shape
  dtype = dtype_of(tuple(shape))

  def fetch():
    result = _program(mesh, convert, config, dtype, spec, stacked)(x, a, b, jnp.int32(layer or 0))
    return np.asarray(result.addressable_data(0))
  return Tensor(name, tuple(shape), dtype, fetch)


def _layers(flat: dict[str, Any]) -> Iterator[tuple[str, str, int | None]]:
  """(our per-layer path, path in `flat`, layer index in a stacked leaf) in file order: the
  embedding and final norm, then layer by layer."""
  top = [(p, p, None) for p in flat if not p.startswith(('layer_', 'layers/'))]
  per_layer = []
  for p, x in flat.items():
    if p.startswith('layers/'):
      per_layer += [(f'layer_{i}/{p[len("layers/"):]}', p, i) for i in range(x.shape[0])]
    elif p.startswith('layer_'):
      per_layer.append((p, p, None))
  per_layer.sort(key=lambda t: int(t[0].split('/', 1)[0][len('layer_'):]))
  return iter(top + per_layer)


def model_tensors(params: Any, config: architecture.ModelConfig, *, spec: lora.LoraSpec,
                  mesh: jax.sharding.Mesh, dtype_of: Callable[[tuple[int, ...]], np.dtype]
                  ) -> list[Tensor]:
  """Every base tensor under its HF name, in HF's layout, adapters (if any) merged."""
  flat = pytree.flatten(params)
  out = []
  for path, key, layer in _layers({k: v for k, v in flat.items() if not lora.is_adapter_path(k)}):
    name, convert = checkpoints.to_hf(path)
    a, b = flat.get(key[:-len('kernel')] + 'lora_a'), flat.get(key[:-len('kernel')] + 'lora_b')
    out.append(_tensor(name, convert, config, dtype_of, spec if a is not None else None, mesh,
                       flat[key], a, b, layer))
  return out


def adapter_tensors(adapters: Any, *, mesh: jax.sharding.Mesh) -> tuple[list[Tensor], list[str]]:
  """The LoRA tensors under PEFT's names and layout (float32), and the adapted kernels' paths."""
  flat = pytree.flatten(adapters)
  out, kernels = [], []
  for path, key, layer in _layers(flat):
    kernel = path[:-len('lora_a')] + 'kernel'
    which, convert = ('A', peft_adapters.to_peft_a) if path.endswith('lora_a') else (
        'B', peft_adapters.to_peft_b)
    kernels.append(kernel)
    out.append(_tensor(peft_adapters.tensor_name(kernel, which), convert, None,
                       lambda shape: np.dtype(np.float32), None, mesh, flat[key], layer=layer))
  return out, sorted(set(kernels))


# ----------------------------------------------------------------------------------------------
# What to export, and where.
# ----------------------------------------------------------------------------------------------
def _check_output(output: str, overwrite: bool) -> None:
  if os.path.lexists(output) and not overwrite:
    raise ValueError(f'--output={output} exists (--overwrite replaces it)')
  parent = os.path.dirname(output)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise ValueError(f'--output={output}: {parent} is not a directory')
  try:
    os.makedirs(parent, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=parent))
  except OSError as e:
    raise ValueError(f'--output={output}: cannot write in {parent} ({e.strerror or e})') from None


@contextlib.contextmanager
def _staged(output: str, *, overwrite: bool, is_main: bool) -> Iterator[str | None]:
  """A path to write the output at (None on processes other than 0), renamed to `output` when
  the block finishes; on an error, nothing is left behind."""
  if not is_main:
    yield None
    return
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=os.path.dirname(output))
  try:
    staged = os.path.join(tmp, 'out')
    yield staged
    if os.path.lexists(output):
      if not overwrite:
        raise ValueError(f'--output={output} appeared while exporting (--overwrite replaces it)')
      os.rename(output, os.path.join(tmp, 'replaced'))
    os.rename(staged, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _context_length(checkpoint: str) -> int | None:
  """The trained context length the source checkpoint states, if any."""
  if checkpoint.endswith('.gguf'):
    fields = gguf_file.read(checkpoint).fields
    return fields.get(f'{fields.get("general.architecture")}.context_length')
  if checkpoint and os.path.exists(os.path.join(checkpoint, 'config.json')):
    with open(os.path.join(checkpoint, 'config.json')) as f:
      cfg = json.load(f)
    return cfg.get('max_position_embeddings') or cfg.get('text_config', {}).get(
        'max_position_embeddings')
  return None


def _trained_adapters(config: ml_collections.ConfigDict, final: str, *,
                      mesh: jax.sharding.Mesh) -> tuple[models.Setup, Any]:
  """A LoRA run's adapters alone (the base weights are not read)."""
  setup = models.model_setup(config, with_lora=True, mesh=mesh)
  shapes, _ = lora.split(model_lib.param_shapes(setup.model), 'lora')
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, sharding.param_shardings(shapes, mesh))
  return setup, checkpointing.load_params(final, abstract)


def export(config: ml_collections.ConfigDict, *, workdir: str | None, fmt: str, output: str,
           base: bool = False, dtype: str = 'float32', overwrite: bool = False,
           max_shard_mb: float = 5000) -> str:
  """Exports the run in `workdir` (its final/ weights), or with `base` the base checkpoint.

  Args:
    config: the run's config (with the overrides it was trained with).
    workdir: the run directory (unused with `base`).
    fmt: 'hf', 'peft' (LoRA runs) or 'gguf'.
    output: the directory (hf, peft) or file (gguf) to write.
    base: export the checkpoint `config` names instead of the run's weights.
    dtype: 'float32' (exact), 'bfloat16' or 'float16' (hf and gguf).
    overwrite: replace an existing output.
    max_shard_mb: hf safetensors files are split above this many megabytes.

  Returns:
    The output path.

  Raises:
    ValueError / FileNotFoundError: bad input, named in one line; nothing is written then.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} is not one of {", ".join(FORMATS)}')
  if dtype not in DTYPES:
    raise ValueError(f'--dtype={dtype!r} is not one of {", ".join(DTYPES)}')
  if fmt == 'peft' and base:
    raise ValueError('--format=peft exports LoRA adapters, and --base has none')
  output = os.path.abspath(output)
  is_main = jax.process_index() == 0
  if is_main:
    _check_output(output, overwrite)
  final = os.path.join(workdir or '', 'final')
  if not base:
    if not os.path.isdir(final):
      raise FileNotFoundError(f'{workdir} has no final/ weights (train it to its last step, or '
                              'export the base model with --base)')
    trained, meta = runner.trained_config(config, final)
    if fmt == 'peft' and meta['tuning_method'] != 'lora':
      raise ValueError(f'--format=peft: {workdir} is a {meta["tuning_method"]} run, and PEFT '
                       'holds LoRA adapters (export it with --format=hf or gguf)')
    if meta.get('model_checkpoint', config.model.checkpoint) != config.model.checkpoint:
      raise ValueError(f'{workdir} was trained on model.checkpoint={meta["model_checkpoint"]!r}, '
                       f'the config names {config.model.checkpoint!r}')
  mesh = sharding.make_mesh(**config.mesh)
  if fmt == 'peft':
    setup, params = _trained_adapters(trained, final, mesh=mesh)
  else:
    setup, params = (runner.base_params(config, mesh=mesh) if base else
                     runner.load_trained(config, final, mesh=mesh))
  c = setup.config
  context_length = _context_length(setup.checkpoint)
  tokenizer_source = config.model.tokenizer or setup.checkpoint
  logging.info('exporting %s as %s (%s) to %s', 'the base model' if base else final, fmt, dtype,
               output)
  with _staged(output, overwrite=overwrite, is_main=is_main) as staged:
    if fmt == 'peft':
      tensors, kernels = adapter_tensors(params, mesh=mesh)
      export_formats.write_peft(staged, tensors, kernels=kernels, spec=setup.model.lora,
                                base=config.model.checkpoint, num_layers=c.num_layers)
    elif fmt == 'hf':
      tensors = model_tensors(params, c, spec=setup.model.lora, mesh=mesh,
                              dtype_of=lambda shape: DTYPES[dtype])
      export_formats.write_hf(staged, tensors, config=c, dtype=dtype,
                              context_length=context_length, tok=setup.tokenizer,
                              tokenizer_source=tokenizer_source,
                              max_shard_bytes=int(max_shard_mb * 1e6))
    else:
      tensors = model_tensors(params, c, spec=setup.model.lora, mesh=mesh,
                              dtype_of=lambda shape: DTYPES[dtype if len(shape) > 1 else 'float32'])
      # Without a stated context length, transformers' default for the family (what the
      # hf export's config.json says too).
      context_length = context_length or export_formats.hf_config(
          c, dtype=dtype, context_length=None).max_position_embeddings
      export_formats.write_gguf(staged, tensors, config=c, dtype=dtype,
                                context_length=context_length, tok=setup.tokenizer,
                                tokenizer_source=tokenizer_source,
                                name=os.path.splitext(os.path.basename(output))[0])
  return output
