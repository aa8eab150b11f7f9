"""gemma_sft_jax: supervised fine-tuning of Gemma 2/3 on GSM8K in JAX/Flax."""

__version__ = '0.1.0'
