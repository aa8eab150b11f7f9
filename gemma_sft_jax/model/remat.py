"""What the backward pass keeps and recomputes: `model.remat`'s jax.checkpoint policies, and
each unrolled layer's backward pass held in its place (`model.remat_after_cotangent`).

docs/remat.md says when to use which; transformer.py applies them to its layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from gemma_sft_jax.model import flash_attention

_POLICIES = {
    'full': None,  # Recompute everything in the backward pass.
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
ATTENTION = 'attention'  # In 'save:...': attention's output.


def remat_policy(remat: str) -> Any:
  """The jax.checkpoint policy of `model.remat` ('none' is no remat at all: not asked here).

  'full' saves only each layer's input, 'dots' every projection's output, and
  'save:NAME,...' the outputs of the named projections (PROJECTIONS), e.g. all but the two
  widest, 'save:q_proj,k_proj,v_proj,o_proj,down_proj', to trade compute for memory in between.
  Under LoRA a projection is two matmuls (base and adapter) whose outputs 'dots' keeps apart;
  naming all seven projections keeps their sum once, half the memory. The name 'attention'
  keeps attention's output too; with the flash kernels, also each query's log-sum-exp, so the
  backward pass does not run the forward kernel again (the einsum path recomputes its scores
  either way).
  """
  if remat.startswith('save:'):
    names = tuple(n for n in remat[len('save:'):].split(',') if n)
    unknown = sorted(set(names) - set(PROJECTIONS) - {ATTENTION})
    if not names or unknown:
      raise ValueError(f'model.remat: {remat!r} names {unknown or "nothing"}; the projections are '
                       f'{", ".join(PROJECTIONS)}, and {ATTENTION!r} is attention\'s output')
    policy = jax.checkpoint_policies.save_only_these_names(*names)
    if ATTENTION in names:
      policy = jax.checkpoint_policies.save_from_both_policies(policy,
                                                               flash_attention.keeps_forward)
    return policy
  if remat not in _POLICIES:
    raise ValueError(f"model.remat: {remat!r} is not one of 'none', 'full', 'dots', 'save:...'")
  return _POLICIES[remat]


def recompute_after_cotangent(layer: nn.Module, deterministic: bool, *args):
  """`layer(*args, deterministic)` whose backward pass runs as one block, in its place.

  The forward pass keeps the layer's vjp (its residuals: what the remat policy saves). The
  backward pass puts those residuals and the incoming cotangent through one optimization
  barrier, so the recomputation cannot start before the backward pass reaches the layer nor
  merge with the forward pass; and all the cotangents it returns (the layer's parameters' and
  its inputs') through another, so the layer's weight gradients are computed before the layer
  below starts (XLA's scheduler would otherwise put them off and keep what they read alive).
  Under LoRA the frozen kernels' cotangents go through the barrier unused, and XLA drops them.
  """
  def run(mdl, *a):
    return mdl(*a, deterministic)

  def forward(mdl, *a):
    return nn.vjp(run, mdl, *a)

  def backward(vjp_fn, cotangent):
    vjp_fn, cotangent = jax.lax.optimization_barrier((vjp_fn, cotangent))
    return jax.lax.optimization_barrier(vjp_fn(cotangent))

  return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(layer, *args)
