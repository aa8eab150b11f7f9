"""The sampler's sampling options: temperature, top-k, top-p, EOS, stop sequences (all through
`sampler.generate` on a two-layer tiny Gemma 3)."""

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.evaluation import sampler
from tests.sampler_helpers import NO_EOS, SMALL
from tests.sampler_helpers import random_params as _random_params
from tests.sampler_helpers import random_prompts as _prompts

N_SAMPLE = 16


@pytest.fixture(scope='module')
def small():
  config = SMALL
  model, params = _random_params(config, seed=7)
  prompts = _prompts(config, lengths=(4, 9, 17), seed=11)
  greedy = sampler.generate(model, params, prompts, eos_id=NO_EOS,
                            sampling=sampler.SamplingParams(max_new_tokens=N_SAMPLE))
  return model, params, prompts, greedy


def _sample(small, *, eos_id=NO_EOS, seed=0, **kw):
  model, params, prompts, _ = small
  return sampler.generate(model, params, prompts, eos_id=eos_id, seed=seed,
                          sampling=sampler.SamplingParams(max_new_tokens=N_SAMPLE, **kw))


def test_temperature_sampling_is_seeded(small):
  greedy = small[3]
  a = _sample(small, temperature=1.5, seed=0)
  assert _sample(small, temperature=1.5, seed=0) == a
  b = _sample(small, temperature=1.5, seed=1)
  assert b != a
  assert a != greedy and b != greedy
  assert [len(x) for x in a] == [N_SAMPLE] * 3


def test_top_k_1_and_tiny_top_p_are_greedy(small):
  greedy = small[3]
  for seed in (0, 1):
    assert _sample(small, temperature=1.5, top_k=1, seed=seed) == greedy
    assert _sample(small, temperature=1.5, top_p=1e-6, seed=seed) == greedy


def test_filter_logits_exact():
  logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]]))
  inf = -np.inf
  got = np.asarray(sampler._filter_logits(logits, 2, 1.0))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.isfinite(got), [[False, True, False, True]])
  # Sorted probabilities 0.4, 0.3, 0.2, 0.1: top-p 0.65 keeps 0.4 + 0.3 (the smallest prefix
  # reaching 0.65), 0.75 needs the 0.2 as well, and a tiny top-p keeps only the argmax.
  for top_p, keep in ((0.65, [0, 1, 0, 1]), (0.75, [0, 1, 1, 1]), (1e-6, [0, 1, 0, 0])):
    got = np.asarray(sampler._filter_logits(logits, 0, top_p))  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.isfinite(got)[0], np.asarray(keep, bool), err_msg=top_p)
    np.testing.assert_allclose(np.where(np.isfinite(got), got, inf),
                               np.where(keep, np.asarray(logits), inf), err_msg=top_p)


def test_sampled_tokens_respect_top_k_and_top_p(small, recorded_logits):
  temperature, top_k, top_p = 2.0, 5, 0.5
  out = _sample(small, temperature=temperature, top_k=top_k, seed=3)
  steps = np.stack(recorded_logits, axis=1)  # [B, n, V] raw logits.
  for row, logits in zip(out, steps):
    for token, l in zip(row, logits):
      assert (l > l[token]).sum() < top_k
  recorded_logits.clear()
  out = _sample(small, temperature=temperature, top_p=top_p, seed=3)
  steps = np.stack(recorded_logits, axis=1)
  sizes = []
  for row, logits in zip(out, steps):
    for token, l in zip(row, logits):
      probs = np.exp((l - l.max()) / temperature)
      probs /= probs.sum()
      order = np.argsort(-probs)
      nucleus = order[:np.searchsorted(np.cumsum(probs[order]), top_p) + 1]
      assert token in nucleus
      sizes.append(len(nucleus))
  assert max(sizes) > 1  # The nucleus was not trivially the argmax.


def _unique_tail(greedy, width):
  """(row, step) where greedy[row][step-width+1 : step+1] occurs neither earlier in that row nor
  anywhere in the other rows, so it can serve as a stop sequence (or EOS, width 1) for that row
  alone."""
  for r, row in enumerate(greedy):
    for s in range(max(width - 1, 1), len(row) - 1):
      seq = row[s - width + 1:s + 1]
      earlier = [tuple(row[j:j + width]) for j in range(s - width + 1)]
      others = [tuple(o[j:j + width]) for i, o in enumerate(greedy) if i != r
                for j in range(len(o) - width + 1)]
      if tuple(seq) not in earlier + others:
        return r, s
  raise AssertionError(f'no unique {width}-token tail in {greedy}')


def test_eos_stops_one_row_and_is_not_returned(small):
  greedy = small[3]
  r, s = _unique_tail(greedy, 1)
  eos = greedy[r][s]
  out = _sample(small, eos_id=eos)
  assert out[r] == greedy[r][:s]  # Cut before EOS.
  assert eos not in out[r]
  for i in range(len(greedy)):
    if i != r:
      assert out[i] == greedy[i]  # The others go on to max_new_tokens.


def test_eos_as_first_token_gives_empty_completion(small):
  greedy = small[3]
  r = next(i for i, row in enumerate(greedy)
           if all(row[0] not in o for j, o in enumerate(greedy) if j != i))
  out = _sample(small, eos_id=greedy[r][0])
  assert out[r] == []
  assert [o for i, o in enumerate(out) if i != r] == [g for i, g in enumerate(greedy) if i != r]


def test_stop_sequence_ends_a_row_early(small):
  greedy = small[3]
  r, s = _unique_tail(greedy, 2)
  stop = tuple(greedy[r][s - 1:s + 1])
  out = _sample(small, stop_sequences=(stop,))
  assert out[r] == greedy[r][:s + 1]  # The stop tokens are kept; callers cut text at stop strings.
  for i in range(len(greedy)):
    if i != r:
      assert out[i] == greedy[i]


def test_loop_ends_when_every_row_is_done(small, recorded_logits):
  greedy = small[3]
  stops = tuple((row[1], row[2]) for row in greedy)
  out = _sample(small, stop_sequences=stops)
  for row, g in zip(out, greedy):
    # Ends at the first occurrence of any row's stop pair (in practice its own, at step 2).
    ends = [j for j in range(1, len(g)) if (g[j - 1], g[j]) in stops]
    assert row == g[:ends[0] + 1]
  assert len(recorded_logits) == max(len(row) for row in out) < N_SAMPLE


