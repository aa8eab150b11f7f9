"""The KV-cache sampler: cached decode == full forward, refilled slots and shared prefixes ==
one prompt at a time, greedy == transformers' generate (tiny and the real Gemma 3 270M), rows
split over two processes.

test_model.py checks the cache one model call at a time; here everything goes through
`sampler.generate` (bucketed left padding, prefill, the while_loop), and the logits it chose from
are recorded with an ordered debug callback around `sampler._choose` (conftest.py's
`recorded_logits`). The sampling options are in test_sampling.py.
"""

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_sft_jax.evaluation import evaluator as evaluate
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import kv_cache
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import write_hf_checkpoint, xla_flags

from tests.sampler_helpers import BOS, LENGTHS, NO_EOS, SMALL
from tests.sampler_helpers import random_params as _random_params
from tests.sampler_helpers import random_prompts as _prompts




def test_a_generator_traces_once_for_batches_of_one_shape(monkeypatch):
  """The decode program is kept on the Generator: a second batch of the same padded shape reuses
  it, and another Generator traces its own."""
  traces = []
  choose = sampler._choose  # pylint: disable=protected-access

  def counting(logits, rng, p):
    traces.append(logits.shape)  # Runs while tracing only.
    return choose(logits, rng, p)

  monkeypatch.setattr(sampler, '_choose', counting)
  model, params = _random_params(architecture.VARIANTS['tiny_gemma2'], seed=0)
  sampling = sampler.SamplingParams(max_new_tokens=3)
  generate = sampler.Generator(model, sampling=sampling, eos_id=NO_EOS)
  first = generate(params, _prompts(model.config, (3, 9), seed=1))
  traced = len(traces)
  assert traced > 0
  second = generate(params, _prompts(model.config, (5, 7), seed=2))
  assert len(traces) == traced and len(first) == len(second) == 2
  sampler.Generator(model, sampling=sampling, eos_id=NO_EOS)(
      params, _prompts(model.config, (3, 9), seed=1))
  assert len(traces) == 2 * traced


def _full_forward_logits(model, params, prompts, generated):
  """No cache, no left padding: per row, the logits predicting each generated token [n, V].

  Rows are right-padded into one batch; causality keeps the padding out of earlier positions.
  """
  rows = [p + g for p, g in zip(prompts, generated)]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  logits = np.asarray(model.apply({'params': params}, jnp.asarray(tokens))[0])
  return [logits[i, len(p) - 1:len(p) - 1 + len(g)] for i, (p, g) in enumerate(zip(prompts,
                                                                                    generated))]


# ---- 1. Cached decode == full forward. ------------------------------------------------------------

