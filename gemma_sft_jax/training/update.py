"""The training update: `optimizer.make_optimizer`'s chain applied fused, block by block.

Going through the optax chain would materialise whole-tree fp32 intermediates (dequantised
moments, the fp32 update, random bits): for Gemma 2 9B with stacked layers the compiled step
asked for 150 GiB of temporaries. `make_update` applies clip -> Adam -> decay -> LR -> write per
leaf, and a leaf with 8-bit moments in blocks of at most `CHUNK_ELEMENTS` along its first axis,
rewriting params and moments in place (docs/optimizer.md). On GPUs, leaves with 8-bit moments
take one Pallas kernel each instead, per device shard (`adam_kernel`, `kernel_plan`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from gemma_sft_jax.training import adam_kernel
from gemma_sft_jax.training import optimizer
from gemma_sft_jax.training import rounding
from gemma_sft_jax.training.quantization import BLOCK_SIZE, QuantizedArray

# Largest block (elements) of a leaf updated in blocks: 256 MiB per fp32 temporary.
CHUNK_ELEMENTS = 1 << 26
# A leaf whose new values (4 bytes per element of its shard) fit in this fraction of a device's
# memory is updated whole: one elementwise fusion, ~1.4x faster than the blocked loop, whose
# in-place writes XLA splits into a fusion per output (benchmarks/update_speed.py).
WHOLE_LEAF_MEMORY_FRACTION = 0.02
# Leaves of at least this many elements get an update kernel each, in order (see `make_update`).
ORDERED_LEAF_ELEMENTS = 1 << 20


def chunk_plan(params: Any, *, whole_leaf_bytes: int | None = None) -> Any:
  """How many blocks each leaf's update runs in, along its first axis (1 = the whole leaf).

  Used for leaves with 8-bit moments. A leaf (rank >= 2) whose shard needs more than
  `whole_leaf_bytes` at 4 bytes per element is split into the fewest equal blocks along axis 0
  that are each at most `CHUNK_ELEMENTS` (for stacked layers: a few layers at a time; for the
  embedding: groups of vocabulary rows). A leaf whose axis 0 is sharded is not split (a dynamic
  slice of a sharded axis would gather it). The random bits of stochastic rounding depend on
  element indices only, so the plan does not change the result.

  Args:
    params: the trainable tree, as arrays (their shardings are read) or ShapeDtypeStructs.
    whole_leaf_bytes: default `WHOLE_LEAF_MEMORY_FRACTION` of this process's first device's memory
      (4 * CHUNK_ELEMENTS where the device does not report it, as on CPUs).

  Returns:
    A tree like params of ints.
  """
  if whole_leaf_bytes is None:
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get('bytes_limit')
    whole_leaf_bytes = int(limit * WHOLE_LEAF_MEMORY_FRACTION) if limit else 4 * CHUNK_ELEMENTS

  def blocks(x):
    size, lead = math.prod(x.shape), x.shape[0] if x.ndim else 1
    sharding = getattr(x, 'sharding', None)
    shard = math.prod(sharding.shard_shape(x.shape)) if sharding is not None else size
    if x.ndim < 2 or 4 * shard <= whole_leaf_bytes:
      return 1
    if isinstance(sharding, NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
      return 1
    need = -(-size // CHUNK_ELEMENTS)
    return next((n for n in range(need, lead + 1) if lead % n == 0), lead)
  return jax.tree.map(blocks, params)


UPDATE_KERNELS = ('auto', 'xla')


def kernel_plan(params: Any, mode: str = 'auto', *, platforms: tuple[str, ...] = ('gpu',)) -> Any:
  """Where each leaf's 8-bit update may run as `adam_kernel`'s Pallas kernel.

  With mode 'auto', a leaf on devices of `platforms` gets its sharding (on one device the kernel
  runs on the whole leaf, on a mesh on each device's shard); anything else, and every leaf with
  mode 'xla', gets None (XLA's update). Whether a leaf's moments are 8-bit and its shards' last
  axis whole 256-blocks is decided by the update (`adam_kernel.applicable`); leaves the kernel
  takes ignore `chunk_plan`.

  Args:
    params: the trainable tree, as arrays (their shardings are read).
    mode: 'auto' | 'xla' (config optim.update_kernel).
    platforms: the device platforms the kernel runs on ('cpu' only for tests, interpreted).

  Returns:
    A tree like params of jax.sharding.Sharding or None.
  """
  if mode not in UPDATE_KERNELS:
    raise ValueError(f'optim.update_kernel: {mode!r} is not one of {UPDATE_KERNELS}')

  def pick(x):
    sharding = getattr(x, 'sharding', None)
    if mode != 'auto' or sharding is None:
      return None
    devices = sharding.device_set
    if not all(d.platform in platforms for d in devices):
      return None
    if len(devices) > 1 and not isinstance(sharding, NamedSharding):
      return None
    return sharding
  return jax.tree.map(pick, params)


def make_update(*, schedule: optax.Schedule, weight_decay: float, clip_norm: float | None,
                decay_mask: Any, chunks: Any, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, block_size: int = BLOCK_SIZE,
                stochastic_rounding: bool = True, two_pass: bool = True, kernels: Any = None,
                interpret_kernels: bool = False) -> Any:
  """The training update with the semantics of `make_optimizer`'s chain, fused per block.

  For each leaf (or block of `chunks` along axis 0, in place, one after another): the gradient
  sum is divided by the token count and clipped, Adam's moments are loaded, updated and stored
  back (`adam_leaf`), decoupled weight decay and the LR are applied, and the new weights are
  written, rounded stochastically when they are bf16 and `stochastic_rounding` is on (so are
  bf16 moments). No whole-tree fp32 temporaries exist; gradients may be bf16. Leaves of
  `ORDERED_LEAF_ELEMENTS` or more are updated in tree order, each after the one before (an
  optimization barrier between them), so that each gets kernels of its own.

  Args:
    schedule: LR schedule (from `make_schedule`); update k uses schedule(k).
    weight_decay: decoupled decay coefficient (times the LR).
    clip_norm: max global gradient norm; None or 0 disables clipping.
    decay_mask: a bool tree like params (`default_decay_mask`).
    chunks: an int tree like params (`chunk_plan`).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    block_size: the 8-bit absmax block (as the state was made with).
    stochastic_rounding: round bf16 params and bf16 moments stochastically (else to nearest).
    two_pass: for 8-bit moments, compute their block absmax in a reduction pass of its own and
      recompute the moments in the elementwise pass that requantises them and writes the params
      (False: one pass, which materialises the fp32 moments; kept for `benchmarks/update_speed.py`).
    kernels: a tree like params of shardings or None (`kernel_plan`): leaves whose 8-bit update
      runs as one Pallas kernel (`adam_kernel`), on the whole leaf or on each shard. None: all
      in XLA.
    interpret_kernels: run those kernels in the Pallas interpreter (tests on CPU).

  Returns:
    update(params, grad_sums, opt_state, *, divisor, seed) -> (params, opt_state, grad_norm):
    `opt_state` is `make_optimizer(...)[0].init(params)`'s structure (so checkpoints and
    `state_shardings` are shared with the chain), `divisor` the number of supervised tokens the
    gradient sums are over, `seed` a uint32 scalar for this step's rounding bits, and
    `grad_norm` the global norm of grad_sums / divisor before clipping.
  """

  def update(params, grad_sums, opt_state, *, divisor, seed):
    adam_index = _state_index(opt_state, optimizer.ScaleByAdam8bitState)
    sched_index = _state_index(opt_state, optax.ScaleByScheduleState)
    adam, sched = opt_state[adam_index], opt_state[sched_index]
    count = adam.count + 1
    bc = optimizer.bias_corrections(b1, b2, count)
    lr = jnp.asarray(schedule(sched.count), jnp.float32)
    per_token = 1.0 / jnp.asarray(divisor, jnp.float32)
    leaves, treedef = jax.tree.flatten(params)
    grads, mus, nus, decays, plan = (
        treedef.flatten_up_to(t) for t in (grad_sums, adam.mu, adam.nu, decay_mask, chunks))
    fused = (treedef.flatten_up_to(kernels) if kernels is not None
             else [None] * len(leaves))

    def sum_squares(g, n):
      # The divided gradients' squared norm, block by block for split leaves. The barrier keeps
      # XLA from hoisting the fp32 conversion of the whole leaf out of the loop.
      sq = lambda x: jnp.sum(jnp.square(x.astype(jnp.float32) * per_token))  # noqa: E731
      if n == 1:
        return sq(g)
      rows = g.shape[0] // n
      return jax.lax.fori_loop(0, n, lambda i, c: (
          c[0], c[1] + sq(_barrier(jax.lax.dynamic_slice_in_dim(c[0], i * rows, rows)))),
          (g, jnp.zeros((), jnp.float32)))[1]

    norm = jnp.sqrt(sum(sum_squares(g, n) for g, n in zip(grads, plan)))
    # Gradient sums -> clipped mean gradients (as optax.clip_by_global_norm) with one scalar, so
    # each element costs a multiplication rather than two divisions and a select.
    grad_scale = per_token
    if clip_norm:
      grad_scale = jnp.where(norm < clip_norm, per_token, per_token * (clip_norm / norm))

    def block(p, g, mu, nu, decay, seed_leaf, offset):
      def prepare(g):
        return g.astype(jnp.float32) * grad_scale
      absmax = None
      if two_pass and (isinstance(mu, QuantizedArray) or isinstance(nu, QuantizedArray)):
        # Pass 1 reduces the new moments to their block absmax; pass 2 (after the barrier, so
        # XLA cannot merge the two) recomputes them and requantises elementwise. One pass would
        # write both moments out in fp32 between the reduction and its consumers.
        absmax = optimizer.moment_absmax(prepare(g), mu, nu, b1=b1, b2=b2,
                                         block_size=block_size)
        g, mu, nu, absmax = _barrier((g, mu, nu, absmax))
      # bf16 params and bf16 moments are rounded stochastically, each with its own bits of the
      # element's hash (a param's are `random_bits16`'s, with or without bf16 moments).
      bf16_moments = any(getattr(x, 'dtype', None) == jnp.bfloat16 for x in (mu, nu))
      bits = None
      if stochastic_rounding and (p.dtype == jnp.bfloat16 or bf16_moments):
        bits = rounding.random_bits16x3(rounding.element_index(p.shape, offset), seed_leaf)
      u, mu, nu = optimizer.adam_leaf(prepare(g), mu, nu, b1=b1, b2=b2, eps=eps, bc=bc,
                                      block_size=block_size, absmax=absmax,
                                      bits16=bits[1:] if bits and bf16_moments else None)
      new = optimizer.apply_direction(p.astype(jnp.float32), u, lr=lr,
                                      weight_decay=weight_decay if decay else 0.0)
      if bits and p.dtype == jnp.bfloat16:
        new = rounding.stochastic_round_to_bf16(new, bits[0])
      return new.astype(p.dtype), mu, nu

    def leaf(index, p, g, mu, nu, decay, n, kernel):
      seed_leaf = rounding.fold_seed(seed, index)
      if kernel is not None and adam_kernel.applicable(
          kernel.shard_shape(tuple(p.shape)), mu, nu, block_size=block_size):
        args = dict(grad_scale=grad_scale, lr=lr, bc=bc, seed=seed_leaf, b1=b1, b2=b2, eps=eps,
                    weight_decay=weight_decay if decay else 0.0,
                    stochastic_rounding=stochastic_rounding, interpret=interpret_kernels)
        if len(kernel.device_set) == 1:
          return adam_kernel.update_leaf(p, g, mu, nu, **args)
        return adam_kernel.update_shards(p, g, mu, nu, sharding=kernel, **args)
      # Only 8-bit moments need blocks: their absmax reductions split the update into several
      # XLA fusions with whole-leaf fp32 intermediates. With bf16/fp32 moments the whole-leaf
      # update is one elementwise fusion without temporaries (a loop would only add copies).
      if n == 1 or not isinstance(mu, QuantizedArray):
        return block(p, g, mu, nu, decay, seed_leaf, 0)
      rows = p.shape[0] // n
      row_elements = math.prod(p.shape[1:])

      def body(i, carry):
        p, g, mu, nu = carry
        start = i * rows
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, rows)  # noqa: E731
        put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)  # noqa: E731
        offset = start.astype(jnp.uint32) * jnp.uint32(row_elements % (1 << 32))
        # The barrier makes the block's new values one fusion with several outputs, written
        # into the leaves after it; fused into the in-place writes, XLA would make one fusion per
        # output, each recomputing the whole update.
        new_p, new_mu, new_nu = _barrier(block(take(p), _barrier(take(g)), jax.tree.map(take, mu),
                                               jax.tree.map(take, nu), decay, seed_leaf, offset))
        return put(p, new_p), g, jax.tree.map(put, mu, new_mu), jax.tree.map(put, nu, new_nu)

      p, _, mu, nu = jax.lax.fori_loop(0, n, body, (p, g, mu, nu))
      return p, mu, nu

    # Leaves of ORDERED_LEAF_ELEMENTS or more are updated one after another: each one's inputs
    # pass a barrier with the previous one's new param, so XLA cannot merge same-shaped leaves'
    # updates into one multi-output kernel (it did so for up to 11 unrolled layers' leaves,
    # at about half the bandwidth of one leaf per kernel). Smaller leaves stay free to merge.
    out, previous = [], None
    for i, (p, g, mu, nu, decay, n, kernel) in enumerate(
        zip(leaves, grads, mus, nus, decays, plan, fused)):
      ordered = math.prod(p.shape) >= ORDERED_LEAF_ELEMENTS
      if ordered and previous is not None:
        (p, g, mu, nu), _ = _barrier(((p, g, mu, nu), previous))
      out.append(leaf(i, p, g, mu, nu, decay, n, kernel))
      if ordered:
        previous = out[-1][0]
    new_params = treedef.unflatten([o[0] for o in out])
    new_adam = optimizer.ScaleByAdam8bitState(
        count=count, mu=treedef.unflatten([o[1] for o in out]),
        nu=treedef.unflatten([o[2] for o in out]))
    new_state = list(opt_state)
    new_state[adam_index] = new_adam
    new_state[sched_index] = optax.ScaleByScheduleState(
        count=optax.safe_int32_increment(sched.count))
    return new_params, type(opt_state)(new_state), norm

  return update


def _barrier(x: jax.Array) -> jax.Array:
  return jax.lax.optimization_barrier(x)


def _state_index(opt_state: tuple, kind: type) -> int:
  found = [i for i, s in enumerate(opt_state) if isinstance(s, kind)]
  if len(found) != 1:
    raise ValueError(f'make_update: expected one {kind.__name__} in the optimizer state '
                     f'(make_optimizer\'s chain), found {len(found)}')
  return found[0]
