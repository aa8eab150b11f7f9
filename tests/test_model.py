"""The Flax Gemma against transformers: same weights, same logits; parameter counts; invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import kv_cache
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import remat as remat_lib
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.weights import loading as checkpoints
from tests.conftest import write_hf_checkpoint

# Tiny architectures chosen to exercise every Gemma feature: prime sizes, GQA with one and with
# several kv heads, a sliding window (7) much shorter than the input (23), both softcaps (Gemma 2),
# qk-norm and two rope bases (Gemma 3), linear rope scaling on global layers (Gemma 3 4B+).
_TINY = {
    'gemma2_kv3': architecture.VARIANTS['tiny_gemma2'],
    'gemma2_kv1': dataclasses.replace(architecture.VARIANTS['tiny_gemma2'], num_kv_heads=1,
                                      num_heads=3, query_pre_attn_scalar=13),
    'gemma3_kv1': architecture.VARIANTS['tiny_gemma3'],
    'gemma3_kv3_scaled': dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], num_heads=9,
                                             num_kv_heads=3, rope_scale_global=8.0),
}
SEQ = 23
# bf16 compute (weights and activations rounded to 8 mantissa bits, fp32 softmax/norms) against
# the fp32 reference (measured max abs diff 0.010-0.025 on these models); we accept 0.05 absolute and check the argmax mostly
# agrees. Measured max abs diff is printed by the test.
BF16_ATOL = 0.05


def _hf_logits(hf_model, tokens):
  with torch.no_grad():
    return hf_model(torch.tensor(tokens)).logits.float().numpy()


def _ours(path, config, dtype=jnp.float32):
  model = model_lib.Transformer(config, dtype=dtype, param_dtype=jnp.float32)
  params = checkpoints.load_params(str(path), config=config, shapes=model_lib.param_shapes(model))
  return model, params


@pytest.mark.parametrize('name', sorted(_TINY))
def test_logits_match_transformers(tmp_path, name):
  config = _TINY[name]
  hf_model = write_hf_checkpoint(tmp_path, config.to_hf_dict(), seed=1)
  loaded = architecture.ModelConfig.from_hf_dir(str(tmp_path))
  assert loaded == config  # config.json round-trips into the same architecture.

  tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, SEQ))
  expected = _hf_logits(hf_model, tokens)
  model, params = _ours(tmp_path, config)
  got, _ = model.apply({'params': params}, jnp.asarray(tokens))
  diff = np.abs(np.asarray(got) - expected).max()
  print(f'{name}: fp32 max abs diff {diff:.2e}')
  assert diff <= 1e-4

  model16 = model_lib.Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  got16, _ = model16.apply({'params': params16}, jnp.asarray(tokens))
  diff16 = np.abs(np.asarray(got16) - expected).max()
  agree = (np.asarray(got16).argmax(-1) == expected.argmax(-1)).mean()
  print(f'{name}: bf16 max abs diff {diff16:.3f}, argmax agreement {agree:.2f}')
  assert diff16 <= BF16_ATOL
  assert agree >= 0.9


def test_sliding_window_changes_logits():
  """The local mask really matters at this length: widening the window changes later positions."""
  config = architecture.VARIANTS['tiny_gemma2']
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, size=(1, SEQ)))
  model = model_lib.Transformer(config)
  params = model.init(jax.random.key(0), tokens)['params']
  params = jax.tree.map(lambda x: x + 0.1, params)  # Non-trivial norms.
  wide = model_lib.Transformer(dataclasses.replace(config, sliding_window=SEQ))
  a, _ = model.apply({'params': params}, tokens)
  b, _ = wide.apply({'params': params}, tokens)
  window = config.sliding_window
  np.testing.assert_allclose(a[:, :window], b[:, :window], atol=1e-5)
  assert np.abs(np.asarray(a[:, window:] - b[:, window:])).max() > 1e-3


def test_causal_and_segments():
  """A token never sees the future, and packed segments never see each other."""
  config = architecture.VARIANTS['tiny_gemma3']
  model = model_lib.Transformer(config)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.vocab_size, size=(1, 12))
  params = model.init(jax.random.key(0), jnp.asarray(tokens))['params']
  base, _ = model.apply({'params': params}, jnp.asarray(tokens))
  changed = tokens.copy()
  changed[0, 8:] = (changed[0, 8:] + 1) % config.vocab_size
  out, _ = model.apply({'params': params}, jnp.asarray(changed))
  np.testing.assert_array_equal(base[:, :8], out[:, :8])

  # Two packed segments == each segment run on its own.
  seg = np.array([[1] * 5 + [2] * 7])
  pos = np.array([list(range(5)) + list(range(7))])
  packed, _ = model.apply({'params': params}, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  first, _ = model.apply({'params': params}, jnp.asarray(tokens[:, :5]))
  second, _ = model.apply({'params': params}, jnp.asarray(tokens[:, 5:]))
  np.testing.assert_allclose(packed[:, :5], first, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], second, atol=1e-5)


def _decode_stepwise(model, params, tokens, cache, *, prefill):
  """Logits of a `prefill`-token prefill then one-token steps through the KV cache: [B, T, V].

  Jitted (one compile for the prefill, one for every step): op by op, each of the model's
  primitives would compile on its own.
  """
  logits, cache = jax.jit(lambda p, x, c: model.apply({'params': p}, x, cache=c))(
      params, tokens[:, :prefill], cache)
  step = jax.jit(lambda p, x, pos, c: model.apply({'params': p}, x, pos, cache=c))
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    pos = jnp.full((tokens.shape[0], 1), t, jnp.int32)
    logits, cache = step(params, tokens[:, t:t + 1], pos, cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


def test_cache_matches_full_forward():
  """Prefill + one-token steps through the explicit KV cache give the full forward's logits."""
  for name in ('tiny_gemma2', 'tiny_gemma3'):
    config = architecture.VARIANTS[name]
    model = model_lib.Transformer(config)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 15)))
    params = model.init(jax.random.key(0), tokens)['params']
    full, _ = model.apply({'params': params}, tokens)
    cache = kv_cache.init_cache(config, 2, 16, jnp.float32)
    np.testing.assert_allclose(_decode_stepwise(model, params, tokens, cache, prefill=6), full,
                               atol=1e-4)


