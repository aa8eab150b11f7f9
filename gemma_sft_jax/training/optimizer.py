"""The optimizer: clip -> Adam (8-bit | bf16 | fp32 moments) -> masked weight decay -> LR -> -1.

`make_optimizer` returns `(tx, schedule)`: an optax chain

    clip_by_global_norm(clip_norm)
    scale_by_adam_8bit(b1, b2, eps, state_dtype)       # our own; moments stored in 8 bits
    add_decayed_weights(weight_decay, mask)            # AdamW: decoupled, masked
    scale_by_schedule(warmup_cosine_decay_schedule)    # 0 -> lr (warmup) -> min_lr (cosine)
    scale(-1)

and the schedule function, so the loop can log `schedule(step)`: the update applied when the
optimizer's count is k (the (k+1)-th call of `tx.update`) is scaled by `schedule(k)`. We return the
schedule rather than use `optax.inject_hyperparams`, which would put the LR into the state (and the
checkpoint) and re-evaluate it as a traced hyperparameter for no gain.

8-bit moments follow bitsandbytes' blockwise 8-bit Adam (Dettmers et al. 2022): the first moment as
signed int8 codes into the signed "dynamic" map, the second as uint8 codes into the unsigned map,
each with an fp32 absmax per block of 256 elements. Blocks run along the LAST axis, so a param of
shape [..., n] has codes of shape [..., n] and scales of shape [..., ceil(n / 256)]: both shard
like the param (`state_shardings`). Each step dequantises, does the Adam update in fp32 (the update
uses the fresh fp32 moments, as bitsandbytes does), and requantises. Small tensors (< 4096 elements)
keep fp32 moments: their 8-bit saving is negligible and norms are sensitive.

The chain is the reference semantics (tested against `optax.adamw`); training applies the same
maths fused, block by block and in place, through `update.make_update`, which uses this chain's
state and `adam_leaf`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_sft_jax import pytree
from gemma_sft_jax.training import quantization as quant
from gemma_sft_jax.training import rounding
from gemma_sft_jax.training.quantization import BLOCK_SIZE, QuantizedArray

STATE_DTYPES = ('int8', 'bfloat16', 'float32')
MIN_QUANTIZED_SIZE = 4096


def load_moment(stored: Any, *, block_size: int = BLOCK_SIZE) -> jax.Array:
  """A stored moment (QuantizedArray, bf16 or fp32) as fp32."""
  if isinstance(stored, QuantizedArray):
    return quant.dequantize_blockwise(stored, block_size=block_size)
  return stored.astype(jnp.float32)


def store_moment(x: jax.Array, like: Any, *, block_size: int = BLOCK_SIZE,
                 absmax: jax.Array | None = None, bits16: jax.Array | None = None) -> Any:
  """fp32 x stored the way `like` is (requantised with like's map, or cast to its dtype).

  `absmax`, if given, is x's block absmax (`quantization.block_absmax`), computed beforehand.
  `bits16`, if given, rounds a bf16 moment stochastically with these random bits
  (`rounding.stochastic_round_to_bf16`) instead of to nearest.
  """
  if isinstance(like, QuantizedArray):
    return quant.quantize_blockwise(x, signed=like.codes.dtype == jnp.int8, block_size=block_size,
                                    absmax=absmax)
  if bits16 is not None and like.dtype == jnp.bfloat16:
    return rounding.stochastic_round_to_bf16(x, bits16)
  return x.astype(like.dtype)


def bias_corrections(b1: float, b2: float, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  t = count.astype(jnp.float32)
  return 1.0 - jnp.asarray(b1, jnp.float32) ** t, 1.0 - jnp.asarray(b2, jnp.float32) ** t


def adam_leaf(g: jax.Array, mu: Any, nu: Any, *, b1: float, b2: float, eps: float,
              bc: tuple[jax.Array, jax.Array], block_size: int = BLOCK_SIZE,
              absmax: tuple[jax.Array | None, jax.Array | None] | None = None,
              bits16: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, Any, Any]:
  """One leaf (or block of a leaf) of Adam: fp32 gradient g -> (update direction, new mu, new nu).

  The one copy of Adam's maths, shared by `scale_by_adam_8bit` and `update.make_update`: moments are
  loaded to fp32, updated, used for the direction (the fresh fp32 values, as bitsandbytes does)
  and stored back in their own format. `bc` are the bias corrections (1 - b1^t, 1 - b2^t).

  `absmax`, if given, holds the block absmax of the new moments (from `moment_absmax`, None for a
  moment that is not 8-bit), so that storing them is elementwise. `bits16`, if given, holds
  random bits for each moment: bf16 moments are then rounded stochastically (`store_moment`).
  """
  m, v = _new_moments(g, mu, nu, b1=b1, b2=b2, block_size=block_size)
  # Scalar reciprocals: one multiplication per element instead of a division.
  u = direction(m, v, eps=eps, inv_bc=(1.0 / bc[0], 1.0 / bc[1]))
  am, av = absmax if absmax is not None else (None, None)
  bm, bv = bits16 if bits16 is not None else (None, None)
  return u, store_moment(m, mu, block_size=block_size, absmax=am, bits16=bm), store_moment(
      v, nu, block_size=block_size, absmax=av, bits16=bv)


def moment_absmax(g: jax.Array, mu: Any, nu: Any, *, b1: float, b2: float,
                  block_size: int = BLOCK_SIZE) -> tuple[jax.Array | None, jax.Array | None]:
  """The block absmax of the moments `adam_leaf` will store (None where a moment is not 8-bit).

  Computing it in a pass of its own, before `adam_leaf`, lets the moments be recomputed rather
  than written out in fp32 between the reduction and the requantisation (`update.make_update`).
  """
  m, v = _new_moments(g, mu, nu, b1=b1, b2=b2, block_size=block_size)
  pick = lambda x, like: (quant.block_absmax(x, block_size=block_size)  # noqa: E731
                          if isinstance(like, QuantizedArray) else None)
  return pick(m, mu), pick(v, nu)


def _new_moments(g, mu, nu, *, b1, b2, block_size):
  return new_moments(g, load_moment(mu, block_size=block_size),
                     load_moment(nu, block_size=block_size), b1=b1, b2=b2)


# The arithmetic of one step on fp32 values, also written into the GPU kernel (`adam_kernel`).

def new_moments(g: jax.Array, mu: jax.Array, nu: jax.Array, *, b1: float, b2: float
                ) -> tuple[jax.Array, jax.Array]:
  """Adam's new moments from the fp32 gradient and the fp32 (loaded) old moments."""
  return b1 * mu + (1.0 - b1) * g, b2 * nu + (1.0 - b2) * jnp.square(g)


def direction(m: jax.Array, v: jax.Array, *, eps: float, inv_bc: tuple[Any, Any]) -> jax.Array:
  """Adam's update direction; `inv_bc` are the reciprocal bias corrections 1 / (1 - b^t)."""
  return (m * inv_bc[0]) / (jnp.sqrt(v * inv_bc[1]) + eps)


def apply_direction(p: jax.Array, u: jax.Array, *, lr: jax.Array, weight_decay: float
                    ) -> jax.Array:
  """The new fp32 param: decoupled weight decay added to the direction, then the chain's order
  (scale by LR, negate, add). `weight_decay` is 0 for leaves that are not decayed."""
  if weight_decay:
    u = u + weight_decay * p
  return p + -(lr * u)


# ---- Adam with 8-bit / bf16 / fp32 moments. -----------------------------------------------------

class ScaleByAdam8bitState(NamedTuple):
  """Adam state. `mu` and `nu` have the params' tree structure; each leaf is a QuantizedArray
  (8-bit) or a bf16/fp32 array, so a params-shaped tree is a prefix of them."""
  count: jax.Array  # int32 scalar: number of updates done
  mu: Any
  nu: Any


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       state_dtype: str = 'int8', block_size: int = BLOCK_SIZE,
                       min_quantized_size: int = MIN_QUANTIZED_SIZE
                       ) -> optax.GradientTransformation:
  """Adam's update direction with moments stored in 8 bits (or bf16 / fp32).

  The same maths as `optax.scale_by_adam` (bias-corrected, eps outside the sqrt), computed in
  fp32; only the storage of the moments differs. Returned updates are fp32, so small steps are not
  rounded away before they reach (possibly bf16) params.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to sqrt(v̂).
    state_dtype: 'int8' (int8/uint8 codes + fp32 block absmax), 'bfloat16' or 'float32'.
    block_size: elements per absmax block along the last axis (8-bit only).
    min_quantized_size: tensors with fewer elements (or a last axis of 1, where the per-block
      scale would cost more than it saves) keep fp32 moments (8-bit only).

  Returns:
    An optax.GradientTransformation whose state is a ScaleByAdam8bitState.
  """
  if state_dtype not in STATE_DTYPES:
    raise ValueError(f'optim.state_dtype: {state_dtype!r} is not one of {STATE_DTYPES}')

  def init_moment(p, signed):
    shape = tuple(p.shape)
    if state_dtype == 'int8':
      if math.prod(shape) >= min_quantized_size and len(shape) >= 1 and shape[-1] > 1:
        return quant.zero_quantized(shape, signed=signed, block_size=block_size)
      return jnp.zeros(shape, jnp.float32)
    return jnp.zeros(shape, jnp.dtype(state_dtype))

  def init_fn(params):
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: init_moment(p, True), params),
        nu=jax.tree.map(lambda p: init_moment(p, False), params))

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    bc = bias_corrections(b1, b2, count)

    def leaf(g, mu, nu):
      return adam_leaf(g.astype(jnp.float32), mu, nu, b1=b1, b2=b2, eps=eps, bc=bc,
                       block_size=block_size)

    out = jax.tree.map(leaf, updates, state.mu, state.nu)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
    return pick(0), ScaleByAdam8bitState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformation(init_fn, update_fn)


