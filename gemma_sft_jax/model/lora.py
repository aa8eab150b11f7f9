"""LoRA: adapter leaves (`lora_a`, `lora_b`) beside the kernels they adapt, in the same tree.

Everything LoRA is here: the `LoraSpec` (which projections get adapters), the adapter's einsums
(`adapter_output`, which the model's Projection adds as (alpha / R)·(x·A)·B), splitting a tree
into the trainable part and the frozen rest (full SFT: everything is trainable; LoRA: only
adapter leaves), joining them back, and folding adapters into the kernels for export or merged
decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

ADAPTER_LEAVES = ('lora_a', 'lora_b')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections get adapters: `targets` is a regex matched against 'layer_i/attn/q_proj/kernel'."""
  rank: int = 0
  alpha: float = 1.0
  dropout: float = 0.0
  targets: str = ''

  def rank_for(self, path: str) -> int:
    return self.rank if self.rank and re.fullmatch(self.targets, path) else 0


def adapter_output(equation: str, in_dims: int, x: jax.Array, a: jax.Array,
                   b: jax.Array) -> jax.Array:
  """(x·A)·B for the projection `equation` (e.g. 'BTD,DNH->BTNH') whose kernel's first `in_dims`
  axes contract with x: A [...in, R] and B [R, ...out] take the kernel's place through a rank-R
  bottleneck, so W + AB is never formed."""
  lhs, out_axes = equation.split('->')
  x_axes, k_axes = lhs.split(',')
  in_axes, kout_axes = k_axes[:in_dims], k_axes[in_dims:]
  xa = jnp.einsum(f'{x_axes},{in_axes}R->{x_axes[:-in_dims]}R', x, a)
  return jnp.einsum(f'{x_axes[:-in_dims]}R,R{kout_axes}->{out_axes}', xa, b)


def is_adapter_path(path: str) -> bool:
  return path.rsplit('/', 1)[-1] in ADAPTER_LEAVES


def _split(tree: dict[str, Any], keep) -> dict[str, Any]:
  """The sub-tree of leaves whose key satisfies keep(key); empty dicts are dropped."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _split(v, keep)
      if sub:
        out[k] = sub
    elif keep(k):
      out[k] = v
  return out


def split(params: dict[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) for tuning method 'full' | 'lora'."""
  if method == 'full':
    return params, {}
  if method != 'lora':
    raise ValueError(f"tuning_method: {method!r} is not 'full' or 'lora'")
  trainable = _split(params, lambda k: k in ADAPTER_LEAVES)
  if not trainable:
    raise ValueError('lora.targets: the regex matched no projection, so there is nothing to train')
  return trainable, _split(params, lambda k: k not in ADAPTER_LEAVES)


def join(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Merges two disjoint trees (the inverse of `split`)."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if not (isinstance(out[k], dict) and isinstance(v, dict)):
        raise ValueError(f'lora.join: leaf {k!r} is in both trees')
      out[k] = join(out[k], v)
    else:
      out[k] = v
  return out


def merge_weights(params: dict[str, Any], spec: LoraSpec) -> dict[str, Any]:
  """Folds every adapter into its kernel, W + (alpha/R)·A·B, and drops the adapter leaves.

  Used for export and merged decoding; training never forms W + AB.
  """
  def fold(node):
    if not isinstance(node, dict):
      return node
    if 'lora_a' in node:
      kernel, a, b = node['kernel'], node['lora_a'], node['lora_b']
      product = functools.partial(jnp.tensordot, axes=1)
      if kernel.ndim == a.ndim + b.ndim - 3:  # Scanned layers: A, B and W share a leading [L].
        product = jax.vmap(product)
      delta = product(a.astype(jnp.float32), b.astype(jnp.float32))
      merged = kernel.astype(jnp.float32) + (spec.alpha / spec.rank) * delta
      return {**{k: v for k, v in node.items() if k not in ADAPTER_LEAVES},
              'kernel': merged.astype(kernel.dtype)}
    return {k: fold(v) for k, v in node.items()}
  return fold(params)