def test_ring_cache_matches_full_forward_past_the_window():
  """Sliding-window layers with a ring of window size (7 slots for 30 tokens) give the full
  forward's logits: a prefill longer than the window, a second multi-token chunk that wraps the
  ring, then one-token steps."""
  config = architecture.VARIANTS['tiny_gemma3']
  assert config.sliding_window == 7 and architecture.SLIDING in config.layer_types
  model = model_lib.Transformer(config)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 30)))
  params = model.init(jax.random.key(1), tokens)['params']
  full, _ = model.apply({'params': params}, tokens)
  cache = kv_cache.init_cache(config, 2, 30, jnp.float32, ring=True)
  lengths = {c['k'].shape[2] for c in cache.values()}  # k: [B, K, S, H]
  assert lengths == {7, 30}
  call = jax.jit(lambda p, x, pos, c: model.apply({'params': p}, x, pos, cache=c))
  steps = []
  for lo, hi in ((0, 11), (11, 16)) + tuple((t, t + 1) for t in range(16, 30)):
    pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (2, hi - lo))
    logits, cache = call(params, tokens[:, lo:hi], pos, cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4)


@pytest.mark.parametrize('variant,scan', [('tiny_gemma2', True), ('tiny_gemma3', False)])
def test_shared_prefix_matches_full_forward(variant, scan):
  """Rows that continue one shared prefix, held once ([1, ...]) and read through `shared`, give
  the full forward's logits: a prefill of their own tokens, then one-token steps. The tiny
  Gemma 3's own cache is a ring (7-token window) past the prefix."""
  config = architecture.VARIANTS[variant]
  model = model_lib.Transformer(config, scan_layers=scan)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, size=(3, 30)))
  tokens = tokens.at[:, :12].set(tokens[0, :12])
  params = model.init(jax.random.key(2), tokens)['params']
  full, _ = model.apply({'params': params}, tokens)
  call = jax.jit(lambda p, x, pos, c, sh: model.apply({'params': p}, x, pos, cache=c, shared=sh))
  shared = kv_cache.init_cache(config, 1, 12, jnp.float32, stacked=scan)
  _, shared = call(params, tokens[:1, :12], None, shared, None)
  cache = kv_cache.init_cache(config, 3, 18, jnp.float32, stacked=scan, ring=not scan)
  steps = []
  for lo, hi in ((12, 20),) + tuple((t, t + 1) for t in range(20, 30)):
    pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (3, hi - lo))
    logits, cache = call(params, tokens[:, lo:hi], pos, cache, shared)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full[:, 12:], atol=1e-4)