# ---- Schedule, decay mask, the chain. -----------------------------------------------------------

def min_lr_from_ratio(lr: float, ratio: float) -> float:
  """The absolute min LR for HF-style `min_lr_rate` (e.g. lr=1e-5, ratio=0.1 -> 1e-6)."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f'min LR ratio {ratio} is not in [0, 1]')
  return lr * ratio


def make_schedule(*, lr: float, min_lr: float, warmup_steps: int,
                  decay_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine lr -> min_lr until decay_steps, then constant min_lr.

  Args:
    lr: peak learning rate.
    min_lr: final learning rate (absolute, not a ratio; see `min_lr_from_ratio`).
    warmup_steps: length of the linear warmup.
    decay_steps: total length of warmup + cosine (usually train.steps).

  Returns:
    schedule(step) -> learning rate.
  """
  if not 0.0 <= min_lr <= lr:
    raise ValueError(f'optim.min_lr={min_lr} must be in [0, optim.lr={lr}] (it is absolute)')
  if not 0 <= warmup_steps < decay_steps:
    raise ValueError(f'optim.warmup_steps={warmup_steps} must be >= 0 and < decay_steps='
                     f'{decay_steps} (optim.decay_steps, which defaults to train.steps)')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=decay_steps,
      end_value=min_lr)


