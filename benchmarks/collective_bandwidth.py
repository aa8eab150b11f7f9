r"""All-gather and all-reduce bandwidth between this host's GPUs, through XLA's NCCL collectives.

  NCCL_DEBUG=INFO python benchmarks/collective_bandwidth.py [--mib 1024] [--output OUT.jsonl]

A bf16 buffer of --mib MiB per device: all-gather (each device receives the others' parts) and
all-reduce (psum), median of 10 after a warm-up. Prints one JSON line per collective with the
algorithm bandwidth (bytes each device receives, or the buffer size for psum, per second) and NCCL's
bus bandwidth convention (all-gather (n-1)/n, all-reduce 2(n-1)/n). With NCCL_DEBUG=INFO, NCCL's
log says which transport links the GPUs (P2P/IPC, NVLS, SHM).
"""

import argparse
import datetime

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_sft_jax.training import metrics


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--mib', type=int, default=1024)
  p.add_argument('--output')
  args = p.parse_args()
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ('x',))
  per_device = args.mib * 2 ** 20 // 2  # bf16 elements per device
  x = jax.device_put(jnp.ones((n * per_device,), jnp.bfloat16), NamedSharding(mesh, P('x')))
  gather = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))
  psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, 'x'), mesh=mesh, in_specs=P('x'),
                               out_specs=P('x')))
  size = per_device * 2
  for name, fn, alg_bytes, bus_bytes in (
      ('all_gather', gather, size * (n - 1), size * (n - 1)),
      ('all_reduce', psum, size, size * 2 * (n - 1) / n)):
    s = metrics.median_seconds(lambda fn=fn: jax.block_until_ready(fn(x)), 10)
    row = {'bench': 'collective_bandwidth', 'collective': name, 'n_devices': n,
           'mib_per_device': args.mib, 'seconds': s, 'algbw_gb_s': alg_bytes / s / 1e9,
           'busbw_gb_s': bus_bytes / s / 1e9,
           'device': jax.devices()[0].device_kind,
           'date': datetime.date.today().isoformat(), 'jax': jax.__version__}
    metrics.emit_json_line(row, args.output)


if __name__ == '__main__':
  main()
