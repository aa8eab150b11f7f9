"""Gemma 2 and Gemma 3 (text) in Flax linen: one Transformer, configured by a frozen `ModelConfig`.

Einsum axis legend, used in every equation below:
  B batch            T query length       S key/value length
  N query heads      K key/value heads    G query heads per kv head (N = K * G)
  H head dim         D model dim          F feed-forward hidden dim
  V vocabulary       R LoRA rank

Parameters are a plain nested dict (the linen 'params' collection):
  embedder/embedding                          [V, D]   (tied with the output head)
  layer_{i}/pre_attention_norm/scale          [D]
  layer_{i}/attn/{q_proj,k_proj,v_proj}/kernel [D, N|K, H]
  layer_{i}/attn/o_proj/kernel                [N, H, D]
  layer_{i}/attn/{query_norm,key_norm}/scale  [H]      (Gemma 3 only)
  layer_{i}/post_attention_norm/scale         [D]
  layer_{i}/pre_ffw_norm/scale                [D]
  layer_{i}/mlp/{gate_proj,up_proj}/kernel    [D, F]
  layer_{i}/mlp/down_proj/kernel              [F, D]
  layer_{i}/post_ffw_norm/scale               [D]
  final_norm/scale                            [D]
LoRA adds `lora_a` [D, R] and `lora_b` [R, ...out] beside a targeted `kernel` (see lora.py).

Attention masks are built from per-token `positions` and `segment_ids` (0 = padding), so the same
code serves packed training rows (segments never see each other) and the KV-cached sampler.
The KV cache is an explicit pytree passed in and returned: {'layer_i': {'k', 'v', 'pos', 'seg'}}.

With `scan_layers=True` the layers are one `nn.scan`: every `layer_{i}/...` leaf above becomes
`layers/...` with a leading [L] axis (and the cache {'layers': {...}} likewise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = dict[str, dict[str, Array]]

SLIDING = 'sliding_attention'
GLOBAL = 'full_attention'
_NEG_INF = -2.3819763e38  # Finite, so fully masked rows (padding) give a uniform softmax, not NaN.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one Gemma 2 / Gemma 3 text model. Every value comes from the checkpoint."""

  family: str  # 'gemma2' | 'gemma3'
  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  layer_types: tuple[str, ...]
  sliding_window: int | None
  rope_base_global: float
  rope_base_local: float
  rope_scale_global: float = 1.0  # Linear RoPE scaling factor (Gemma 3 4B+ global layers).
  rope_scale_local: float = 1.0
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  use_qk_norm: bool = False
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f'ModelConfig: {len(self.layer_types)} layer_types for {self.num_layers} layers')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'ModelConfig: num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any]) -> 'ModelConfig':
    """Builds the config from a transformers `config.json` dict (gemma2, gemma3_text, gemma3)."""
    model_type = cfg.get('model_type')
    if model_type == 'gemma3':  # Multimodal checkpoint: the text model's config is nested.
      cfg = {**_GEMMA3_TEXT_DEFAULTS, **cfg.get('text_config', {}), 'model_type': 'gemma3_text'}
      model_type = 'gemma3_text'
    if model_type == 'gemma3_text':
      cfg = {**_GEMMA3_TEXT_DEFAULTS, **cfg}
      family, pattern, default_local = 'gemma3', cfg.get('sliding_window_pattern', 6), 10_000.0
    elif model_type == 'gemma2':
      family, pattern, default_local = 'gemma2', 2, None
    else:
      raise ValueError(f'config.json: model_type {model_type!r} is not supported '
                       "(expected 'gemma2', 'gemma3_text' or 'gemma3')")
    n = int(cfg['num_hidden_layers'])
    layer_types = cfg.get('layer_types') or [
        SLIDING if (i + 1) % pattern else GLOBAL for i in range(n)]
    rope = _rope_from_hf(cfg, default_local)
    return cls(
        family=family,
        vocab_size=int(cfg['vocab_size']),
        embed_dim=int(cfg['hidden_size']),
        hidden_dim=int(cfg['intermediate_size']),
        num_layers=n,
        num_heads=int(cfg['num_attention_heads']),
        num_kv_heads=int(cfg['num_key_value_heads']),
        head_dim=int(cfg.get('head_dim') or cfg['hidden_size'] // cfg['num_attention_heads']),
        query_pre_attn_scalar=float(cfg['query_pre_attn_scalar']),
        layer_types=tuple(layer_types),
        sliding_window=cfg.get('sliding_window'),
        attn_logit_softcap=cfg.get('attn_logit_softcapping'),
        final_logit_softcap=cfg.get('final_logit_softcapping'),
        use_qk_norm=family == 'gemma3',
        rms_norm_eps=float(cfg.get('rms_norm_eps', 1e-6)),
        **rope,
    )

  @classmethod
  def from_hf_dir(cls, path: str) -> 'ModelConfig':
    """Reads `path/config.json`."""
    file = os.path.join(path, 'config.json')
    try:
      with open(file) as f:
        cfg = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f'{file}: not found (a HF checkpoint directory needs config.json)') from None
    except json.JSONDecodeError as e:
      raise ValueError(f'{file}:{e.lineno}: invalid JSON ({e.msg})') from None
    try:
      return cls.from_hf_dict(cfg)
    except KeyError as e:
      raise ValueError(f'{file}: missing key {e.args[0]!r}') from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers config dict for this architecture (used by tests and exports)."""
    if self.family == 'gemma2':
      extra = {'model_type': 'gemma2', 'rope_theta': self.rope_base_global,
               'architectures': ['Gemma2ForCausalLM']}
    else:
      global_rope = {'rope_type': 'default', 'rope_theta': self.rope_base_global}
      if self.rope_scale_global != 1.0:
        global_rope = {'rope_type': 'linear', 'factor': self.rope_scale_global,
                       'rope_theta': self.rope_base_global}
      extra = {'model_type': 'gemma3_text', 'architectures': ['Gemma3ForCausalLM'],
               'rope_parameters': {GLOBAL: global_rope,
                                   SLIDING: {'rope_type': 'default', 'rope_theta': self.rope_base_local}}}
    return {
        **extra,
        'vocab_size': self.vocab_size, 'hidden_size': self.embed_dim,
        'intermediate_size': self.hidden_dim, 'num_hidden_layers': self.num_layers,
        'num_attention_heads': self.num_heads, 'num_key_value_heads': self.num_kv_heads,
        'head_dim': self.head_dim,
        'query_pre_attn_scalar': (int(self.query_pre_attn_scalar)
                                  if float(self.query_pre_attn_scalar).is_integer()
                                  else self.query_pre_attn_scalar),
        'layer_types': list(self.layer_types), 'sliding_window': self.sliding_window,
        'attn_logit_softcapping': self.attn_logit_softcap,
        'final_logit_softcapping': self.final_logit_softcap,
        'rms_norm_eps': self.rms_norm_eps, 'hidden_activation': 'gelu_pytorch_tanh',
        'tie_word_embeddings': True, 'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2,
    }


# Values transformers' Gemma3TextConfig fills in when a config.json leaves them out.
_GEMMA3_TEXT_DEFAULTS = {
    'vocab_size': 262_208, 'hidden_size': 2304, 'intermediate_size': 9216, 'num_hidden_layers': 26,
    'num_attention_heads': 8, 'num_key_value_heads': 4, 'head_dim': 256, 'query_pre_attn_scalar': 256,
    'sliding_window': 4096, 'rms_norm_eps': 1e-6, 'rope_theta': 1_000_000.0,
    'attn_logit_softcapping': None, 'final_logit_softcapping': None,
}


def _rope_from_hf(cfg: Mapping[str, Any], default_local: float | None) -> dict[str, float]:
  """RoPE bases/scales per layer type, from either config format transformers has used."""

  def scale_of(params):
    if not params or params.get('rope_type', 'default') == 'default':
      return 1.0
    if params['rope_type'] != 'linear':
      raise ValueError(f"config.json: rope_type {params['rope_type']!r} is not supported")
    return float(params['factor'])

  params = cfg.get('rope_parameters')
  if isinstance(params, Mapping) and GLOBAL in params:  # transformers >= 5: one dict per layer type.
    glob, loc = params[GLOBAL], params.get(SLIDING) or params[GLOBAL]
    return dict(rope_base_global=float(glob['rope_theta']), rope_scale_global=scale_of(glob),
                rope_base_local=float(loc['rope_theta']), rope_scale_local=scale_of(loc))
  if isinstance(params, Mapping) and 'rope_theta' in params:  # One dict for all layers (Gemma 2).
    base = float(params['rope_theta'])
    return dict(rope_base_global=base, rope_base_local=base, rope_scale_global=scale_of(params))
  base = float(cfg.get('rope_theta', 10_000.0))
  local = float(cfg.get('rope_local_base_freq', default_local or base))
  return dict(rope_base_global=base, rope_base_local=local,
              rope_scale_global=scale_of(cfg.get('rope_scaling')))


def _gemma2(**kw) -> ModelConfig:
  n = kw.pop('num_layers')
  return ModelConfig(family='gemma2', vocab_size=kw.pop('vocab_size', 256_000), num_layers=n,
                     layer_types=tuple(SLIDING if (i + 1) % 2 else GLOBAL for i in range(n)),
                     sliding_window=kw.pop('sliding_window', 4096), rope_base_global=10_000.0,
                     rope_base_local=10_000.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                     **kw)


def _gemma3(**kw) -> ModelConfig:
  n = kw.pop('num_layers')
  return ModelConfig(family='gemma3', vocab_size=kw.pop('vocab_size', 262_144), num_layers=n,
                     layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(n)),
                     rope_base_global=1_000_000.0, rope_base_local=10_000.0, use_qk_norm=True,
                     **kw)


# Named variants (the published architectures) plus prime-sized tiny ones for tests.
VARIANTS: dict[str, ModelConfig] = {
    'gemma2_2b': _gemma2(embed_dim=2304, hidden_dim=9216, num_layers=26, num_heads=8,
                         num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    'gemma2_9b': _gemma2(embed_dim=3584, hidden_dim=14336, num_layers=42, num_heads=16,
                         num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    'gemma2_27b': _gemma2(embed_dim=4608, hidden_dim=36864, num_layers=46, num_heads=32,
                          num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    'gemma3_270m': _gemma3(embed_dim=640, hidden_dim=2048, num_layers=18, num_heads=4,
                           num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=512),
    'gemma3_1b': _gemma3(embed_dim=1152, hidden_dim=6912, num_layers=26, num_heads=4,
                         num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=512),
    'gemma3_4b': _gemma3(vocab_size=262_208, embed_dim=2560, hidden_dim=10240, num_layers=34,
                         num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                         sliding_window=1024, rope_scale_global=8.0),
    'gemma3_12b': _gemma3(vocab_size=262_208, embed_dim=3840, hidden_dim=15360, num_layers=48,
                          num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
                          sliding_window=1024, rope_scale_global=8.0),
    'gemma3_27b': _gemma3(vocab_size=262_208, embed_dim=5376, hidden_dim=21504, num_layers=62,
                          num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168,
                          sliding_window=1024, rope_scale_global=8.0),
    # Tiny variants: odd/prime sizes ease shape tracing (transformers needs D % N == 0); vocab 263 holds the byte tokenizer's 259 ids.
    'tiny_gemma2': _gemma2(vocab_size=263, embed_dim=63, hidden_dim=97, num_layers=3, num_heads=9,
                           num_kv_heads=3, head_dim=16, query_pre_attn_scalar=17, sliding_window=7),
    'tiny_gemma3': _gemma3(vocab_size=263, embed_dim=63, hidden_dim=97, num_layers=7, num_heads=3,
                           num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=7),
}


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """Gemma's RMSNorm, x·rsqrt(mean x² + eps)·(1 + w), computed in fp32 and cast back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)