def test_cache_writes_each_token_at_its_position_modulo_the_slots():
  """Rows of a decode batch at different positions write at their own slots (wrapping in a ring);
  a prefill skips its padding and keeps only the positions a ring of its length can hold."""
  config = architecture.VARIANTS['tiny_gemma2']
  cache = kv_cache.init_cache(config, 3, 8, jnp.float32)['layer_0']
  heads, dim = cache['k'].shape[1], cache['k'].shape[3]  # k: [B, K, S, H]
  kv = lambda b, t: jnp.arange(b * t, dtype=jnp.float32).reshape(b, t, 1, 1) * jnp.ones(
      (1, 1, heads, dim))
  step = kv_cache.write_cache(cache, kv(3, 1), kv(3, 1), jnp.asarray([[4], [0], [15]]),
                               jnp.ones((3, 1), jnp.int32))
  assert list(zip(*np.asarray(step['seg']).nonzero())) == [(0, 4), (1, 0), (2, 7)]  # 15 % 8
  assert np.asarray(step['k'])[2, 0, 7, 0] == 2 and np.asarray(step['pos'])[2, 7] == 15
  # Row 0: 2 padding tokens then positions 0..9 (the ring keeps 2..9); row 1: positions 0..11.
  seg = jnp.asarray([[0, 0] + [1] * 10, [1] * 12])
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  two = jax.tree.map(lambda a: a[:2], cache)
  pre = kv_cache.write_cache(two, kv(2, 12), kv(2, 12), pos, seg)
  np.testing.assert_array_equal(np.asarray(pre['pos']), [[8, 9, 2, 3, 4, 5, 6, 7],
                                                         [8, 9, 10, 11, 4, 5, 6, 7]])
  assert np.asarray(pre['k'])[0, 0, 2, 0] == 4  # Position 2 of row 0 is its token 4.


def test_remat_gives_same_gradients():
  config = architecture.VARIANTS['tiny_gemma2']
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 9)))
  params = model_lib.Transformer(config).init(jax.random.key(0), tokens)['params']

  def grads(remat):
    m = model_lib.Transformer(config, remat=remat)
    # Jitted: op by op, each primitive compiles on its own.
    return jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens)[0].mean()))(params)

  ref = grads('none')
  for remat in ('full', 'dots', 'save:q_proj,k_proj,v_proj,o_proj,down_proj'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, grads(remat))


def test_remat_prevent_cse_only_sets_the_barriers():
  """model.remat_prevent_cse=False drops jax.checkpoint's CSE barriers from unrolled layers (the
  lowered gradient has none) and changes no gradient; scanned layers never have them."""
  config = architecture.VARIANTS['tiny_gemma2']
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 9)))
  params = model_lib.Transformer(config).init(jax.random.key(0), tokens)['params']

  def barriers_and_grads(prevent_cse, scan=False):
    m = model_lib.Transformer(config, remat='full', remat_prevent_cse=prevent_cse,
                              scan_layers=scan)
    p = _stack(params, config.num_layers) if scan else params
    fn = jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens)[0].mean()))
    return fn.lower(p).as_text().count('optimization_barrier'), fn(p)

  kept, ref = barriers_and_grads(True)
  dropped, grads = barriers_and_grads(False)
  assert kept >= config.num_layers and dropped == 0, (kept, dropped)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, grads)
  assert barriers_and_grads(True, scan=True)[0] == 0


