"""Tiny random models and prompts shared by test_sampler.py and test_sampling.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import transformer as model_lib

NO_EOS = -1  # An id no model emits: every row runs for max_new_tokens.
BOS = 2
# Prompt lengths: shorter than, about, and far beyond the sliding window (7), so a batch mixes
# very different amounts of left padding and the local layers drop most of the longest prompt.
LENGTHS = (3, 9, 26)


def random_params(config: architecture.ModelConfig, seed: int):
  """A tiny model and random params with non-zero norm weights (flax inits them to 0, i.e. 1 + 0)."""
  model = model_lib.Transformer(config)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))['params']
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    if path[-1].key == 'scale':
      return jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype)
    return x

  return model, jax.tree_util.tree_map_with_path(perturb, params)


def random_prompts(config, lengths=LENGTHS, seed=1):
  """BOS + random non-special ids, one prompt per length."""
  rng = np.random.default_rng(seed)
  return [[BOS] + rng.integers(3, config.vocab_size, size=n - 1).tolist() for n in lengths]

# Two layers (one local, one global) of the tiny Gemma 3: fast to compile for tests that compile
# many programs (each sampling option, two processes).
SMALL = dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], num_layers=2,
                            layer_types=(architecture.SLIDING, architecture.GLOBAL))
