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

bf16 params: an Adam step of lr·O(1) = 1e-5 is far below bf16's resolution (2^-8 ≈ 3.9e-3
relative), so `p + u` rounded to nearest leaves most weights unchanged. `apply_updates_stochastic`
rounds p + u stochastically to bf16, which is unbiased, so small updates accumulate in expectation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

STATE_DTYPES = ('int8', 'bfloat16', 'float32')
BLOCK_SIZE = 256
MIN_QUANTIZED_SIZE = 4096


# ---- Dynamic quantisation maps. ------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def dynamic_map(*, signed: bool) -> np.ndarray:
  """The 256 sorted code values of bitsandbytes' dynamic map, in [-1, 1] (signed) or [0, 1].

  A code is a decimal exponent e in {-6..0} plus a linear fraction: the values 10^e · mid, where
  `mid` runs over the midpoints of an even split of [0.1, 1] into 2^(e+6) parts (signed, with both
  signs) or 2^(e+7) parts (unsigned: the sign bit buys one more fraction bit). Plus 0 and 1.0.
  So the map covers seven decades with ~constant relative precision, which suits Adam moments
  spread over orders of magnitude within a block. The signed map has 1.0 but not -1.0.

  Args:
    signed: the signed map (first moment) or the unsigned one (second moment).

  Returns:
    A read-only float32 array of 256 increasing values.
  """
  values = [0.0, 1.0]
  for i in range(7):
    parts = 2 ** i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, parts + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
    values.extend(mids)
    if signed:
      values.extend(-mids)
  table = np.sort(np.asarray(values, np.float32))
  assert table.size == 256 and np.all(np.diff(table) > 0), table
  table.flags.writeable = False
  return table


def _code_offset(signed: bool) -> int:
  # int8 codes are table indices shifted by -128 (so they fit a signed byte); uint8 codes are
  # the indices themselves.
  return 128 if signed else 0


class QuantizedArray(NamedTuple):
  """An 8-bit blockwise-quantised array: x[..., j] ≈ map[codes[..., j]] · scales[..., j // 256]."""
  codes: jax.Array   # [..., n] int8 (signed map) or uint8 (unsigned map)
  scales: jax.Array  # [..., ceil(n / block)] float32 absmax per block


def _num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def nearest_code_index(normed: jax.Array, *, signed: bool) -> jax.Array:
  """Index (into `dynamic_map(signed)`) of the code nearest to each value in [-1, 1] / [0, 1].

  Equal to `searchsorted(midpoints, normed, side='left')` (the tested reference), but computed
  arithmetically: the map's decade and linear position give a candidate code, which is
  then off by at most one and is corrected by comparing with its two neighbouring midpoints. A
  binary search is 8 dependent gathers per element; on an H100 this path makes the 8-bit update
  several times faster than `jnp.searchsorted(..., method='scan_unrolled')` (docs/optimizer.md).

  Args:
    normed: values divided by their block absmax.
    signed: which map.

  Returns:
    int32 indices in [0, 255].
  """
  table = dynamic_map(signed=signed)
  midpoints = jnp.asarray((table[:-1] + table[1:]) / 2)
  a = jnp.abs(normed) if signed else normed
  # Decade i in 0..6 holds codes 10^(i-6) · [0.1, 1): count the decade edges at or below a.
  decade = sum((a >= 10.0 ** (k - 7)).astype(jnp.int32) for k in range(1, 7))
  parts = jnp.left_shift(1, decade + (0 if signed else 1))  # codes in this decade
  before = parts - (1 if signed else 2)  # codes in lower decades (2^i - 1 or 2^(i+1) - 2)
  scale = jnp.asarray(10.0 ** np.arange(-6, 1), jnp.float32)[decade]
  frac = jnp.floor((a / scale - 0.1) * parts.astype(jnp.float32) / 0.9).astype(jnp.int32)
  first_positive = 128 if signed else 1
  cand = first_positive + before + jnp.clip(frac, 0, parts - 1)
  lower, upper = midpoints[cand - 1], midpoints[jnp.minimum(cand, 254)]
  if not signed:
    index = cand - 1 + (a > lower) + (a > upper)
  else:
    # Negative codes mirror the positive ones around 0 (index 127), except that there is no
    # -1.0: the most negative code is the mirror of 0.99297, so clip before mirroring. A tie
    # goes to the lower code, as searchsorted(side='left') does: for negatives that is the
    # larger magnitude, hence >=.
    neg = normed < 0
    above = lambda m: jnp.where(neg, a >= m, a > m)  # noqa: E731
    index = cand - 1 + above(lower) + above(upper)
    index = jnp.where(neg, 254 - jnp.minimum(index, 254), index)
  return index.astype(jnp.int32)


