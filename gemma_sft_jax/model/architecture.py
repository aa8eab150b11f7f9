"""Gemma 2 / Gemma 3 text architectures: `ModelConfig`, built from a transformers config.json (or
GGUF metadata, see weights/loading.py), and the named `VARIANTS` used for random init and shape checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SLIDING = 'sliding_attention'
GLOBAL = 'full_attention'


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
