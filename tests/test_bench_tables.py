"""The benchmark tables in BENCHMARKS.md and the README are the ones benchmarks/table.py makes from
their committed JSON lines (so no number there is typed by hand)."""

import glob
import importlib.util
import os
import re

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


@pytest.mark.parametrize('doc', ['BENCHMARKS.md', 'README.md', 'docs/optimizer.md'])
def test_cited_results_files_are_committed(doc):
  """Every results file a document names exists: full paths under results/, and the short
  `-NAME.jsonl` form BENCHMARKS.md uses for results/bench/DATE-DEVICE-NAME.jsonl. (A path that
  ends in '-' or '_' is a prefix for a family of files and must match at least one.)"""
  with open(os.path.join(REPO, doc)) as f:
    text = f.read()
  missing = []
  for path in re.findall(r'results/[\w./-]+', text):
    path = path.rstrip('.,')
    if path.endswith(('-', '_')):
      ok = glob.glob(os.path.join(REPO, path) + '*')
    else:
      ok = os.path.exists(os.path.join(REPO, path))
    if not ok:
      missing.append(path)
  for name in re.findall(r'`-([\w-]+\.jsonl)`', text):
    if not glob.glob(os.path.join(REPO, 'results', 'bench', f'*-{name}')):
      missing.append(name)
  assert not missing, missing


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


