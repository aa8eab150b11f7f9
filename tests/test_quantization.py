"""The 8-bit blockwise format of the optimizer moments (gemma_sft_jax.training.quantization): the dynamic
maps, the nearest code, round-trip error bounds, zeros and padding."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_sft_jax.training import quantization as quant


# ---- 1. The 8-bit format. -----------------------------------------------------------------------

def _worst_case_error(table: np.ndarray, lo: float) -> float:
  """sup over v in [lo, 1] of the distance from v to its nearest code (v = x / absmax)."""
  return max(np.diff(table).max() / 2, table[0] - lo, 1.0 - table[-1])


def test_dynamic_maps_structure_and_spacing():
  signed, unsigned = quant.dynamic_map(signed=True), quant.dynamic_map(signed=False)
  for t in (signed, unsigned):
    assert t.shape == (256,) and t.dtype == np.float32 and np.all(np.diff(t) > 0)
    assert 0.0 in t and t[-1] == 1.0
  # Signed: 127 negative codes mirroring 127 positive ones, plus 0 and +1 (no -1).
  pos = signed[signed > 0][:-1]
  np.testing.assert_array_equal(np.sort(-signed[signed < 0]), pos)
  assert signed[0] == -pos[-1] and len(pos) == 127
  assert unsigned[0] == 0.0 and len(unsigned[unsigned > 0]) == 255
  # Smallest non-zero codes: 10^-6 · 0.55 (one fraction code in the lowest decade) and
  # 10^-6 · 0.325 (two), so seven decades of dynamic range below the block absmax.
  np.testing.assert_allclose(pos[0], 0.55e-6, rtol=1e-6)
  np.testing.assert_allclose(unsigned[1], 0.325e-6, rtol=1e-6)
  # The widest code spacing is the top decade's: 0.9/64 (signed), 0.9/128 (unsigned). So the
  # worst-case round-trip error is half of it, 0.00703 resp. 0.00352 of the block absmax
  # (for the signed map also the gap from -1 to its most negative code, 0.9/128 as well).
  np.testing.assert_allclose(_worst_case_error(signed, -1.0), 0.9 / 128, rtol=1e-5)
  np.testing.assert_allclose(_worst_case_error(unsigned, 0.0), 0.9 / 256, rtol=1e-5)


@pytest.mark.parametrize('lookup', ['selected', 'looked_up'])
@pytest.mark.parametrize('signed', [True, False])
def test_nearest_code_index_equals_searchsorted_on_midpoints(signed, lookup):
  """The nearest code (eight comparisons give the segment, three per-segment constants the
  index) is searchsorted on the map's midpoints, exactly, except within a float32 ulp of a
  midpoint (a tie up to rounding, exact ties included), where it may pick the other neighbour.
  Its constants selected by the comparisons (XLA's update) or looked up by segment (the
  kernel's) give the same indices."""
  t = quant.dynamic_map(signed=signed)
  mids = (t[:-1] + t[1:]) / 2
  lo = -1.0 if signed else 0.0
  rng = np.random.default_rng(1)
  mag = 10.0 ** rng.uniform(-9, 0, 200_000)
  parts = [np.linspace(lo, 1.0, 200_001), rng.uniform(lo, 1.0, 200_000),
           mag * (rng.choice([-1, 1], mag.size) if signed else 1),
           mids, np.nextafter(mids, 2), np.nextafter(mids, -2), t, np.nextafter(t, 2),
           np.nextafter(t, -2), quant.code_segments(signed=signed).thresholds,
           [0.0, -0.0, 1.0] + [10.0 ** -k for k in range(8)]]
  x = np.clip(np.concatenate([np.asarray(p, np.float32) for p in parts]), lo, 1.0)
  if signed:
    x = np.concatenate([x, -x])
  tables = jnp.asarray(quant.code_segments(signed=signed).tables)
  find = {'selected': None, 'looked_up': lambda k, s: tables[k][s]}[lookup]
  got = np.asarray(jax.jit(lambda v: quant.nearest_code_index(v, signed=signed, lookup=find))(x))
  want = np.searchsorted(mids, x, side='left')
  a = np.abs(x)
  nearest_mid = mids[np.clip(np.searchsorted(mids, a), 1, 254)[:, None] + np.array([-1, 0])]
  tie = np.min(np.abs(nearest_mid - a[:, None]), axis=1) <= np.spacing(a)
  np.testing.assert_array_equal(got[~tie], want[~tie])
  assert np.all(np.abs(got[tie] - want[tie]) <= 1)
  assert tie.sum() < 0.01 * x.size and np.sum(got != want) < tie.sum()
  assert got.min() == 0 and got.max() == 255


def test_code_segments_cover_the_map():
  """Each segment's first index and `last` span exactly the codes between its thresholds."""
  for signed in (True, False):
    t = quant.dynamic_map(signed=signed)
    seg = quant.code_segments(signed=signed)
    bounds = np.concatenate([[0.0], seg.thresholds, [1.0]])
    for s in range(9):
      first = quant.segment_first_index(s, signed=signed)
      last = first + int(seg.tables[2, s])
      inside = np.nonzero((t > bounds[s] if s else t >= 0) & (t <= bounds[s + 1]))[0]
      assert (inside[0], inside[-1]) == (first, last), (signed, s)


def _data(kind: str, shape, rng):
  if kind == 'normal':
    return rng.normal(size=shape)
  if kind == 'student_t2':  # heavy tails: a few entries dominate each block's absmax
    return rng.standard_t(2, size=shape)
  if kind == 'lognormal':
    return rng.lognormal(0.0, 2.0, size=shape) * rng.choice([-1, 1], size=shape)
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['normal', 'student_t2', 'lognormal'])
@pytest.mark.parametrize('signed', [True, False])
def test_blockwise_roundtrip_error_bounds(kind, signed):
  """Per element: |x - x̂| ≤ absmax_block · (half the gap between the two codes around x/absmax);
  hence per block: max |x - x̂| ≤ c · absmax with c = 0.9/128 (signed) or 0.9/256 (unsigned)."""
  rng = np.random.default_rng(1)
  x = _data(kind, (37, 1000), rng).astype(np.float32)  # 1000 = 3 full blocks + a padded one
  if not signed:
    x = np.square(x)  # second-moment-like: non-negative, squared dynamic range
  q = jax.jit(lambda v: quant.quantize_blockwise(v, signed=signed))(x)
  assert q.codes.dtype == (np.int8 if signed else np.uint8) and q.codes.shape == (37, 1000)
  assert q.scales.dtype == np.float32 and q.scales.shape == (37, 4)
  xhat = np.asarray(quant.dequantize_blockwise(q))
  err = np.abs(x - xhat)

  pad = np.pad(x, [(0, 0), (0, 24)]).reshape(37, 4, 256)
  absmax = np.abs(pad).max(-1)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  absmax_el = np.repeat(absmax, 256, -1)[:, :1000]

  t = quant.dynamic_map(signed=signed)
  v = x / absmax_el
  k = np.clip(np.searchsorted(t, v), 1, 255)
  half_gap = np.where(v <= t[0], t[0] - v, (t[k] - t[k - 1]) / 2)
  slack = 1e-6 * absmax_el  # fp32 rounding of divide / multiply
  assert np.all(err <= half_gap * absmax_el + slack)

  c = 0.9 / 128 if signed else 0.9 / 256
  per_block = np.pad(err, [(0, 0), (0, 24)]).reshape(37, 4, 256).max(-1)
  assert np.all(per_block <= c * absmax * (1 + 1e-5))
  # Entries ≥ 10% of their block's absmax are in the top decade: relative error ≤ c / 0.1.
  big = np.abs(v) >= 0.1
  assert np.all(err[big] <= (c / 0.1) * np.abs(x[big]) * (1 + 1e-5))


def test_quantize_zero_and_padding():
  q = quant.quantize_blockwise(jnp.zeros((3, 300)), signed=True)
  assert np.all(np.asarray(quant.dequantize_blockwise(q)) == 0)
  assert q.scales.shape == (3, 2)
  q = quant.quantize_blockwise(jnp.zeros((5,)), signed=False)
  assert q.codes.shape == (5,) and q.scales.shape == (1,)
  assert np.all(np.asarray(q.codes) == 0)
