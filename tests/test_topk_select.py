"""pallas_kernels.topk_select against its reference (lax.top_k, then index order), on fresh
random inputs with many ties. `TopKTests` holds the checks; `TestInterpret` runs them on the
CPU in interpret mode, `TestGPU` compiled on a GPU (pytest --gpu -m gpu)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk_select import top_k_select, top_k_select_reference

POISON = 1e4  # an unwritten value slot would keep it (an index slot: -1)


def tied_rows(seed, rows, n, dtype=jnp.float32):
  """Random rows with many ties (few distinct values), -inf entries and signed zeros."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-6, 6, (rows, n)).astype(np.float32) * rng.choice([0.5, 1.0, 1e-30, 3e30])
  x[rng.random((rows, n)) < 0.1] = -np.inf
  x[rng.random((rows, n)) < 0.05] = -0.0
  x[0, : n // 2] = -np.inf  # a row mostly -inf
  return jnp.asarray(x).astype(dtype)


class TopKTests:
  interpret: bool

  def check(self, x, k, **kw):
    idx, vals = top_k_select(x, k, interpret=self.interpret, poison=POISON, **kw)
    ref_idx, ref_vals = top_k_select_reference(x, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    assert idx.dtype == jnp.int32 and vals.dtype == x.dtype

  @pytest.mark.parametrize(
    "rows, n, k",
    [(37, 1000, 32), (16, 1024, 1), (5, 77, 77), (3, 9, 4), (24, 512, 100)],
  )
  def test_matches_lax_top_k(self, rows, n, k):
    self.check(tied_rows(rows * n + k, rows, n), k)

  def test_continuous_values(self):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((19, 700)), jnp.float32)
    self.check(x, 50)

  def test_rows_with_fewer_finite_entries_than_k(self):
    # ties at -inf below the finite entries; a row of one value; a row of 8 copies of 32
    # values (the top 32: the 8 copies of each of the 4 largest)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[0, 5:] = -np.inf
    x[1] = 2.5
    x[2] = np.tile(np.arange(32, dtype=np.float32), 8)
    self.check(jnp.asarray(x), 32)
    self.check(jnp.asarray(x), 32, tile=64, block_rows=4)

  def test_rows_longer_than_a_tile(self):
    # re-read in tiles in every pass; the tie break and the slots run across tiles
    self.check(tied_rows(4, 6, 1000), 300, tile=128, block_rows=2)

  def test_low_precision_inputs(self):
    self.check(tied_rows(5, 10, 300, jnp.bfloat16), 40)
    self.check(tied_rows(6, 10, 300, jnp.float16), 40)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_sixteen_bit_keys(self, dtype):
    """bf16 / f16 rows take 16 counting passes over their own bit patterns: the extremes
    (+-inf, the largest finite values, signed zeros, the smallest subnormals) in every
    row, rows of one value, rows longer than a tile (the masked tail of the last tile
    must stay below -inf), and continuous values."""
    info = jnp.finfo(dtype)
    extremes = [np.inf, -np.inf, float(info.max), -float(info.max), 0.0, -0.0]
    extremes += [float(info.smallest_subnormal), -float(info.smallest_subnormal)]
    x = np.array(tied_rows(8, 12, 300), np.float32)
    x[:, : len(extremes)] = extremes
    x[3] = -np.inf
    x[4] = 1.5
    x = jnp.asarray(x).astype(dtype)
    for k in (1, 8, 40, 300):
      self.check(x, k)
    self.check(x, 40, tile=128, block_rows=4)  # 300 = 2 tiles + a masked tail
    rng = np.random.default_rng(9)
    self.check(jnp.asarray(rng.standard_normal((21, 512)), dtype), 32)


class TestInterpret(TopKTests):
  interpret = True

  def test_bad_input(self):
    x = tied_rows(0, 4, 16)
    with pytest.raises(ValueError, match=r"\[R, n\]"):
      top_k_select(x[0], 2, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
      top_k_select(x.astype(jnp.int32), 2, interpret=True)
    for k in (0, 17, 2.0):
      with pytest.raises(ValueError, match="k must be"):
        top_k_select(x, k, interpret=True)
    with pytest.raises(ValueError, match="tile"):
      top_k_select(x, 2, interpret=True, tile=12)
    with pytest.raises(ValueError, match="block_rows"):
      top_k_select(x, 2, interpret=True, block_rows=3)


@pytest.mark.gpu
class TestGPU(TopKTests):
  interpret = False