@pytest.mark.parametrize('name', ['tiny_gemma2', 'tiny_gemma3'])
def test_cached_decode_equals_full_forward(name, recorded_logits):
  config = architecture.VARIANTS[name]
  assert config.sliding_window == 7 < max(LENGTHS)
  model, params = _random_params(config, seed=0)
  prompts = _prompts(config)
  n = 12
  out = sampler.generate(model, params, prompts, eos_id=NO_EOS,
                         sampling=sampler.SamplingParams(max_new_tokens=n))
  assert [len(x) for x in out] == [n] * len(prompts)
  assert len(recorded_logits) == n  # The prefill's choice plus n - 1 loop steps.
  steps = np.stack(recorded_logits, axis=1)  # [B, n, V]
  full = _full_forward_logits(model, params, prompts, out)
  for i, (prompt, generated, want) in enumerate(zip(prompts, out, full)):
    np.testing.assert_array_equal(want.argmax(-1), generated, err_msg=f'row {i}')
    chosen = np.take_along_axis(steps[i], np.asarray(generated)[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(chosen, want[np.arange(n), generated], atol=1e-4, rtol=0)
    diff = np.abs(steps[i] - want).max()
    pad = sampler.bucket(max(LENGTHS)) - len(prompt)
    print(f'{name} row {i} (prompt {len(prompt)} tokens, left pad {pad}): '
          f'cached vs full logits max abs diff {diff:.1e}')
    assert diff <= 1e-4  # Every logit, not only the chosen one.
  assert len({t for row in out for t in row}) > 3  # A degenerate model would prove little.


def test_common_prefix():
  assert sampler.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
  # Every prompt keeps at least its last token (it gives the first logits).
  assert sampler.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
  assert sampler.common_prefix([[1], [1, 2]]) == 0
  assert sampler.common_prefix([[5, 1], [4, 1]]) == 0


def _one_at_a_time(model, params, prompts, sampling, eos_id):
  generate = sampler.Generator(model, sampling=sampling, eos_id=eos_id)
  return [generate(params, [p])[0] for p in prompts]


@pytest.mark.parametrize('shared', [0, 40])
def test_refilled_slots_match_one_prompt_at_a_time(shared):
  """Seven prompts through 2 decode slots (finished slots take the next prompt; with `shared`
  tokens in common the prefix is prefilled once) give the same greedy completions as each
  prompt alone. EOS is a token the model emits, so completions end at different steps. The tiny
  Gemma 3 has a 7-token sliding window, so its local layers decode through ring caches."""
  config = architecture.VARIANTS['tiny_gemma3']
  model, params = _random_params(config, seed=3)
  rng = np.random.default_rng(5)
  prefix = [BOS] + rng.integers(3, config.vocab_size, size=shared).tolist()
  prompts = [prefix + rng.integers(3, config.vocab_size, size=n).tolist()
             for n in (2, 11, 5, 19, 1, 8, 14)]
  assert (sampler.common_prefix(prompts) >= 32) == bool(shared)
  sampling = sampler.SamplingParams(max_new_tokens=10)
  free = _one_at_a_time(model, params, prompts, sampling, NO_EOS)
  # EOS and two one-token stop sequences: the emitted tokens that end the completions at the most
  # different steps (tiny random models repeat themselves, so one token would end most alike).
  first = lambda v: [row.index(v) if v in row else 10 for row in free]
  ends = lambda vs: len(set(map(min, zip(*map(first, vs)))))
  eos, *stops = max(itertools.combinations(sorted({v for row in free for v in row}), 3), key=ends)
  sampling = dataclasses.replace(sampling, stop_sequences=tuple((v,) for v in stops))
  want = _one_at_a_time(model, params, prompts, sampling, eos)
  assert len({len(w) for w in want}) > 2, want
  finished = []
  got = sampler.Generator(model, sampling=sampling, eos_id=eos)(
      params, prompts, batch_size=2, on_done=finished.append)
  assert got == want
  assert sum(finished) == len(prompts) and len(finished) > 2


def test_no_more_slots_than_prompts(monkeypatch):
  """One prompt with batch_size=32 decodes in one slot, not 32 (decode's default batch size)."""
  batches = []
  init = kv_cache.init_cache

  def recording(config, batch, length, dtype=jnp.bfloat16, **kw):
    batches.append(batch)
    return init(config, batch, length, dtype, **kw)

  monkeypatch.setattr(kv_cache, 'init_cache', recording)
  model, params = _random_params(architecture.VARIANTS['tiny_gemma2'], seed=0)
  sampler.Generator(model, sampling=sampler.SamplingParams(max_new_tokens=2), eos_id=NO_EOS)(
      params, _prompts(model.config, (5,)), batch_size=32)
  assert batches and set(batches) == {1}


def test_ring_cache_is_used_past_the_window_only(monkeypatch):
  """The sampler gives sliding-window layers a ring only when the cache outgrows the window,
  and then runs a scanned model's layers unrolled (their caches differ in length)."""
  made = []
  init = kv_cache.init_cache

  def recording(config, batch, length, dtype=jnp.bfloat16, **kw):
    made.append((length, kw.get('ring'), kw.get('stacked')))
    return init(config, batch, length, dtype, **kw)

  monkeypatch.setattr(kv_cache, 'init_cache', recording)
  config = dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], sliding_window=40)
  model, params = _random_params(config, seed=0)
  scanned = model_lib.Transformer(config, scan_layers=True)
  stacked = {k: v for k, v in params.items() if not k.startswith('layer_')}
  stacked['layers'] = jax.tree.map(lambda *x: jnp.stack(x),
                                   *[params[f'layer_{i}'] for i in range(config.num_layers)])
  prompts = _prompts(config, (3, 9))
  for new_tokens, ring in ((8, False), (9, True)):  # 32-token bucket + 8 = 40 slots: no ring.
    made.clear()
    sampling = sampler.SamplingParams(max_new_tokens=new_tokens)
    got = sampler.Generator(scanned, sampling=sampling, eos_id=NO_EOS, unroll=False)(
        stacked, prompts)
    assert {m[1] for m in made} == {ring} and {m[2] for m in made} == {not ring}
    if ring:  # The unrolled twin of a scanned model decodes like the unrolled model.
      assert got == sampler.generate(model, params, prompts, eos_id=NO_EOS, sampling=sampling)
    made.clear()  # By default (unroll=True): a cache per layer, the same completions.
    assert got == sampler.generate(scanned, stacked, prompts, eos_id=NO_EOS, sampling=sampling)
    assert {m[2] for m in made} == {False}


def test_bucket():
  assert [sampler.bucket(n) for n in (0, 1, 32, 33, 100, 128, 129, 1400)] == [
      32, 32, 32, 64, 128, 128, 256, 1408]
  assert sampler.bucket(3, minimum=4) == 4 and sampler.bucket(5, minimum=4) == 8


# ---- 2. Greedy == transformers' greedy generate. ---------------------------------------------------

@pytest.fixture
def torch_one_thread():
  """torch's tiny-model ops are ~10x slower with a 2-thread OpenMP team when the other core is
  busy (e.g. with a compiling XLA); one thread is as fast for these sizes."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _hf_greedy(hf_model, prompt, n, eos_id, pad_id):
  """transformers' greedy continuation of one unpadded prompt, cut before the first EOS."""
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                dtype=torch.long),
                            do_sample=False, max_new_tokens=n, eos_token_id=eos_id,
                            pad_token_id=pad_id)
  ids = out[0, len(prompt):].tolist()
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