def test_trace_top_reads_one_device_and_counts_overlap_once(tmp_path):
  """benchmarks/trace_top.py: kernels summed by name on device tracks (all, or device N only),
  and the time any kernel of a device runs, with kernels on two streams counted once."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'trace_top', os.path.join(REPO, 'benchmarks', 'trace_top.py'))
  trace_top = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(trace_top)
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}
          for pid, name in ((1, '/device:GPU:0'), (2, '/device:GPU:1'), (3, '/host:CPU'))]
  kernels = [  # (pid, name, start us, duration us); on GPU 0 a matmul overlaps an all-gather.
      (1, 'gemm', 0, 100), (1, 'nccl_all_gather', 50, 100), (1, 'gemm', 300, 100),
      (2, 'gemm', 0, 400), (3, 'python', 0, 1000)]
  events = meta + [{'ph': 'X', 'pid': p, 'name': n, 'ts': t, 'dur': d} for p, n, t, d in kernels]
  path = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  gpu0 = trace_top.device_events(str(path), device=0)
  assert sorted(e['name'] for e in gpu0) == ['gemm', 'gemm', 'nccl_all_gather']
  assert len(trace_top.device_events(str(path))) == 4  # both GPUs, not the host
  rows = {r['name']: r for r in trace_top.summarise(gpu0, steps=2)}
  assert rows['gemm']['ms_per_step'] == pytest.approx(0.1)  # 200 us over 2 steps
  assert rows['gemm']['launches_per_step'] == 1.0
  # Busy 0-150 and 300-400 us: 250 us over 2 steps, where the kernels sum to 300.
  assert trace_top.union_ms(gpu0, steps=2) == pytest.approx(0.125)


def test_update_kernels_are_the_fusions_writing_the_new_state(monkeypatch):
  """benchmarks/update_kernels.py: the entry's fusions whose results reach its ROOT through
  get-tuple-element / bitcast / optimization barriers, and no fusion that only feeds them."""
  monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))  # it reads HLO with live_buffers
  spec = importlib.util.spec_from_file_location(
      'update_kernels', os.path.join(REPO, 'benchmarks', 'update_kernels.py'))
  update_kernels = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(update_kernels)
  hlo = '\n'.join([
      '%fused_a (p: f32[4]) -> f32[4] {', '  ROOT %x = f32[4]{0} negate(%p)', '}', '',
      'ENTRY %main (p0: f32[4], p1: f32[4]) -> (f32[4], f32[4], f32[]) {',
      '  %p0 = f32[4]{0} parameter(0)', '  %p1 = f32[4]{0} parameter(1)',
      '  %grad.1 = f32[4]{0} fusion(%p0), kind=kLoop, calls=%fused_a',
      '  %update.2 = (f32[4]{0}, f32[4]{0}) fusion(%grad.1, %p1), kind=kLoop, calls=%fused_a',
      '  %gte.3 = f32[4]{0} get-tuple-element(%update.2), index=0',
      '  %barrier = (f32[4]{0}, f32[4]{0}) opt-barrier(%gte.3, %p1)',
      '  %gte.4 = f32[4]{0} get-tuple-element(%barrier), index=0',
      '  %other.5 = f32[4]{0} fusion(%gte.4), kind=kLoop, calls=%fused_a',
      '  %norm = f32[] fusion(%grad.1), kind=kInput, calls=%fused_a',
      '  %dot = f32[4]{0} custom-call(%p0), custom_call_target="__cublas$gemm"',
      '  ROOT %t = (f32[4]{0}, f32[4]{0}, f32[]) tuple(%other.5, %gte.4, %norm)',
      '}'])
  assert update_kernels.state_writers(hlo) == {'other_5', 'update_2', 'norm'}
  line = {'tag': 't', 'device_ms_per_step': 10.0,
          'kernels': [{'name': 'update_2', 'ms_per_step': 2.0, 'launches_per_step': 1.0},
                      {'name': 'norm', 'ms_per_step': 0.5, 'launches_per_step': 2.0},
                      {'name': 'grad_1', 'ms_per_step': 5.0, 'launches_per_step': 1.0}]}
  out = update_kernels.summary(line, update_kernels.state_writers(hlo))
  assert out['update_ms_per_step'] == 2.5 and out['update_launches_per_step'] == 3.0
  assert out['update_kernels'] == ['norm', 'update_2']


def test_live_buffers_estimates_the_peak_and_what_is_held():
  """benchmarks/live_buffers.py on a scheduled entry computation: a buffer lives from its
  instruction to its last use; bitcasts share it, a dynamic-update-slice fusion writes into its
  operand's, a custom call into the operand it is aliased to; parameters are not counted."""
  spec = importlib.util.spec_from_file_location(
      'live_buffers', os.path.join(REPO, 'benchmarks', 'live_buffers.py'))
  live_buffers = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(live_buffers)
  fwd = 'metadata={op_name="jit(s)/jvp(T)/layer_%d/mul"}'
  hlo = '\n'.join([
      'ENTRY %main (p: f32[1024]) -> (f32[4], f32[256]) {',
      '  %p = f32[1024]{0} parameter(0)',
      '  %a = f32[1024]{0} fusion(%p), kind=kLoop, calls=%f, ' + fwd % 0,      # 4 KiB
      '  %b = f32[2048]{0} fusion(%p), kind=kLoop, calls=%f, ' + fwd % 1,      # 8 KiB
      '  %b2 = f32[2,1024]{1,0} bitcast(%b)',
      '  %u = f32[2048]{0} fusion(%b, %a), kind=kLoop, calls=%f, '
      'metadata={op_name="jit(s)/transpose(jvp(T))/dynamic_update_slice"}',  # in place in b
      '  %k = (f32[1024]{0}, f32[8]{0}) custom-call(%a, %u), custom_call_target="k", '
      'output_to_operand_aliasing={{0}: (0, {})}, metadata={op_name="jit(s)/upd"}',
      '  %c = f32[4]{0} fusion(%k#0, %b2, %u), kind=kLoop, calls=%f',  # peak: a, b, k#1, c
      '  %d = f32[256]{0} fusion(%c), kind=kLoop, calls=%f',
      '  ROOT %t = (f32[4]{0}, f32[256]{0}) tuple(%c, %d)',
      '}'])
  insts = live_buffers.parse(hlo)
  assert [i.opcode for i in insts][:3] == ['parameter', 'fusion', 'fusion']
  best, at, live = live_buffers.peak(insts)
  assert insts[at].name == 'c'
  assert live == {'a', 'b', 'k#1', 'c'}
  assert best == 4096 + 8192 + 32 + 16
  rows = live_buffers.groups(live, insts)
  assert rows[0] == (('f32[2048]', 'fwd', 'jit(s)/jvp(T)/layer_N/mul'), 8192, 1)
  assert rows[1] == (('f32[1024]', 'fwd', 'jit(s)/jvp(T)/layer_N/mul'), 4096, 1)
  # An async in-place dynamic-update-slice shares its target's buffer, as does its async-done;
  # a custom call writing into an argument adds nothing.
  dus = 'metadata={op_name="jit(s)/transpose(jvp(T))/dynamic_update_slice"}'
  hlo = '\n'.join([
      'ENTRY %main (p: f32[1024]) -> (f32[2048], f32[1024]) {',
      '  %p = f32[1024]{0} parameter(0)',
      '  %g = f32[2048]{0} fusion(%p), kind=kLoop, calls=%f',
      '  %x = f32[16]{0} fusion(%p), kind=kLoop, calls=%f',
      '  %s = ((f32[2048]{0}, f32[16]{0}), f32[2048]{0}, u32[]) async-start(%g, %x), '
      'calls=%a, ' + dus,
      '  %d = f32[2048]{0} async-done(%s), ' + dus,
      '  %k = f32[1024]{0} custom-call(%p), custom_call_target="k", '
      'output_to_operand_aliasing={{}: (0, {})}, metadata={op_name="jit(s)/upd"}',
      '  ROOT %t = (f32[2048]{0}, f32[1024]{0}) tuple(%d, %k)',
      '}'])
  best, _, live = live_buffers.peak(live_buffers.parse(hlo))
  assert best == 8192 + 64 and live == {'g', 'x'}
