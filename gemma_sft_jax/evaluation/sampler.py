"""Batched sampling with an explicit KV cache: a jitted prefill, then a `lax.while_loop` decode.

Prompts are left-padded to a bucketed length L (so a whole eval compiles a handful of times, not
once per batch); padding has segment id 0, which the attention mask keeps out. The cache holds
L + max_new_tokens slots. Decoding stops per row at EOS or at a stop sequence (token level, an
early exit only: callers still cut completions at their stop strings in text), and the loop ends
when every row is done.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

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


def _generate(model: model_lib.Transformer, params: Any, tokens: jax.Array, segment_ids: jax.Array,
              rng: jax.Array, *, sampling: SamplingParams, eos_id: int):
  p = sampling
  b, length = tokens.shape
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
  cache = model_lib.init_cache(model.config, b, length + p.max_new_tokens, model.dtype,
                               stacked=model.scan_layers)
  hidden, cache = model.apply({'params': params}, tokens, positions, segment_ids, cache=cache,
                              cache_index=0, return_hidden=True)
  embedding = params['embedder']['embedding']
  head = lambda h: model_lib.output_logits(h, embedding, model.config.final_logit_softcap)
  rng, sub = jax.random.split(rng)
  first = _choose(head(hidden[:, -1]), sub, p)

  out = jnp.zeros((b, p.max_new_tokens), jnp.int32).at[:, 0].set(first)
  lengths = jnp.ones((b,), jnp.int32)
  done = first == eos_id
  for seq in p.stop_sequences:
    done |= _ends_with(out, lengths, seq)
  state = dict(i=jnp.int32(1), token=first, pos=positions[:, -1] + 1, cache=cache, out=out,
               lengths=lengths, done=done, rng=rng)

  def cond(s):
    return (s['i'] < p.max_new_tokens) & ~jnp.all(s['done'])

  def body(s):
    hidden, cache = model.apply({'params': params}, s['token'][:, None], s['pos'][:, None],
                                jnp.ones((b, 1), jnp.int32), cache=s['cache'],
                                cache_index=length + s['i'] - 1, return_hidden=True)
    rng, sub = jax.random.split(s['rng'])
    token = _choose(head(hidden[:, 0]), sub, p)
    token = jnp.where(s['done'], 0, token)
    out = s['out'].at[:, s['i']].set(token)
    lengths = s['lengths'] + (~s['done']).astype(jnp.int32)
    done = s['done'] | (token == eos_id)
    for seq in p.stop_sequences:
      done |= _ends_with(out, lengths, seq)
    return dict(i=s['i'] + 1, token=token, pos=s['pos'] + 1, cache=cache, out=out,
                lengths=lengths, done=done, rng=rng)

  state = jax.lax.while_loop(cond, body, state)
  return state['out'], state['lengths']


class Generator:
  """Completions from one model under fixed sampling settings, batch after batch.

  The prefill and decode loop are jitted once per generator and compiled once per padded batch
  shape, so build one generator for a run of batches (each new generator traces afresh).
  """

  def __init__(self, model: model_lib.Transformer, *, sampling: SamplingParams, eos_id: int):
    """Builds the generator.

    Args:
      model: the Transformer (with LoRA leaves in the params if it has a LoraSpec).
      sampling: greedy when temperature is 0; else temperature / top-k / top-p sampling.
      eos_id: the token that ends a completion.
    """
    self.eos_id = eos_id
    self._run = jax.jit(functools.partial(_generate, model, sampling=sampling, eos_id=eos_id))

  def __call__(self, params: Any, prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
               seed: int = 0, batch_sharding: jax.sharding.Sharding | None = None,
               min_bucket: int = 32) -> list[list[int]]:
    """Generates a completion (token ids, without EOS) for every tokenised prompt.

    Args:
      params: the model's parameters (any sharding).
      prompts: token ids per prompt, BOS included; one batch (callers split large sets).
      pad_id: the id written into left padding.
      seed: sampling seed.
      batch_sharding: where to put the [B, L] prompt arrays (e.g. split over data axes).
      min_bucket: the smallest padded prompt length.

    Returns:
      One list of generated ids per prompt, cut before EOS.
    """
    length = bucket(max(len(x) for x in prompts), min_bucket)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for i, ids in enumerate(prompts):
      tokens[i, length - len(ids):] = ids
      segments[i, length - len(ids):] = 1
    tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
    if batch_sharding is not None:
      tokens, segments = jax.device_put((tokens, segments), batch_sharding)
    out, lengths = self._run(params, tokens, segments, jax.random.key(seed))
    if not out.is_fully_addressable:  # Rows split over several processes: every one gets all.
      out, lengths = multihost_utils.process_allgather((out, lengths), tiled=True)
    return [_cut(row[:n], self.eos_id) for row, n in zip(np.asarray(out), np.asarray(lengths))]


def _cut(row: np.ndarray, eos_id: int) -> list[int]:
  ids = [int(t) for t in row]
  return ids[:-1] if ids and ids[-1] == eos_id else ids


def generate(model: model_lib.Transformer, params: Any, prompts: Sequence[Sequence[int]], *,
             sampling: SamplingParams, eos_id: int, **kwargs) -> list[list[int]]:
  """One batch's completions through a new `Generator` (compiled for this call only).

  Args:
    model: the Transformer (with LoRA leaves in `params` if it has a LoraSpec).
    params: its parameters (any sharding).
    prompts: token ids per prompt, BOS included.
    sampling: greedy when temperature is 0; else temperature / top-k / top-p sampling.
    eos_id: the token that ends a completion.
    **kwargs: `Generator.__call__`'s pad_id, seed, batch_sharding and min_bucket.

  Returns:
    One list of generated ids per prompt, cut before EOS.
  """
  return Generator(model, sampling=sampling, eos_id=eos_id)(params, prompts, **kwargs)