def test_remat_after_cotangent_holds_each_layer_and_keeps_gradients():
  """model.remat_after_cotangent wraps each unrolled layer's backward pass in two optimization
  barriers (entry: residuals + cotangent; exit: parameter cotangents + input cotangent) and changes
  no gradient; scanned layers and remat='none' are left alone."""
  config = architecture.VARIANTS['tiny_gemma2']
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 9)))
  params = model_lib.Transformer(config).init(jax.random.key(0), tokens)['params']

  def barriers_and_grads(scan=False, **kw):
    m = model_lib.Transformer(config, scan_layers=scan, **kw)
    p = _stack(params, config.num_layers) if scan else params
    fn = jax.jit(jax.grad(lambda p: m.apply({'params': p}, tokens)[0].mean()))
    return fn.lower(p).as_text().count('optimization_barrier'), fn(p)

  _, ref = barriers_and_grads(remat='none')
  for remat in ('full', 'save:q_proj,gate_proj'):
    held, grads = barriers_and_grads(remat=remat, remat_after_cotangent=True)
    assert held == 2 * config.num_layers, (remat, held)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, grads)
  assert barriers_and_grads(remat='none', remat_after_cotangent=True)[0] == 0
  assert barriers_and_grads(scan=True, remat='full', remat_after_cotangent=True)[0] == 0


def test_remat_after_cotangent_under_lora_computes_no_frozen_gradient():
  """Under LoRA the frozen kernels' cotangents leave the exit barrier unused: XLA drops them
  (the compiled backward does no more work than jax.checkpoint's), and the adapter gradients are
  the same."""
  config = dataclasses.replace(architecture.VARIANTS['tiny_gemma2'], embed_dim=64, hidden_dim=256)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 64)))
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=r'.*_proj/kernel')
  names = 'save:' + ','.join(remat_lib.PROJECTIONS)

  def step(**kw):
    m = model_lib.Transformer(config, lora=spec, remat=names, **kw)
    params = m.init(jax.random.key(0), tokens)['params']
    adapters, base = lora.split(params, 'lora')
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B starts at zero
    loss = lambda a: m.apply({'params': lora.join(a, base)}, tokens)[0].std()  # noqa: E731
    fn = jax.jit(jax.grad(loss))
    return fn(adapters), fn.lower(adapters).compile().cost_analysis()['flops']

  g_ref, flops_ref = step()
  g_held, flops_held = step(remat_after_cotangent=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_held, g_ref)
  # A frozen kernel's gradient is one more matmul per projection: ~1/3 more of the layers' work.
  assert flops_held < 1.05 * flops_ref, (flops_held, flops_ref)


def test_lora_saves_each_projection_output_once_by_name():
  """For LoRA, saving the projections by name keeps one output per projection (base + adapter)
  where 'dots' keeps the base matmul's and the adapter's apart: the compiled backward needs less
  temporary memory (configs/gemma2.py's LoRA remat), with the same adapter gradients."""
  config = dataclasses.replace(architecture.VARIANTS['tiny_gemma2'], embed_dim=64, hidden_dim=256)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 64)))
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=r'.*_proj/kernel')
  names = 'save:' + ','.join(remat_lib.PROJECTIONS)

  def step(remat):
    m = model_lib.Transformer(config, lora=spec, scan_layers=True, remat=remat)
    params = m.init(jax.random.key(0), tokens)['params']
    adapters, base = lora.split(params, 'lora')
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B starts at zero
    loss = lambda a: m.apply({'params': lora.join(a, base)}, tokens)[0].std()  # noqa: E731
    fn = jax.jit(jax.grad(loss))
    return fn(adapters), fn.lower(adapters).compile().memory_analysis().temp_size_in_bytes

  g_dots, temp_dots = step('dots')
  g_names, temp_names = step(names)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               g_names, g_dots)
  assert temp_names < 0.85 * temp_dots, (temp_names, temp_dots)  # measured: 0.74


def _stack(params, num_layers):
  """The unrolled tree's layer_{i} subtrees stacked under 'layers' (the scan_layers layout)."""
  out = {k: v for k, v in params.items() if not k.startswith('layer_')}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f'layer_{i}'] for i in range(num_layers)])
  return out


