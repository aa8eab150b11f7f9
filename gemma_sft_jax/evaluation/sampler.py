"""Batched sampling with an explicit KV cache: jitted prefills and a `lax.while_loop` decode.

A `Generator` decodes a fixed number of slots and keeps them busy: a slot whose completion ended
(EOS, a stop sequence or the token budget) is handed the next prompt, prefilled into that slot
alone, while the others keep decoding. Prompts are left-padded to one bucketed length (so a whole
evaluation compiles a prefill and a decode program once); padding has segment id 0, which the
attention mask keeps out. A token prefix all prompts share (a few-shot prompt's exemplars) is
prefilled once into a one-row cache that every slot's attention reads (`shared`: its keys are
read once per step, not once per slot). Each slot's own cache holds prompt bucket +
max_new_tokens slots, except that sliding-window layers keep a ring of window size when that is
shorter. Stop sequences are an early exit only: callers still cut completions at their stop
strings in text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import kv_cache
from gemma_sft_jax.model import transformer as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = no top-k filter
  top_p: float = 1.0
  stop_sequences: tuple[tuple[int, ...], ...] = ()


def bucket(length: int, minimum: int = 32, step: int = 128) -> int:
  """Rounds a prompt length up to bound recompilation: powers of two up to `step`, then
  multiples of `step` (an 8-shot GSM8K prompt of ~1,400 tokens pads to 1,408, not 2,048)."""
  length = max(length, 1)
  if length <= step:
    return max(minimum, 1 << (length - 1).bit_length())
  return -(-length // step) * step


def _filter_logits(logits, top_k: int, top_p: float):
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _choose(logits, rng, p: SamplingParams):
  if p.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _filter_logits(logits / p.temperature, p.top_k, p.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _ends_with(out, length, seq):
  """[B] bool: do the `length` tokens generated so far end with `seq`?"""
  n = len(seq)
  idx = length[:, None] - n + jnp.arange(n)[None, :]
  tail = jnp.take_along_axis(out, jnp.clip(idx, 0, out.shape[1] - 1), axis=1)
  return (length >= n) & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None, :], axis=1)


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
  """Length of the token prefix every prompt shares, leaving each at least one token of its own
  (a few-shot evaluation's exemplars, prefilled once instead of once per question)."""
  first, n = prompts[0], min(len(p) for p in prompts) - 1
  for p in prompts[1:]:
    n = next((i for i in range(n) if p[i] != first[i]), n)
  return max(n, 0)


def _rows_axis(model: model_lib.Transformer) -> int:
  return 1 if model.scan_layers else 0  # Stacked caches lead with the layer axis.


def _prefill(model, params, tokens, segments, cache, start, shared=None):
  """Runs `tokens` [R, T] (left-padded, segment 0 = padding) into `cache`, their positions
  counted from `start` (after the `shared` prefix cache, if any): (last hidden state [R, D],
  new cache)."""
  positions = jnp.maximum(start + jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
  hidden, cache = model.apply({'params': params}, tokens, positions, segments, cache=cache,
                              return_hidden=True, shared=shared)
  return hidden[:, -1], cache


def _head(model, params, hidden):
  return model_lib.output_logits(hidden, params['embedder']['embedding'],
                                 model.config.final_logit_softcap)


def _prefix_cache(model, params, tokens):
  """The shared prefix [1, P] prefilled into a one-row cache of P slots."""
  cache = kv_cache.init_cache(model.config, 1, tokens.shape[1], model.dtype,
                               stacked=model.scan_layers)
  return _prefill(model, params, tokens, jnp.ones_like(tokens), cache, 0)[1]


def _stopped(out, lengths, token, p: SamplingParams, eos_id: int):
  done = (token == eos_id) | (lengths >= p.max_new_tokens)
  for seq in p.stop_sequences:
    done |= _ends_with(out, lengths, seq)
  return done


def _admit(model, params, state, prefix, tokens, segments, rows, rng, *, sampling, eos_id,
           prefix_len: int, ring: bool):
  """Prefills prompts (or their suffixes after the shared prefix) [R, T] into decode slots `rows`
  [R] (index B = a padding row, dropped) and chooses each one's first token."""
  p = sampling
  r, t = tokens.shape
  cache = kv_cache.init_cache(model.config, r, state['out'].shape[1] + t, model.dtype,
                               stacked=model.scan_layers, ring=ring)
  hidden, cache = _prefill(model, params, tokens, segments, cache, prefix_len, shared=prefix)
  first = _choose(_head(model, params, hidden), rng, p)
  out = jnp.zeros((r, p.max_new_tokens), jnp.int32).at[:, 0].set(first)
  lengths = jnp.ones((r,), jnp.int32)
  positions = prefix_len + jnp.sum(segments, axis=1)
  new = dict(token=first, pos=positions.astype(jnp.int32), out=out, lengths=lengths,
             done=_stopped(out, lengths, first, p, eos_id))
  put = lambda big, small, axis=0: big.at[(slice(None),) * axis + (rows,)].set(small, mode='drop')
  state = dict(state, **{k: put(state[k], v) for k, v in new.items()})
  state['cache'] = jax.tree.map(functools.partial(put, axis=_rows_axis(model)), state['cache'],
                                cache)
  return state


def _decode(model, params, state, prefix, live, want, rng, *, sampling, eos_id):
  """Decodes every slot one token at a time until `want` live slots are done (or all are);
  `prefix` is the shared prefix cache (or None)."""
  p = sampling
  b = live.shape[0]

  def cond(s):
    finished = jnp.sum(s['done'] & live)
    return (finished < want) & jnp.any(live & ~s['done'])

  def body(s):
    hidden, cache = model.apply({'params': params}, s['token'][:, None], s['pos'][:, None],
                                jnp.ones((b, 1), jnp.int32), cache=s['cache'],
                                return_hidden=True, shared=prefix)
    rng, sub = jax.random.split(s['rng'])
    token = _choose(_head(model, params, hidden[:, 0]), sub, p)
    going = ~s['done']
    token = jnp.where(going, token, 0)
    out = s['out'].at[jnp.arange(b), s['lengths']].set(token, mode='drop')
    step = going.astype(jnp.int32)
    lengths = s['lengths'] + step
    return dict(token=token, pos=s['pos'] + step, cache=cache, out=out, lengths=lengths,
                done=s['done'] | _stopped(out, lengths, token, p, eos_id), rng=rng)

  state = jax.lax.while_loop(cond, body, dict(state, rng=rng))
  del state['rng']
  return state


def _empty_state(model, *, slots: int, length: int, ring: bool, max_new_tokens: int):
  return dict(token=jnp.zeros((slots,), jnp.int32), pos=jnp.zeros((slots,), jnp.int32),
              out=jnp.zeros((slots, max_new_tokens), jnp.int32),
              lengths=jnp.zeros((slots,), jnp.int32), done=jnp.ones((slots,), bool),
              cache=kv_cache.init_cache(model.config, slots, length, model.dtype,
                                         stacked=model.scan_layers, ring=ring))


def _host(x):
  if not x.is_fully_addressable:  # Rows split over several processes: every one gets all.
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


class Generator:
  """Completions from one model under fixed sampling settings.

  The decode batch is a set of slots kept full: when a quarter of them have finished, their
  completions are collected and the next prompts are prefilled into them (a quarter of the slots,
  or 16, at a time), so no slot decodes for a row that is already done while prompts wait.
  Prompts that share a token prefix (few-shot exemplars) prefill it once, into one cache that
  every slot reads. When a slot's cache must outgrow the sliding window, sliding-window
  layers keep a ring of window size (the layers are then run unrolled, as their caches differ in
  length). Prefill and decode are jitted once per generator and compiled once per shape, so
  build one generator for a run of calls (each new generator traces afresh).
  """

  def __init__(self, model: model_lib.Transformer, *, sampling: SamplingParams, eos_id: int,
               unroll: bool = True):
    """Builds the generator.

    Args:
      model: the Transformer (with LoRA leaves in the params if it has a LoraSpec).
      sampling: greedy when temperature is 0; else temperature / top-k / top-p sampling.
      eos_id: the token that ends a completion.
      unroll: decode a scanned model's layers unrolled, each with a cache of its own (its
        parameters are unstacked per call: one more copy of the layer weights on device). On a
        GPU a scanned decode step, which reads its layer's slice of the stacked cache, took
        twice as long (BENCHMARKS.md, "Evaluation speed"); False saves the memory.
    """
    self.model, self.sampling, self.eos_id = model, sampling, eos_id
    self.unroll = unroll
    self._jitted: dict[Any, Any] = {}

  def _programs(self, ring: bool):
    """(model, jitted prefix / admit / decode / empty state) for ring or full caches."""
    if ring not in self._jitted:
      model = self.model.clone(scan_layers=False) if ring or self.unroll else self.model
      kw = dict(sampling=self.sampling, eos_id=self.eos_id)
      self._jitted[ring] = (
          model,
          jax.jit(functools.partial(_prefix_cache, model)),
          jax.jit(functools.partial(_admit, model, ring=ring, **kw),
                  static_argnames='prefix_len', donate_argnames='state'),
          jax.jit(functools.partial(_decode, model, **kw), donate_argnames='state'),
          jax.jit(functools.partial(_empty_state, model, ring=ring,
                                    max_new_tokens=self.sampling.max_new_tokens),
                  static_argnames=('slots', 'length')))
    return self._jitted[ring]

  def __call__(self, params: Any, prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
               seed: int = 0, batch_sharding: jax.sharding.Sharding | None = None,
               min_bucket: int = 32, batch_size: int | None = None,
               on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generates a completion (token ids, without EOS) for every tokenised prompt.

    Args:
      params: the model's parameters (any sharding).
      prompts: token ids per prompt, BOS included.
      pad_id: the id written into left padding.
      seed: sampling seed.
      batch_sharding: where to put [slots, ...] arrays (e.g. split over data axes).
      min_bucket: the smallest padded prompt length.
      batch_size: decode slots (default and at most: one per prompt).
      on_done: called with the number of prompts just completed, for progress output.

    Returns:
      One list of generated ids per prompt, in prompt order, cut before EOS.
    """
    p, c = self.sampling, self.model.config
    n = len(prompts)
    if not n:
      return []
    slots = min(batch_size or n, n)  # No slot for a prompt that is not there.
    shared = common_prefix(prompts) if n > 1 else 0
    shared = shared if shared >= min_bucket else 0
    t = bucket(max(len(x) for x in prompts) - shared, min_bucket)
    length = t + p.max_new_tokens  # Each slot's own cache; the shared prefix is held once.
    ring = bool(c.sliding_window and architecture.SLIDING in c.layer_types
                and length > c.sliding_window)
    model, prefix_fn, admit, decode, empty = self._programs(ring)
    if self.model.scan_layers and not model.scan_layers:
      params = model_lib.unstack_layers(params, c.num_layers)
    # Back to the host once a quarter of the slots have finished; prompts are prefilled up to
    # `admit` at a time (a quarter of the slots, or all of a small batch): each prefill holds a
    # full-length cache for its rows until they join the batch, so not all slots at once.
    refill = max(1, slots // 4)
    admit_rows = min(slots, max(16, slots // 4))

    put = functools.partial(_shard, batch_sharding)
    prefix = None
    if shared:
      prefix = prefix_fn(params, jnp.asarray([prompts[0][:shared]], jnp.int32))
    state = empty(slots=slots, length=length)
    if batch_sharding is not None and slots % _shards(batch_sharding) == 0:
      state = jax.device_put(state, _state_sharding(state, batch_sharding, model))
    rng = jax.random.key(seed)
    live = np.zeros((slots,), bool)
    owner = np.full((slots,), -1)
    results: list[list[int]] = [[] for _ in range(n)]
    queue = list(range(n))

    def admit_into(free: list[int], rows_per_call: int):
      nonlocal state, rng
      for i in range(0, len(free), rows_per_call):
        rows = free[i:i + rows_per_call]
        take, queue[:] = queue[:len(rows)], queue[len(rows):]
        rows = rows[:len(take)]
        tokens = np.full((rows_per_call, t), pad_id, np.int32)
        segments = np.zeros((rows_per_call, t), np.int32)
        for j, k in enumerate(take):
          ids = prompts[k][shared:]
          tokens[j, t - len(ids):] = ids
          segments[j, t - len(ids):] = 1
        index = np.full((rows_per_call,), slots, np.int32)  # Padding rows: dropped.
        index[:len(rows)] = rows
        rng, sub = jax.random.split(rng)
        state = admit(params, state, prefix, *put(tokens, segments), jnp.asarray(index), sub,
                      prefix_len=shared)
        live[rows], owner[rows] = True, take
        if not queue:
          return

    admit_into(list(range(slots)), admit_rows)
    while live.any():
      want = min(refill, int(live.sum())) if queue else int(live.sum())
      rng, sub = jax.random.split(rng)
      state = decode(params, state, prefix, jnp.asarray(live), jnp.int32(want), sub)
      finished = np.flatnonzero(_host(state['done']) & live)
      if not len(finished):
        continue
      lengths, out = _host(state['lengths']), _host(state['out'])
      for r in finished:
        results[owner[r]] = _cut(out[r, :lengths[r]], self.eos_id)
      live[finished], owner[finished] = False, -1
      if on_done is not None:
        on_done(len(finished))
      if queue:
        admit_into([int(r) for r in np.flatnonzero(~live)], admit_rows)
    return results


def _shard(sharding, *arrays):
  arrays = tuple(jnp.asarray(a) for a in arrays)
  if sharding is None or any(a.shape[0] % _shards(sharding) for a in arrays):
    return arrays
  return jax.device_put(arrays, sharding)


def _shards(sharding) -> int:
  spec = getattr(sharding, 'spec', None)
  if not spec or spec[0] is None:
    return 1
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return int(np.prod([sharding.mesh.shape[a] for a in names]))


def _state_sharding(state, batch_sharding, model):
  """Shards every decode-state array over its slot axis the way `batch_sharding` splits rows."""
  if not isinstance(batch_sharding, jax.sharding.NamedSharding):
    return jax.tree.map(lambda _: batch_sharding, state)
  rows = batch_sharding.spec[0] if batch_sharding.spec else None
  spec = lambda axis: jax.sharding.NamedSharding(
      batch_sharding.mesh, jax.sharding.PartitionSpec(*(None,) * axis, rows))
  out = {k: spec(0) for k in state if k != 'cache'}
  out['cache'] = jax.tree.map(lambda _: spec(_rows_axis(model)), state['cache'])
  return out


def _cut(row: np.ndarray, eos_id: int) -> list[int]:
  ids = [int(t) for t in row]
  return ids[:-1] if ids and ids[-1] == eos_id else ids


def generate(model: model_lib.Transformer, params: Any, prompts: Sequence[Sequence[int]], *,
             sampling: SamplingParams, eos_id: int, **kwargs) -> list[list[int]]:
  """Completions through a new `Generator` (compiled for this call only).

  Args:
    model: the Transformer (with LoRA leaves in `params` if it has a LoraSpec).
    params: its parameters (any sharding).
    prompts: token ids per prompt, BOS included.
    sampling: greedy when temperature is 0; else temperature / top-k / top-p sampling.
    eos_id: the token that ends a completion.
    **kwargs: `Generator.__call__`'s pad_id, seed, batch_sharding, min_bucket, batch_size and
      on_done.

  Returns:
    One list of generated ids per prompt, cut before EOS.
  """
  return Generator(model, sampling=sampling, eos_id=eos_id)(params, prompts, **kwargs)