class Projection(nn.Module):
  """A bias-free einsum projection, with an optional LoRA adapter beside its kernel.

  The adapter adds (alpha / R)·(x·A)·B to the output; W + AB is never formed.
  """

  equation: str  # e.g. 'BTD,DNH->BTNH'
  shape: tuple[int, ...]
  in_dims: int = 1  # How many leading kernel axes contract with x.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    fan_in = math.prod(self.shape[:self.in_dims])
    init = nn.initializers.normal(stddev=fan_in ** -0.5)
    kernel = self.param('kernel', init, self.shape, self.param_dtype)
    y = jnp.einsum(self.equation, x, kernel.astype(self.dtype))
    if not self.lora_rank:
      return y
    # Adapters stay fp32 (they are what learns); they are cast to the compute dtype for the matmul.
    a = self.param('lora_a', nn.initializers.normal(stddev=fan_in ** -0.5),
                   (*self.shape[:self.in_dims], self.lora_rank), jnp.float32)
    b = self.param('lora_b', nn.initializers.zeros_init(),
                   (self.lora_rank, *self.shape[self.in_dims:]), jnp.float32)
    if self.lora_dropout and not deterministic:
      x = nn.Dropout(self.lora_dropout)(x, deterministic=False)
    lhs, _ = self.equation.split('->')
    x_axes, k_axes = lhs.split(',')
    out_axes = self.equation.split('->')[1]
    in_axes, kout_axes = k_axes[:self.in_dims], k_axes[self.in_dims:]
    xa = jnp.einsum(f'{x_axes},{in_axes}R->{x_axes[:-self.in_dims]}R', x, a.astype(self.dtype))
    delta = jnp.einsum(f'{x_axes[:-self.in_dims]}R,R{kout_axes}->{out_axes}', xa, b.astype(self.dtype))
    return y + (self.lora_alpha / self.lora_rank) * delta


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which projections get adapters: `targets` is a regex matched against 'layer_i/attn/q_proj/kernel'."""
  rank: int = 0
  alpha: float = 1.0
  dropout: float = 0.0
  targets: str = ''

  def rank_for(self, path: str) -> int:
    return self.rank if self.rank and re.fullmatch(self.targets, path) else 0


def rope(x: Array, positions: Array, base: float, scale: float) -> Array:
  """Rotary embedding on the last axis of x [B, T, N, H], halves-rotation as in Gemma/transformers."""
  h = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)) / scale
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_pos: Array, q_seg: Array, k_pos: Array, k_seg: Array,
                   window: int | None) -> Array:
  """[B, T, S] True where query t may attend key s: same segment, causal, inside the window."""
  q_pos, k_pos = q_pos[:, :, None], k_pos[:, None, :]
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos <= q_pos)
  if window is not None:
    mask &= q_pos - k_pos < window
  return mask


class Attention(nn.Module):
  config: ModelConfig
  layer_type: str | None  # None: scanned layers; the per-layer `local` flag arrives as data.
  dtype: Any
  param_dtype: Any
  lora: dict[str, int]  # projection name -> LoRA rank (0 = none)
  lora_spec: LoraSpec

  def _proj(self, name, equation, shape, in_dims=1):
    return Projection(equation, shape, in_dims, self.dtype, self.param_dtype, self.lora.get(name, 0),
                      self.lora_spec.alpha, self.lora_spec.dropout, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: dict[str, Array] | None, cache_index: Array | None,
               deterministic: bool, local: Array | None = None
               ) -> tuple[Array, dict[str, Array] | None]:
    c = self.config
    n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim
    q = self._proj('q_proj', 'BTD,DNH->BTNH', (d, n, h))(x, deterministic)
    key = self._proj('k_proj', 'BSD,DKH->BSKH', (d, k, h))(x, deterministic)
    val = self._proj('v_proj', 'BSD,DKH->BSKH', (d, k, h))(x, deterministic)
    if c.use_qk_norm:
      q = RMSNorm(c.rms_norm_eps, self.param_dtype, name='query_norm')(q)
      key = RMSNorm(c.rms_norm_eps, self.param_dtype, name='key_norm')(key)
    if self.layer_type is not None:
      local = self.layer_type == SLIDING
    # A traced `local` selects per layer; a Python bool picks the constants directly.
    select = (lambda a, b: a if local else b) if isinstance(local, bool) else (
        lambda a, b: jnp.where(local, jnp.float32(a), jnp.float32(b)))
    base = select(c.rope_base_local, c.rope_base_global)
    scale = select(c.rope_scale_local, c.rope_scale_global)
    q = rope(q, positions, base, scale)
    key = rope(key, positions, base, scale)

    k_pos, k_seg = positions, segment_ids
    new_cache = None
    if cache is not None:
      # Write this call's keys/values at slot `cache_index`, then attend over the whole cache.
      idx = (0, cache_index, 0, 0)
      new_cache = {
          'k': jax.lax.dynamic_update_slice(cache['k'], key.astype(cache['k'].dtype), idx),
          'v': jax.lax.dynamic_update_slice(cache['v'], val.astype(cache['v'].dtype), idx),
          'pos': jax.lax.dynamic_update_slice(cache['pos'], positions.astype(jnp.int32), idx[:2]),
          'seg': jax.lax.dynamic_update_slice(cache['seg'], segment_ids.astype(jnp.int32), idx[:2]),
      }
      key, val = new_cache['k'].astype(self.dtype), new_cache['v'].astype(self.dtype)
      k_pos, k_seg = new_cache['pos'], new_cache['seg']

    q = q * jnp.asarray(c.query_pre_attn_scalar ** -0.5, q.dtype)
    q = q.reshape(*q.shape[:2], k, n // k, h)  # [B, T, K, G, H]
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, key, preferred_element_type=jnp.float32)
    if c.attn_logit_softcap is not None:
      logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
    if isinstance(local, bool) or c.sliding_window is None:
      window = c.sliding_window if local is True else None
      mask = attention_mask(positions, segment_ids, k_pos, k_seg, window)
    else:
      full = attention_mask(positions, segment_ids, k_pos, k_seg, None)
      mask = full & (~local | (positions[:, :, None] - k_pos[:, None, :] < c.sliding_window))
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, val).reshape(*x.shape[:2], n, h)
    out = self._proj('o_proj', 'BTNH,NHD->BTD', (n, h, d), in_dims=2)(out, deterministic)
    return out, new_cache


class MLP(nn.Module):
  config: ModelConfig
  dtype: Any
  param_dtype: Any
  lora: dict[str, int]
  lora_spec: LoraSpec

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c = self.config

    def proj(name, equation, shape):
      return Projection(equation, shape, 1, self.dtype, self.param_dtype, self.lora.get(name, 0),
                        self.lora_spec.alpha, self.lora_spec.dropout, name=name)

    gate = proj('gate_proj', 'BTD,DF->BTF', (c.embed_dim, c.hidden_dim))(x, deterministic)
    up = proj('up_proj', 'BTD,DF->BTF', (c.embed_dim, c.hidden_dim))(x, deterministic)
    hidden = jax.nn.gelu(gate, approximate=True) * up
    return proj('down_proj', 'BTF,FD->BTD', (c.hidden_dim, c.embed_dim))(hidden, deterministic)


class Block(nn.Module):
  """One decoder layer: pre/post-normed attention and MLP, each with a residual.

  The call signature is the body of `nn.scan`: (carry x, per-layer (local flag, cache), broadcast
  arguments...) -> (x, new cache). Unrolled layers pass local=None and know their `layer_type`.
  """

  config: ModelConfig
  layer_type: str | None
  dtype: Any
  param_dtype: Any
  attn_lora: dict[str, int]
  mlp_lora: dict[str, int]
  lora_spec: LoraSpec
  out_sharding: Any = None  # Sharding constraint for the block's output (see Transformer).

  @nn.compact
  def __call__(self, x, per_layer, positions, segment_ids, cache_index, deterministic):
    local, cache = per_layer
    c, pd = self.config, self.param_dtype
    h = RMSNorm(c.rms_norm_eps, pd, name='pre_attention_norm')(x)
    h, new_cache = Attention(c, self.layer_type, self.dtype, pd, self.attn_lora, self.lora_spec,
                             name='attn')(h, positions, segment_ids, cache, cache_index,
                                          deterministic, local)
    x = x + RMSNorm(c.rms_norm_eps, pd, name='post_attention_norm')(h)
    h = RMSNorm(c.rms_norm_eps, pd, name='pre_ffw_norm')(x)
    h = MLP(c, self.dtype, pd, self.mlp_lora, self.lora_spec, name='mlp')(h, deterministic)
    x = x + RMSNorm(c.rms_norm_eps, pd, name='post_ffw_norm')(h)
    if self.out_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.out_sharding)
    return x, new_cache


_REMAT_POLICIES = {
    'full': None,  # Recompute everything in the backward pass.
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """The Gemma decoder. `__call__` returns (logits or final hidden states, new cache)."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: LoraSpec = LoraSpec()
  remat: str = 'none'  # 'none' | 'full' | 'dots'
  # Optional sharding for [B, T, D] activations, applied at block boundaries so XLA keeps the
  # batch split the way the mesh says (see sharding.activation_sharding).
  activation_sharding: Any = None
  # One `nn.scan` over the layers: parameters (and the KV cache) are stacked under 'layers' with
  # a leading [L] axis, and the compiled program holds one layer, not L (compile time and
  # program size stop growing with depth). Sliding/global attention becomes per-layer data.
  scan_layers: bool = False

  def _constrain(self, x: Array) -> Array:
    if self.activation_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.activation_sharding)

  def setup(self):
    c = self.config
    self.embedder = nn.Embed(c.vocab_size, c.embed_dim, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             embedding_init=nn.initializers.normal(stddev=c.embed_dim ** -0.5),
                             name='embedder')
    block = Block
    if self.remat != 'none':
      if self.remat not in _REMAT_POLICIES:
        raise ValueError(f"model.remat: {self.remat!r} is not one of 'none', 'full', 'dots'")
      block = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], static_argnums=(6,))

    def ranks(i):
      return ({p: self.lora.rank_for(f'layer_{i}/attn/{p}/kernel')
               for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
              {p: self.lora.rank_for(f'layer_{i}/mlp/{p}/kernel')
               for p in ('gate_proj', 'up_proj', 'down_proj')})

    if self.scan_layers:
      per_layer = [ranks(i) for i in range(c.num_layers)]
      if any(r != per_layer[0] for r in per_layer):
        raise ValueError(f'lora.targets={self.lora.targets!r} adapts different projections in '
                         'different layers; scanned layers share one structure (set '
                         'model.scan_layers=False)')
      scanned = nn.scan(block, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=c.num_layers)
      self.layers = scanned(c, None, self.dtype, self.param_dtype, *per_layer[0], self.lora,
                            self.activation_sharding, name='layers')
    else:
      self.layers = [block(c, layer_type, self.dtype, self.param_dtype, *ranks(i), self.lora,
                           self.activation_sharding, name=f'layer_{i}')
                     for i, layer_type in enumerate(c.layer_types)]
    self.final_norm = RMSNorm(c.rms_norm_eps, self.param_dtype, name='final_norm')

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: Cache | None = None,
               cache_index: Array | None = None, *, deterministic: bool = True,
               return_hidden: bool = False) -> tuple[Array, Cache | None]:
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] RoPE positions (default 0..T-1); restart at 0 for each packed segment.
      segment_ids: [B, T] (default all ones); tokens attend only within their segment; 0 = padding.
      cache: optional KV cache from `init_cache`; this call's keys/values are written at slot
        `cache_index` (a scalar) and attention runs over every filled slot.
      cache_index: the slot to write at when `cache` is given.
      deterministic: False enables LoRA dropout (needs a 'dropout' rng).
      return_hidden: return the final-normed hidden states [B, T, D] instead of logits, for the
        chunked loss (loss.py), which never forms the full [B, T, V] logits.

    Returns:
      (logits [B, T, V] in fp32, or hidden [B, T, D]), and the new cache (None without one).
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = self.embedder(tokens)
    x = self._constrain(x * jnp.asarray(math.sqrt(self.config.embed_dim), x.dtype))
    new_cache = {} if cache is not None else None
    if self.scan_layers:
      local = jnp.asarray([t == SLIDING for t in self.config.layer_types])
      x, stacked = self.layers(x, (local, cache['layers'] if cache is not None else None),
                               positions, segment_ids, cache_index, deterministic)
      if cache is not None:
        new_cache['layers'] = stacked
    else:
      for i, layer in enumerate(self.layers):
        layer_cache = cache[f'layer_{i}'] if cache is not None else None
        x, c = layer(x, (None, layer_cache), positions, segment_ids, cache_index, deterministic)
        if cache is not None:
          new_cache[f'layer_{i}'] = c
    x = self.final_norm(x)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache

  def logits(self, hidden: Array) -> Array:
    """Tied output head with the final softcap, in fp32: [B, T, D] -> [B, T, V]."""
    return output_logits(hidden, self.embedder.embedding, self.config.final_logit_softcap)


def output_logits(hidden: Array, embedding: Array, softcap: float | None) -> Array:
  """hidden [..., D] · embedding [V, D]ᵀ -> fp32 logits [..., V], softcapped when the model says so."""
  logits = jnp.einsum('...D,VD->...V', hidden, embedding.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


def init_cache(config: ModelConfig, batch_size: int, length: int, dtype: Any = jnp.bfloat16, *,
               stacked: bool = False) -> Cache:
  """An empty KV cache of `length` slots per layer (segment id 0 marks a slot as empty).

  `stacked` (for scan_layers models): one {'layers': ...} entry with a leading [L] axis.
  """
  lead = (config.num_layers,) if stacked else ()
  k_shape = (*lead, batch_size, length, config.num_kv_heads, config.head_dim)
  layer = lambda: {'k': jnp.zeros(k_shape, dtype), 'v': jnp.zeros(k_shape, dtype),
                   'pos': jnp.zeros((*lead, batch_size, length), jnp.int32),
                   'seg': jnp.zeros((*lead, batch_size, length), jnp.int32)}
  if stacked:
    return {'layers': layer()}
  return {f'layer_{i}': layer() for i in range(config.num_layers)}


def param_shapes(model: Transformer) -> Any:
  """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t)['params'], tokens)


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