@pytest.mark.parametrize('name', ['gemma3_kv3_scaled'])  # qk-norm, 2 RoPE bases, scaling
def test_scanned_layers_match_unrolled(tmp_path, name):
  """scan_layers: the checkpoint loads stacked (bitwise the unrolled load, stacked); logits,
  gradients (also of unrolled layers with remat_after_cotangent), LoRA adapters and KV-cached
  decoding match the unrolled model."""
  config = _TINY[name]
  write_hf_checkpoint(tmp_path, config.to_hf_dict())
  unrolled = model_lib.Transformer(config)
  scanned = model_lib.Transformer(config, scan_layers=True, remat='dots')
  p_unrolled = checkpoints.load_params(str(tmp_path), config=config,
                                       shapes=model_lib.param_shapes(unrolled))
  p_scanned = checkpoints.load_params(str(tmp_path), config=config,
                                      shapes=model_lib.param_shapes(scanned))
  assert p_scanned['layers']['attn']['q_proj']['kernel'].shape[0] == config.num_layers
  stacked = _stack(p_unrolled, config.num_layers)
  assert jax.tree.structure(p_scanned) == jax.tree.structure(stacked)
  jax.tree.map(np.testing.assert_array_equal, p_scanned, stacked)

  tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, size=(2, SEQ)))
  # Jitted: op by op, each primitive compiles on its own (hundreds of compiles).
  logits = lambda m: jax.jit(lambda p: m.apply({'params': p}, tokens)[0])
  ref = logits(unrolled)(p_unrolled)
  got = logits(scanned)(p_scanned)
  np.testing.assert_allclose(got, ref, atol=2e-5)
  loss = lambda m: lambda p: m.apply({'params': p}, tokens)[0].std()
  g_ref = _stack(jax.jit(jax.grad(loss(unrolled)))(p_unrolled), config.num_layers)
  g_got = jax.jit(jax.grad(loss(scanned)))(p_scanned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), g_got, g_ref)
  # Unrolled with each layer's backward pass held in its place (the 9B full-SFT setting).
  held = model_lib.Transformer(config, remat='save:q_proj,gate_proj', remat_after_cotangent=True)
  np.testing.assert_allclose(logits(held)(p_unrolled), ref, atol=2e-5)
  g_held = _stack(jax.jit(jax.grad(loss(held)))(p_unrolled), config.num_layers)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), g_got, g_held)

  # LoRA on a subset of projections: the same adapters, stacked, give the same logits, and
  # merging folds each layer's adapter into its own slice of the stacked kernel.
  spec = lora.LoraSpec(rank=3, alpha=6.0, targets=r'.*/(q_proj|o_proj|up_proj)/kernel')
  lora_u = model_lib.Transformer(config, lora=spec)
  lora_s = model_lib.Transformer(config, lora=spec, scan_layers=True)
  adapters, _ = lora.split(lora_u.init(jax.random.key(1), tokens)['params'], 'lora')
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if 'lora_b' in jax.tree_util.keystr(p) else x, adapters)
  with_u = lora.join(p_unrolled, adapters)  # Base weights from the checkpoint, adapters from init.
  with_s = _stack(with_u, config.num_layers)
  assert jax.tree.structure(with_s) == jax.tree.structure(model_lib.param_shapes(lora_s))
  ref = logits(lora_u)(with_u)
  np.testing.assert_allclose(logits(lora_s)(with_s), ref, atol=2e-5)
  assert np.abs(ref - logits(unrolled)(p_unrolled)).max() > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lora.merge_weights(with_s, spec),
               _stack(lora.merge_weights(with_u, spec), config.num_layers))

  # Prefill + single-token steps through the stacked KV cache give the full forward's logits.
  full = logits(scanned)(p_scanned)
  cache = kv_cache.init_cache(config, 2, SEQ, jnp.float32, stacked=True)
  np.testing.assert_allclose(_decode_stepwise(scanned, p_scanned, tokens, cache, prefill=9), full,
                             atol=1e-4)


def test_scanned_layers_refuse_layer_specific_lora_targets():
  config = architecture.VARIANTS['tiny_gemma2']
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=r'layer_0/attn/q_proj/kernel')
  with pytest.raises(ValueError, match='scan_layers'):
    model_lib.param_shapes(model_lib.Transformer(config, lora=spec, scan_layers=True))


def _hf_param_count(config):
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
  with torch.device('meta'):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
  return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize('name', sorted(architecture.VARIANTS))
def test_param_count_matches_transformers(name):
  config = architecture.VARIANTS[name]
  ours = model_lib.count_params(model_lib.param_shapes(model_lib.Transformer(config)))
  assert ours == _hf_param_count(config)
  if name == 'gemma2_2b':
    assert ours == 2_614_341_888
