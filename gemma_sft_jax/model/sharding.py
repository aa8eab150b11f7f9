"""Sharding as data: a device mesh from the config, and regex rules from parameter path to PartitionSpec.

Mesh axes:
  data    pure data parallelism (parameters replicated along it)
  fsdp    data parallelism with parameters (and optimizer state) sharded along it (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism over heads / the feed-forward hidden dim / vocab

The batch is split over ('data', 'fsdp'). A rule names mesh axes per array axis; an axis whose size
the mesh axis does not divide (e.g. one kv head over tensor=2) is left unsharded rather than failing,
so the same rules serve every model size and mesh.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_sft_jax import pytree

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')
# How a LoRA run's frozen base lies along 'fsdp' (config lora.base_sharding; `base_replicated`).
BASE_SHARDINGS = ('auto', 'fsdp', 'replicated')
# 'auto' replicates a base that takes at most this fraction of a device's memory.
REPLICATED_BASE_MEMORY_FRACTION = 0.25

# (regex over 'a/b/c' parameter paths, spec per array axis). First match wins.
RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (r'embedder/embedding', ('tensor', 'fsdp')),                 # [V, D]
    (r'.*/attn/(q|k|v)_proj/kernel', ('fsdp', 'tensor', None)),  # [D, N|K, H]
    (r'.*/attn/(q|k|v)_proj/lora_a', ('fsdp', None)),            # [D, R]
    (r'.*/attn/(q|k|v)_proj/lora_b', (None, 'tensor', None)),    # [R, N|K, H]
    (r'.*/attn/o_proj/kernel', ('tensor', None, 'fsdp')),        # [N, H, D]
    (r'.*/attn/o_proj/lora_a', ('tensor', None, None)),          # [N, H, R]
    (r'.*/attn/o_proj/lora_b', (None, 'fsdp')),                  # [R, D]
    (r'.*/mlp/(gate|up)_proj/kernel', ('fsdp', 'tensor')),       # [D, F]
    (r'.*/mlp/(gate|up)_proj/lora_a', ('fsdp', None)),           # [D, R]
    (r'.*/mlp/(gate|up)_proj/lora_b', (None, 'tensor')),         # [R, F]
    (r'.*/mlp/down_proj/kernel', ('tensor', 'fsdp')),            # [F, D]
    (r'.*/mlp/down_proj/lora_a', ('tensor', None)),              # [F, R]
    (r'.*/mlp/down_proj/lora_b', (None, 'fsdp')),                # [R, D]
    (r'.*', ()),                                                 # norms and anything small
)


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "all remaining devices"."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one of data/fsdp/tensor may be -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh: {len(devices)} devices are not divisible by {known} ({sizes})')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh: data*fsdp*tensor = {math.prod(sizes)} but there are '
                     f'{len(devices)} devices ({dict(zip(AXES, sizes))})')
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(sizes)  # e.g. CPU devices without a physical topology.
  return Mesh(grid, AXES)


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their array axis (or that the mesh lacks / has size 1)."""
  out = []
  for dim, axis in zip(shape, list(spec) + [None] * (len(shape) - len(spec))):
    names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    out.append((names if len(names) > 1 else names[0]) if names and dim % size == 0 else None)
  return P(*out)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, tuple[Any, ...]]] = RULES) -> P:
  stacked = path.startswith('layers/')  # Scanned layers: a leading [L] axis, never sharded.
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      return _fit((None, *spec) if stacked else spec, shape, mesh)
  raise ValueError(f'sharding: no rule matches parameter {path!r}')


def param_shardings(shapes: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, tuple[Any, ...]]] = RULES) -> Any:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs, by the regex rules."""
  paths = pytree.paths(shapes)
  return jax.tree.map(lambda p, s: NamedSharding(mesh, spec_for(p, s.shape, mesh, rules)),
                      paths, shapes)


def without_axis(s: NamedSharding, axis: str) -> NamedSharding:
  """s with mesh axis `axis` removed from its spec: the array is replicated along that axis."""
  def keep(entry):
    names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n and n != axis)
    return (names if len(names) > 1 else names[0]) if names else None
  return NamedSharding(s.mesh, P(*(keep(e) for e in s.spec)))


def base_replicated(mode: str, base_shapes: Any, mesh: Mesh) -> bool:
  """Whether a frozen base (a tree of arrays / ShapeDtypeStructs) is replicated along 'fsdp'.

  Sharded, every step gathers each frozen weight (forward, and again for the backward pass);
  replicated, it costs the base's memory once more per fsdp shard and needs no communication.
  'auto' replicates where the base (split over 'tensor' only) takes at most
  REPLICATED_BASE_MEMORY_FRACTION of the first local device's memory, and shards where the device
  does not report its memory (CPUs).
  """
  if mode not in BASE_SHARDINGS:
    raise ValueError(f'lora.base_sharding: {mode!r} is not one of {", ".join(BASE_SHARDINGS)}')
  if mode != 'auto':
    return mode == 'replicated'
  limit = (jax.local_devices()[0].memory_stats() or {}).get('bytes_limit')
  if not limit or mesh.shape['fsdp'] == 1:
    return False
  nbytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(base_shapes)) / mesh.shape['tensor']
  return nbytes <= REPLICATED_BASE_MEMORY_FRACTION * limit


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a [B, ...] batch split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH))


def activation_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T, D] activations between blocks: batch over data/fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