@pytest.mark.parametrize('name', ['tiny_gemma2', 'tiny_gemma3'])
def test_greedy_matches_transformers_generate(tmp_path, name, torch_one_thread):
  config = architecture.VARIANTS[name]
  hf_model = write_hf_checkpoint(tmp_path, config.to_hf_dict(), seed=3)
  model = model_lib.Transformer(config)
  params = checkpoints.load_params(str(tmp_path), config=config,
                                   shapes=model_lib.param_shapes(model))
  prompts = _prompts(config, lengths=(4, 12, 21), seed=5)
  n = 16
  ours = sampler.generate(model, params, prompts, eos_id=1,
                          sampling=sampler.SamplingParams(max_new_tokens=n))
  for prompt, got in zip(prompts, ours):
    assert got == _hf_greedy(hf_model, prompt, n, eos_id=1, pad_id=0)

  # transformers with the same left-padded batch (attention mask, positions from the mask).
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    batch = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                              eos_token_id=1, pad_token_id=0)[:, width:].tolist()
  for got, row in zip(ours, batch):
    assert got == (row[:row.index(1)] if 1 in row else row)
  assert len({t for row in ours for t in row}) > 3


@pytest.mark.slow
def test_real_gemma3_270m_greedy_matches_transformers(gemma3_270m_gguf, gemma3_270m_transformers,
                                                      gsm8k_dir):
  # test_checkpoints checks that the GGUF's metadata gives exactly this config.
  config = architecture.VARIANTS['gemma3_270m']
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  questions = gsm8k.load_split(gsm8k_dir, 'main', 'test')[:3]
  spec = evaluate.PromptSpec()
  prompts = [data_lib.tokenize_prompt(spec.build(q.question, []), tokenizer=tok)
             for q in questions]
  assert len(set(map(len, prompts))) == 3  # A left-padded batch.
  n = 32
  model = model_lib.Transformer(config)
  params = checkpoints.load_params(gemma3_270m_gguf, config=config,
                                   shapes=model_lib.param_shapes(model))
  ours = sampler.generate(model, params, prompts, eos_id=tok.eos_token_id,
                          pad_id=tok.pad_token_id, sampling=sampler.SamplingParams(max_new_tokens=n))
  del params

  # transformers dequantises the GGUF itself (one load for the session, conftest).
  hf = gemma3_270m_transformers
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                          dtype=torch.long),
                        do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, output_logits=True,
                        return_dict_in_generate=True)
    want = out.sequences[0, len(prompt):].tolist()
    if tok.eos_token_id in want:
      want = want[:want.index(tok.eos_token_id)]
    # How close to a tie greedy decoding came: the top-1 minus top-2 logit at each step.
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).numpy()
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    print(f'270M: prompt {len(prompt)} tokens, {len(want)} generated, min top-2 gap '
          f'{gaps.min():.3f}, first difference at {first_diff} '
          f'(gap there {gaps[first_diff] if first_diff is not None else "-"}): '
          f'{tok.decode(got)!r}')
    assert got == want
    assert len(got) >= 8  # A real continuation, not an immediate EOS.


# ---- Several processes. ----------------------------------------------------------------------------

_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    import jax.numpy as jnp
    from gemma_sft_jax.evaluation import sampler
    from gemma_sft_jax.model import architecture, sharding, transformer as model_lib
    config = dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], num_layers=2,
                                 layer_types=(architecture.SLIDING, architecture.GLOBAL))
    model = model_lib.Transformer(config)
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1)  # One CPU device per process.
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
    params = jax.device_put(params, sharding.replicated(mesh))
    out = sampler.generate(model, params, json.loads(sys.argv[3]), eos_id=-1,
                           sampling=sampler.SamplingParams(max_new_tokens=6),
                           batch_sharding=sharding.batch_sharding(mesh))
    print('OUT', json.dumps(out))
""")


def test_rows_split_over_two_processes(tmp_path):
  """Evaluation on a pod splits the batch over hosts; every process must get every row back."""
  config = SMALL
  prompts = _prompts(config, lengths=(4, 9, 2, 6), seed=2)
  script = tmp_path / 'two_processes.py'
  script.write_text(_TWO_PROCESS_SCRIPT)
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(),
             PYTHONPATH=os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')])))
  procs = [subprocess.Popen([sys.executable, str(script), f'localhost:{port}', str(i),
                             json.dumps(prompts)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  # The one-process reference, computed while the two processes start.
  model = model_lib.Transformer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  want = sampler.generate(model, params, prompts, eos_id=-1,
                          sampling=sampler.SamplingParams(max_new_tokens=6))
  for i, proc in enumerate(procs):
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, f'process {i}:\n{out[-3000:]}'
    lines = [l for l in out.splitlines() if l.startswith('OUT ')]
    assert lines and json.loads(lines[-1][4:]) == want, f'process {i}:\n{out[-3000:]}'