def quantize_blockwise(x: jax.Array, *, signed: bool,
                       block_size: int = BLOCK_SIZE) -> QuantizedArray:
  """Quantises x along its last axis in blocks, to the nearest code of the dynamic map.

  Args:
    x: an array of rank >= 1; the last axis is padded (with zeros) to a multiple of block_size.
    signed: the signed map and int8 codes, or the unsigned map and uint8 codes (x >= 0).
    block_size: elements per absmax block.

  Returns:
    QuantizedArray with codes shaped like x and scales [..., ceil(n / block_size)].
  """
  *lead, n = x.shape
  nb = _num_blocks(n, block_size)
  x = x.astype(jnp.float32)
  xb = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block_size - n)])
  xb = xb.reshape(*lead, nb, block_size)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  normed = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  index = nearest_code_index(normed, signed=signed)
  index = index.reshape(*lead, nb * block_size)[..., :n]
  codes = (index - _code_offset(signed)).astype(jnp.int8 if signed else jnp.uint8)
  return QuantizedArray(codes=codes, scales=absmax)


def dequantize_blockwise(q: QuantizedArray, *, block_size: int = BLOCK_SIZE) -> jax.Array:
  """The float32 values of a QuantizedArray (the map follows from the code dtype)."""
  signed = q.codes.dtype == jnp.int8
  table = jnp.asarray(dynamic_map(signed=signed))
  values = table[q.codes.astype(jnp.int32) + _code_offset(signed)]
  n = q.codes.shape[-1]
  return values * jnp.repeat(q.scales, block_size, axis=-1)[..., :n]


def _zero_quantized(shape: tuple[int, ...], *, signed: bool, block_size: int) -> QuantizedArray:
  zero_code = int(np.searchsorted(dynamic_map(signed=signed), 0.0)) - _code_offset(signed)
  return QuantizedArray(
      codes=jnp.full(shape, zero_code, jnp.int8 if signed else jnp.uint8),
      scales=jnp.zeros((*shape[:-1], _num_blocks(shape[-1], block_size)), jnp.float32))


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
        return _zero_quantized(shape, signed=signed, block_size=block_size)
      return jnp.zeros(shape, jnp.float32)
    return jnp.zeros(shape, jnp.dtype(state_dtype))

  def init_fn(params):
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: init_moment(p, True), params),
        nu=jax.tree.map(lambda p: init_moment(p, False), params))

  def load(stored):
    if isinstance(stored, QuantizedArray):
      return dequantize_blockwise(stored, block_size=block_size)
    return stored.astype(jnp.float32)

  def store(x, like):
    if isinstance(like, QuantizedArray):
      return quantize_blockwise(x, signed=like.codes.dtype == jnp.int8, block_size=block_size)
    return x.astype(like.dtype)

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
    bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

    def leaf(g, mu, nu):
      g = g.astype(jnp.float32)
      m = b1 * load(mu) + (1.0 - b1) * g
      v = b2 * load(nu) + (1.0 - b2) * jnp.square(g)
      u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
      return u, store(m, mu), store(v, nu)

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


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


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
    parts = _path_str(path).lower().split('/')
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
  tx, _ = make_optimizer(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=1, weight_decay=0.0,
                         clip_norm=1.0, state_dtype=state_dtype, block_size=block_size,
                         min_quantized_size=min_quantized_size)
  abstract = jax.eval_shape(tx.init, abstract_params)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


# ---- Applying updates to (bf16) params. ---------------------------------------------------------

def stochastic_round_to_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  """Rounds float32 x to bfloat16 up or down with probability proportional to proximity.

  bf16 is the top 16 bits of an fp32 pattern. Adding uniform random bits in [0, 2^16) to the
  pattern and truncating the low 16 bits rounds the *magnitude* up with probability equal to the
  truncated fraction, so E[result] = x for either sign (fp32 is sign-magnitude, so the same
  integer addition works for negatives). Carries into the exponent are correct rounding up to the
  next binade. NaNs are passed through (a NaN whose payload is only in the low bits would
  otherwise truncate to inf).

  Args:
    x: values to round (cast to float32 first).
    key: a jax PRNG key.

  Returns:
    bfloat16 array shaped like x.
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  # Exact: the low 16 bits are zero, so the fp32 value is representable in bf16.
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), y)


def apply_updates_stochastic(params: Any, updates: Any, key: jax.Array) -> Any:
  """params + updates, with bf16 params rounded stochastically (fp32 params: plain addition).

  Each bf16 leaf computes p + u in fp32 and rounds with `stochastic_round_to_bf16` under
  fold_in(key, leaf index), so leaves draw independent bits. Pass a fresh key every step.

  Args:
    params: the params tree.
    updates: the updates from the optimizer (any float dtype; fp32 keeps small steps).
    key: a jax PRNG key for this step.

  Returns:
    The new params, with each leaf's dtype unchanged.
  """
  leaves, treedef = jax.tree.flatten(params)
  update_leaves = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(leaves, update_leaves)):
    if p.dtype == jnp.bfloat16:
      out.append(stochastic_round_to_bf16(p.astype(jnp.float32) + u.astype(jnp.float32),
                                          jax.random.fold_in(key, i)))
    else:
      out.append((p + u.astype(p.dtype)).astype(p.dtype))
  return treedef.unflatten(out)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves together, accumulated in fp32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
