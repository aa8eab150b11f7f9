"""The benchmark tables in BENCHMARKS.md and the README are the ones benchmarks/table.py makes from
their committed JSON lines (so no number there is typed by hand)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'table', os.path.join(REPO, 'benchmarks', 'table.py'))
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


@pytest.mark.parametrize('doc', ['BENCHMARKS.md', 'README.md'])
def test_tables_match_their_source(doc):
  with open(os.path.join(REPO, doc)) as f:
    found = table.blocks(f.read())
  assert {name for name, _, _ in found} >= ({'compare', 'scaling'} if doc == 'BENCHMARKS.md'
                                            else {'compare'})
  for name, source, current in found:
    assert os.path.exists(os.path.join(REPO, source)), source
    assert current == table.render(name, source, REPO), (doc, name, source)


def test_ratio_and_efficiency_are_computed(tmp_path):
  rows = [
      {'framework': 'transformers', 'model': 'gemma2_2b', 'method': 'full', 'n_devices': 1,
       'tokens_per_s': 1000.0, 'peak_memory_gib': 40.0, 'optimizer': 'adamw_fused',
       'attn_implementation': 'sdpa', 'gradient_checkpointing': False},
      {'framework': 'gemma_sft_jax', 'model': 'gemma2_2b', 'method': 'full', 'n_devices': 1,
       'tokens_per_s': 1500.0, 'mfu': 0.3, 'peak_memory_gib': 20.0, 'remat': 'dots'},
      {'framework': 'gemma_sft_jax', 'model': 'gemma2_2b', 'method': 'full', 'n_devices': 2,
       'tokens_per_s': 2700.0, 'tokens_per_s_per_device': 1350.0, 'mfu': 0.27,
       'peak_memory_gib': 12.0, 'remat': 'dots'}]
  compare, scaling = table.compare_table(rows), table.scaling_table(rows)
  assert '| Gemma 2 2B full SFT | 1,500 | 30.0% | 20.0 | `dots` | 1,000 | 40.0 |' in compare
  assert compare.rstrip().endswith('| 1.50× |')
  assert '| Gemma 2 2B full SFT | 1,500 | 1,350 | 12.0 | 90% |' in scaling