def default_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
  """A bool tree: True where weight decay applies.

  No decay for 1-D (and 0-D) params, for any path with a 'norm' component (RMSNorm scales), and
  for embeddings (a path component containing 'embed') unless decay_embeddings. Everything else
  (projection kernels, LoRA factors) decays. Works on arrays and jax.ShapeDtypeStructs, and as an
  optax mask callable.

  Args:
    params: a nested dict of params, paths joined by '/' (e.g. 'layer_0/attn/q_proj/kernel').
    decay_embeddings: decay the embedding table too.

  Returns:
    A tree like params with bool leaves.
  """
  def decays(path, p):
    parts = pytree.path_name(path).lower().split('/')
    if len(p.shape) < 2 or any('norm' in s for s in parts):
      return False
    return decay_embeddings or not any('embed' in s for s in parts)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                   weight_decay: float, clip_norm: float | None, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, state_dtype: str = 'int8',
                   decay_mask: Any = None, block_size: int = BLOCK_SIZE,
                   min_quantized_size: int = MIN_QUANTIZED_SIZE
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with 8-bit (or bf16 / fp32) moments, global-norm clipping and warmup-cosine LR.

  Args:
    lr: peak learning rate.
    min_lr: final learning rate, absolute.
    warmup_steps: linear warmup from 0.
    decay_steps: total schedule length including warmup.
    weight_decay: decoupled decay coefficient (multiplied by the LR, as in optax.adamw).
    clip_norm: max global gradient norm; None or 0 disables clipping.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    state_dtype: 'int8' | 'bfloat16' | 'float32' storage of the moments.
    decay_mask: bool tree or callable(params) -> bool tree; None = `default_decay_mask`
      (no decay for norms, 1-D params and embeddings).
    block_size: 8-bit absmax block along the last axis.
    min_quantized_size: smaller tensors keep fp32 moments.

  Returns:
    (tx, schedule): the optax transformation (updates are to be added to params) and
    schedule(count) -> LR, where update number k (0-based) uses schedule(k).
  """
  schedule = make_schedule(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                           decay_steps=decay_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
      scale_by_adam_8bit(b1, b2, eps, state_dtype=state_dtype, block_size=block_size,
                         min_quantized_size=min_quantized_size),
      optax.add_decayed_weights(weight_decay,
                                default_decay_mask if decay_mask is None else decay_mask),
      optax.scale_by_schedule(schedule),
      optax.scale(-1.0),
  )
  return tx, schedule


# ---- Shardings and memory of the state. ---------------------------------------------------------

def _scales_sharding(s: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.sharding.Sharding:
  """The param's sharding for its block scales: same spec, except that the last (block) axis
  stays unsharded when the mesh axes do not divide the number of blocks."""
  if not isinstance(s, NamedSharding):
    if s.is_fully_replicated:
      return s
    raise ValueError(f'state_shardings: cannot derive block-scale sharding from {s!r}; '
                     'use NamedSharding for params')
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  last = spec[-1]
  names = last if isinstance(last, tuple) else (last,) if last is not None else ()
  if shape[-1] % math.prod(s.mesh.shape[n] for n in names):
    spec[-1] = None
  return NamedSharding(s.mesh, P(*spec))


def _moment_sharding(s: jax.sharding.Sharding, moment: Any) -> Any:
  if isinstance(moment, QuantizedArray):
    return QuantizedArray(codes=s, scales=_scales_sharding(s, tuple(moment.scales.shape)))
  return s


def state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any) -> Any:
  """Shardings for `tx.init(params)`, derived from the params' shardings.

  Moment codes (and bf16/fp32 moments) get the param's sharding; block scales get the same
  PartitionSpec (the block axis is unsharded where the mesh does not divide it); scalar counts
  are replicated. Use as `jax.jit(tx.init, out_shardings=state_shardings(tx, params, shardings))`.

  Args:
    tx: a transformation from `make_optimizer` (or any chain whose only non-scalar state is
      ScaleByAdam8bitState).
    params: arrays or jax.ShapeDtypeStructs (only shapes are used).
    param_shardings: a tree like params of jax.sharding.Sharding.

  Returns:
    A tree of shardings with the structure of the optimizer state.
  """
  abstract = jax.eval_shape(tx.init, params)
  shardings = jax.tree.leaves(param_shardings)
  named = [s for s in shardings if isinstance(s, NamedSharding)]
  if named:
    replicated = NamedSharding(named[0].mesh, P())
  elif shardings:
    replicated = shardings[0]
  else:
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def visit(path, node):
    if isinstance(node, ScaleByAdam8bitState):
      return ScaleByAdam8bitState(
          count=replicated, mu=jax.tree.map(_moment_sharding, param_shardings, node.mu),
          nu=jax.tree.map(_moment_sharding, param_shardings, node.nu))
    if node.ndim:
      raise ValueError(f'state_shardings: unexpected non-scalar optimizer state at '
                       f'{jax.tree_util.keystr(path)} with shape {node.shape}')
    return replicated

  return jax.tree_util.tree_map_with_path(
      visit, abstract, is_leaf=lambda x: isinstance(x, ScaleByAdam8bitState))


def state_bytes(abstract_params: Any, state_dtype: str = 'int8', *,
                block_size: int = BLOCK_SIZE, min_quantized_size: int = MIN_QUANTIZED_SIZE) -> int:
  """Bytes of the `make_optimizer` state for params of these shapes, without allocating anything.

  Args:
    abstract_params: a tree of jax.ShapeDtypeStruct (or arrays).
    state_dtype: 'int8' | 'bfloat16' | 'float32'.
    block_size: 8-bit absmax block.
    min_quantized_size: smaller tensors keep fp32 moments.

  Returns:
    The total nbytes of all state leaves (moments, scales, step counts).
  """
  tx, _ = make_optimizer(lr=1.0, min_lr=0.0, warmup_steps=1, decay_steps=2, weight_decay=0.0,
                         clip_norm=1.0, state_dtype=state_dtype, block_size=block_size,
                         min_quantized_size=min_quantized_size)
  abstract = jax.eval_shape(tx.init, abstract_params)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
