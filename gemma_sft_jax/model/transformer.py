"""Gemma 2 and Gemma 3 (text) in Flax linen: one Transformer, configured by a ModelConfig.

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
LoRA adds `lora_a` [D, R] and `lora_b` [R, ...out] beside a targeted `kernel` (lora.py: the spec,
the adapter's einsums, and the tree operations).

Attention masks are built from per-token `positions` and `segment_ids` (0 = padding), so the same
code serves packed training rows (segments never see each other) and the KV-cached sampler
(attention.py: rotary embeddings, the mask, scores and weighted values).
The KV cache is an explicit pytree passed in and returned: {'layer_i': {'k', 'v', 'pos', 'seg'}};
a token goes to slot `position % slots`, so sliding-window layers may keep a ring of window size
(kv_cache.py).

With `scan_layers=True` the layers are one `nn.scan`: every `layer_{i}/...` leaf above becomes
`layers/...` with a leading [L] axis (and the cache {'layers': {...}} likewise).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import attention
from gemma_sft_jax.model import flash_attention
from gemma_sft_jax.model import kv_cache
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import remat as remat_lib
from gemma_sft_jax.model.lora import LoraSpec

Array = jax.Array
Cache = kv_cache.Cache

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
      return checkpoint_name(y, self.name)
    # Adapters stay fp32 (they are what learns); they are cast to the compute dtype for the matmul.
    a = self.param('lora_a', nn.initializers.normal(stddev=fan_in ** -0.5),
                   (*self.shape[:self.in_dims], self.lora_rank), jnp.float32)
    b = self.param('lora_b', nn.initializers.zeros_init(),
                   (self.lora_rank, *self.shape[self.in_dims:]), jnp.float32)
    if self.lora_dropout and not deterministic:
      x = nn.Dropout(self.lora_dropout)(x, deterministic=False)
    delta = lora.adapter_output(self.equation, self.in_dims, x, a.astype(self.dtype),
                                b.astype(self.dtype))
    return checkpoint_name(y + (self.lora_alpha / self.lora_rank) * delta, self.name)


def _projection(module: nn.Module, name: str, equation: str, shape: tuple[int, ...],
                in_dims: int = 1) -> Projection:
  """Projection `name` of an Attention or MLP `module`, with the LoRA rank its `lora` gives."""
  return Projection(equation, shape, in_dims, module.dtype, module.param_dtype,
                    module.lora.get(name, 0), module.lora_spec.alpha, module.lora_spec.dropout,
                    name=name)


class Attention(nn.Module):
  config: architecture.ModelConfig
  layer_type: str | None  # None: scanned layers; the per-layer `local` flag arrives as data.
  dtype: Any
  param_dtype: Any
  lora: dict[str, int]  # projection name -> LoRA rank (0 = none)
  lora_spec: LoraSpec
  attention: str = 'einsum'  # 'einsum' | 'flash' | 'auto' (flash_attention.use)
  sharding: Any = None  # NamedSharding of [B, T, D] activations (the flash kernels' shard_map).

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: dict[str, Array] | None, deterministic: bool, local: Array | None = None,
               shared: dict[str, Array] | None = None
               ) -> tuple[Array, dict[str, Array] | None]:
    c = self.config
    n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim
    proj = functools.partial(_projection, self)
    q = proj('q_proj', 'BTD,DNH->BTNH', (d, n, h))(x, deterministic)
    key = proj('k_proj', 'BSD,DKH->BSKH', (d, k, h))(x, deterministic)
    val = proj('v_proj', 'BSD,DKH->BSKH', (d, k, h))(x, deterministic)
    if c.use_qk_norm:
      q = RMSNorm(c.rms_norm_eps, self.param_dtype, name='query_norm')(q)
      key = RMSNorm(c.rms_norm_eps, self.param_dtype, name='key_norm')(key)
    if self.layer_type is not None:
      local = self.layer_type == architecture.SLIDING
    # A traced `local` selects per layer; a Python bool picks the constants directly.
    select = (lambda a, b: a if local else b) if isinstance(local, bool) else (
        lambda a, b: jnp.where(local, jnp.float32(a), jnp.float32(b)))
    base = select(c.rope_base_local, c.rope_base_global)
    scale = select(c.rope_scale_local, c.rope_scale_global)
    q = attention.rope(q, positions, base, scale)
    key = attention.rope(key, positions, base, scale)

    # This call's keys and values in the cache's layout, [B, K, S, H].
    own = {'k': jnp.swapaxes(key, 1, 2), 'v': jnp.swapaxes(val, 1, 2), 'pos': positions,
           'seg': segment_ids}
    new_cache, parts = None, (own,)
    if cache is not None:
      # Scanned layers pass the whole stacked cache and this layer's index, and the write goes
      # into that layer in place (a per-layer cache passed in and out of the scan would be
      # copied whole at every step).
      stacked, layer = cache if isinstance(cache, tuple) else (cache, None)
      new_cache = kv_cache.write_cache(stacked, key, val, positions, segment_ids, layer=layer)
      view = (lambda t: t) if layer is None else (
          lambda t: jax.tree.map(lambda a: a[layer], t))
      # One new token: the written cache holds every key it may see (the ring slot it took held
      # a position a whole window back, which the mask would drop anyway). Several tokens (a
      # prefill): what the cache held before them, then their own keys, so that writing into a
      # ring does not drop keys the earlier of them still need.
      parts = (view(new_cache),) if x.shape[1] == 1 else (view(stacked), own)
    # Keys and values join along S (axis 2), positions and segment ids along theirs (axis 1).
    cat = lambda name, dtype, axis: jnp.concatenate([p[name].astype(dtype) for p in parts],
                                                    axis=axis)
    key, val = cat('k', self.dtype, 2), cat('v', self.dtype, 2)
    k_pos, k_seg = cat('pos', jnp.int32, 1), cat('seg', jnp.int32, 1)

    if cache is None and shared is None and flash_attention.use(self.attention, q.shape,
                                                                key.shape, self.sharding):
      out = flash_attention.flash_attention(
          attention.scale_queries(c, q), key, val, positions, segment_ids,
          attention.layer_window(c, local), softcap=c.attn_logit_softcap,
          sharding=self.sharding, interpret=jax.default_backend() != 'gpu')
    else:
      out = attention.attend(c, q, key, val, positions, segment_ids, k_pos, k_seg, local,
                             shared, dtype=self.dtype)
      out = checkpoint_name(out, remat_lib.ATTENTION)
    out = proj('o_proj', 'BTNH,NHD->BTD', (n, h, d), in_dims=2)(out, deterministic)
    return out, new_cache


class MLP(nn.Module):
  config: architecture.ModelConfig
  dtype: Any
  param_dtype: Any
  lora: dict[str, int]
  lora_spec: LoraSpec

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c = self.config
    proj = functools.partial(_projection, self)
    gate = proj('gate_proj', 'BTD,DF->BTF', (c.embed_dim, c.hidden_dim))(x, deterministic)
    up = proj('up_proj', 'BTD,DF->BTF', (c.embed_dim, c.hidden_dim))(x, deterministic)
    hidden = jax.nn.gelu(gate, approximate=True) * up
    return proj('down_proj', 'BTF,FD->BTD', (c.hidden_dim, c.embed_dim))(hidden, deterministic)


class Block(nn.Module):
  """One decoder layer: pre/post-normed attention and MLP, each with a residual.

  The call signature is the body of `nn.scan`: (carry, per-layer (local flag, cache, shared
  prefix cache), broadcast arguments...) -> (carry, new cache). Unrolled layers pass
  local=None, know their `layer_type` and carry x with their own cache. Scanned layers with a KV
  cache carry (x, the stacked cache), get their layer index in place of a cache and write into the
  stacked cache in place.
  """

  config: architecture.ModelConfig
  layer_type: str | None
  dtype: Any
  param_dtype: Any
  attn_lora: dict[str, int]
  mlp_lora: dict[str, int]
  lora_spec: LoraSpec
  out_sharding: Any = None  # Sharding constraint for the block's output (see Transformer).
  attention: str = 'einsum'  # Attention's implementation (Transformer.attention).

  @nn.compact
  def __call__(self, carry, per_layer, positions, segment_ids, deterministic):
    local, cache, shared = per_layer
    # Scanned layers with a KV cache carry (x, the stacked cache) and get their index as `cache`.
    x, stacked = carry if isinstance(carry, tuple) else (carry, None)
    if stacked is not None:
      cache = (stacked, cache)
    c, pd = self.config, self.param_dtype
    h = RMSNorm(c.rms_norm_eps, pd, name='pre_attention_norm')(x)
    h, new_cache = Attention(c, self.layer_type, self.dtype, pd, self.attn_lora, self.lora_spec,
                             self.attention, self.out_sharding, name='attn')(
                                 h, positions, segment_ids, cache, deterministic, local, shared)
    x = x + RMSNorm(c.rms_norm_eps, pd, name='post_attention_norm')(h)
    h = RMSNorm(c.rms_norm_eps, pd, name='pre_ffw_norm')(x)
    h = MLP(c, self.dtype, pd, self.mlp_lora, self.lora_spec, name='mlp')(h, deterministic)
    x = x + RMSNorm(c.rms_norm_eps, pd, name='post_ffw_norm')(h)
    if self.out_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.out_sharding)
    if stacked is not None:
      return (x, new_cache), None
    return x, new_cache


class Transformer(nn.Module):
  """The Gemma decoder. `__call__` returns (logits or final hidden states, new cache)."""

  config: architecture.ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: LoraSpec = LoraSpec()
  remat: str = 'none'  # 'none' | 'full' | 'dots' | 'save:PROJ,...' (remat.remat_policy)
  # Optional sharding for [B, T, D] activations, applied at block boundaries so XLA keeps the
  # batch split the way the mesh says (see sharding.activation_sharding).
  activation_sharding: Any = None
  # One `nn.scan` over the layers: parameters (and the KV cache) are stacked under 'layers' with
  # a leading [L] axis, and the compiled program holds one layer, not L (compile time and
  # program size stop growing with depth). Sliding/global attention becomes per-layer data.
  scan_layers: bool = False
  # Unrolled layers with remat: jax.checkpoint's barriers that keep XLA from merging a layer's
  # recomputation with its forward pass (CSE). Without them XLA may keep some values the policy
  # would recompute (more memory, less work). Scanned layers never need them: the loop keeps the
  # passes apart.
  remat_prevent_cse: bool = True
  # Unrolled layers with remat, during training: each layer's backward pass held in its place
  # (remat.recompute_after_cotangent): its recomputation waits for its output's cotangent, and its
  # weight gradients are done before the layer below starts. Replaces jax.checkpoint's own
  # barriers, which tie only the saved values together (remat_prevent_cse is then ignored).
  remat_after_cotangent: bool = False
  # Attention's implementation during training (no KV cache): 'einsum' (attention.attend, the
  # reference, any backend), 'flash' (flash_attention's Pallas kernels: GPU, or the Pallas
  # interpreter elsewhere) or 'auto' (flash on GPU where the kernels apply, einsum otherwise).
  # Decoding with a KV cache always takes the einsum path.
  attention: str = 'einsum'

  def _constrain(self, x: Array) -> Array:
    if self.activation_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.activation_sharding)

  @property
  def _holds_layers(self) -> bool:
    """Whether each unrolled layer's backward pass is held in its place (in training)."""
    return self.remat != 'none' and self.remat_after_cotangent and not self.scan_layers

  def setup(self):
    c = self.config
    self.embedder = nn.Embed(c.vocab_size, c.embed_dim, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             embedding_init=nn.initializers.normal(stddev=c.embed_dim ** -0.5),
                             name='embedder')
    block = Block
    if self.remat != 'none':
      block = nn.remat(Block, policy=remat_lib.remat_policy(self.remat), static_argnums=(5,),
                       prevent_cse=(self.remat_prevent_cse and not self.scan_layers
                                    and not self._holds_layers))

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
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=c.num_layers)
      self.layers = scanned(c, None, self.dtype, self.param_dtype, *per_layer[0], self.lora,
                            self.activation_sharding, self.attention, name='layers')
    else:
      self.layers = [block(c, layer_type, self.dtype, self.param_dtype, *ranks(i), self.lora,
                           self.activation_sharding, self.attention, name=f'layer_{i}')
                     for i, layer_type in enumerate(c.layer_types)]
    self.final_norm = RMSNorm(c.rms_norm_eps, self.param_dtype, name='final_norm')

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: Cache | None = None,
               *, deterministic: bool = True, return_hidden: bool = False,
               shared: Cache | None = None) -> tuple[Array, Cache | None]:
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] RoPE positions (default 0..T-1); restart at 0 for each packed segment.
      segment_ids: [B, T] (default all ones); tokens attend only within their segment; 0 = padding.
      cache: optional KV cache from `init_cache`; this call's keys/values are written at the
        slots of their positions (`write_cache`), and attention runs over the cache's filled
        slots and this call's tokens.
      deterministic: False enables LoRA dropout (needs a 'dropout' rng).
      return_hidden: return the final-normed hidden states [B, T, D] instead of logits, for the
        chunked loss (loss.py), which never forms the full [B, T, V] logits.
      shared: optional one-row cache of a prefix every row continues (a few-shot prompt's
        exemplars), read and never written: attention runs over it, then over `cache`. The
        positions of this call and of `cache` continue after it.

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
      local = jnp.asarray([t == architecture.SLIDING for t in self.config.layer_types])
      stacked_shared = shared['layers'] if shared is not None else None
      if cache is None:
        x, _ = self.layers(x, (local, None, stacked_shared), positions, segment_ids,
                           deterministic)
      else:  # The stacked cache rides in the carry; each layer writes its own slice in place.
        index = jnp.arange(self.config.num_layers)
        (x, new_cache['layers']), _ = self.layers((x, cache['layers']),
                                                  (local, index, stacked_shared),
                                                  positions, segment_ids, deterministic)
    else:
      for i, layer in enumerate(self.layers):
        layer_cache = cache[f'layer_{i}'] if cache is not None else None
        layer_shared = shared[f'layer_{i}'] if shared is not None else None
        args = (x, (None, layer_cache, layer_shared), positions, segment_ids)
        if self._holds_layers and cache is None:  # training
          x, c = remat_lib.recompute_after_cotangent(layer, deterministic, *args)
        else:
          x, c = layer(*args, deterministic)
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


def unstack_layers(params: Any, num_layers: int) -> Any:
  """A scanned model's parameters ('layers/...' with a leading [L] axis) as the unrolled
  model's ('layer_{i}/...')."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


def param_shapes(model: Transformer) -> Any:
  """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t)['params'], tokens)


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
