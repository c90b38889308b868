"""pallas_kernels.pooled_topk against its reference on fresh random inputs. `TopKTests`
holds the checks; `TestInterpret` runs them on the CPU in interpret mode, `TestGPU`
compiled on a GPU (pytest --gpu -m gpu). On a GPU the reference takes the scores of
pooled_scores' kernel (the same TF32 dot), so the picks must be exactly its."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.pooled_scores import pooled_scores
from pallas_kernels.pooled_topk import kernel, pooled_top_k, pooled_top_k_reference


def inputs(seed, n_q, n_k, h, barred=0.1):
  """Pooled means qp, kp (f32) and causal-like limits, some blocks barred on each side."""
  rng = np.random.default_rng(seed)
  qp = jnp.asarray(rng.standard_normal((n_q, h)), jnp.float32)
  kp = jnp.asarray(rng.standard_normal((n_k, h)), jnp.float32)
  q_lim = (np.arange(n_q) + 1) * max(1, n_k // n_q) - 1
  q_lim[rng.random(n_q) < barred] = -1
  k_lim = np.arange(n_k)
  k_lim[rng.random(n_k) < barred] = 2**30
  return qp, kp, jnp.asarray(q_lim, jnp.int32), jnp.asarray(k_lim, jnp.int32)


def as_sets(idx, vals):
  """Each row's picks {column: value} of finite value, and its count of -inf slots."""
  idx, vals = np.asarray(idx), np.asarray(vals)
  fin = np.isfinite(vals)
  sets = [
    dict(zip(i[f].tolist(), v[f].tolist(), strict=True))
    for i, v, f in zip(idx, vals, fin, strict=True)
  ]
  return sets, (~fin).sum(1)


class TopKTests:
  interpret: bool

  def check(self, qp, kp, q_lim, k_lim, k, **kw):
    kw = {"scale": 0.2, **kw}
    idx, vals = pooled_top_k(qp, kp, q_lim, k_lim, k=k, interpret=self.interpret, **kw)
    assert idx.shape == vals.shape == (qp.shape[0], k) and idx.dtype == jnp.int32
    scores = None
    if not self.interpret:  # the GPU's TF32 products, as the planner's score kernel makes them
      tiles = {n: kw[n] for n in ("block_m", "block_n", "tf32") if n in kw}
      s, _ = pooled_scores(qp, kp, q_lim, k_lim, scale=kw["scale"], **tiles)
      scores = jnp.where(jnp.isfinite(s), s, 0.0)
    ref = pooled_top_k_reference(qp, kp, q_lim, k_lim, k=k, scale=kw["scale"], scores=scores)
    got, got_inf = as_sets(idx, vals)
    want, want_inf = as_sets(*ref)
    np.testing.assert_array_equal(got_inf, want_inf)
    assert sum(map(len, want)) > 0 and (want_inf > 0).any()  # (rows of both kinds)
    np.testing.assert_array_equal(np.asarray(idx)[~np.isfinite(np.asarray(vals))].max(initial=0), 0)
    for row, (g, w) in enumerate(zip(got, want, strict=True)):
      assert sorted(g) == sorted(w), row
      tol = 0 if scores is not None else 1e-5
      np.testing.assert_allclose([g[c] for c in sorted(g)], [w[c] for c in sorted(w)], rtol=tol)

  @pytest.mark.parametrize(
    "n_q, n_k, h, k, tiles",
    [
      (64, 256, 128, 8, (64, 128)),  # two key tiles
      (100, 300, 32, 5, (32, 64)),  # padded rows and columns, k not a power of two
      (48, 64, 64, 1, (16, 16)),
      (32, 40, 32, 40, (16, 16)),  # k = nK: every allowed pair
    ],
  )
  def test_matches_reference(self, n_q, n_k, h, k, tiles):
    block_m, block_n = tiles
    self.check(*inputs(n_q + n_k + k, n_q, n_k, h), k, block_m=block_m, block_n=block_n)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_tile_ranges(self, dtype):
    """A 2D boundary's shapes: the first programs' rows allow nothing (vision rows of a
    text-query component) and only the keys of tiles 2-4 of 8 may be allowed (a modality
    run): programs loop over those tiles only, none in the barred programs."""
    qp, kp, q_lim, k_lim = inputs(21, 256, 512, 64, barred=0.05)
    q_lim = q_lim.at[:96].set(-1)
    k = jnp.arange(512)
    k_lim = jnp.where((k >= 128) & (k < 300), k_lim, 2**30)
    qp, kp = qp.astype(dtype), kp.astype(dtype)
    self.check(qp, kp, q_lim, k_lim, 6, block_m=32, block_n=64)
    first, end = (np.asarray(x) for x in kernel._tile_ranges(q_lim, k_lim, 32, 64))
    # (program 3's rows see keys up to 255: tiles 2 and 3)
    assert (first == end)[:3].all() and (first[3:] == 2).all()
    np.testing.assert_array_equal(end[3:], [4, 5, 5, 5, 5])

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_ties_go_to_the_lower_column(self, dtype):
    """Scores that are small integers (-1/0/1 vectors): many equal values, negative ones
    and zeros, across and inside tiles; the picks are lax.top_k's (the lowest columns
    among equals). bf16 inputs take the packed keys' path."""
    rng = np.random.default_rng(4)
    n_q, n_k, h = 32, 128, 16
    qp = jnp.asarray(rng.integers(-1, 2, (n_q, h)), dtype)
    kp = jnp.asarray(rng.integers(-1, 2, (n_k, h)), dtype)
    _, _, q_lim, k_lim = inputs(4, n_q, n_k, h)
    self.check(qp, kp, q_lim, k_lim, 6, scale=1.0, block_m=16, block_n=32)

  def test_full_f32_products(self):
    self.check(*inputs(3, 64, 128, 64), 8, tf32=False, block_m=32, block_n=32)

  def test_bfloat16_inputs(self):
    qp, kp, q_lim, k_lim = inputs(6, 64, 256, 128)
    qp, kp = qp.astype(jnp.bfloat16), kp.astype(jnp.bfloat16)
    self.check(qp, kp, q_lim, k_lim, 8, block_m=32, block_n=64)

  def test_bfloat16_inputs_past_the_packed_columns(self, monkeypatch):
    """bf16 inputs with more key blocks than a packed key holds (here: the limit set to
    0) take the (value, column) slots; the same picks. (Shapes of their own: the jitted
    call reads the limit when it traces.)"""
    monkeypatch.setattr(kernel, "MAX_PACKED_COLUMNS", 0)
    qp, kp, q_lim, k_lim = inputs(9, 48, 192, 64)
    qp, kp = qp.astype(jnp.bfloat16), kp.astype(jnp.bfloat16)
    self.check(qp, kp, q_lim, k_lim, 6, block_m=16, block_n=64)

  @pytest.mark.parametrize(
    "n_q, n_k, h, k, tiles",
    [(64, 256, 128, 8, (16, 32)), (100, 300, 32, 5, (32, 64)), (32, 40, 32, 40, (16, 16))],
  )
  def test_sorted_blocks(self, n_q, n_k, h, k, tiles):
    """sort_blocks: limits in no order (a grid-permuted view's: the blocks shuffled), so
    that the tiles hold allowed pairs everywhere; each program visits its sorted prefix
    only, columns out of order. The picks are lax.top_k's."""
    qp, kp, q_lim, k_lim = inputs(n_q * 7 + k, n_q, n_k, h)
    rng = np.random.default_rng(n_k)
    q_lim = jnp.asarray(rng.permutation(np.asarray(q_lim)))
    k_lim = jnp.asarray(rng.permutation(np.asarray(k_lim)))
    block_m, block_n = tiles
    self.check(qp, kp, q_lim, k_lim, k, block_m=block_m, block_n=block_n, sort_blocks=True)

  def test_sorted_blocks_break_ties_by_column(self):
    """sort_blocks with many equal scores (0/1 vectors): a later tile may hold a lower
    column of the same value, which must replace a worst slot of that value."""
    rng = np.random.default_rng(11)
    n_q, n_k, h = 32, 128, 16
    qp = jnp.asarray(rng.integers(0, 2, (n_q, h)), jnp.float32)
    kp = jnp.asarray(rng.integers(0, 2, (n_k, h)), jnp.float32)
    q_lim = rng.integers(-1, n_k, n_q)
    q_lim[:2] = -1, 1  # rows with no allowed pair, and with two
    q_lim = jnp.asarray(q_lim, jnp.int32)
    k_lim = jnp.asarray(rng.permutation(n_k), jnp.int32)
    kw = dict(scale=1.0, block_m=16, block_n=32, sort_blocks=True)
    self.check(qp, kp, q_lim, k_lim, 6, **kw)
    self.check(qp.astype(jnp.bfloat16), kp.astype(jnp.bfloat16), q_lim, k_lim, 3, **kw)


class TestInterpret(TopKTests):
  interpret = True

  def test_packed_keys_order_as_top_k(self):
    """Packed keys of f32 scores: a greater key exactly where (the score rounded to bf16,
    -column) is greater (-0 equal to +0), and `unpack` gives back the rounded score and
    the column."""
    rng = np.random.default_rng(2)
    special = [0.0, -0.0, np.inf, -np.inf, -1e-7, 1e-7, 3e38, -3e38, -1e-45, 1e-45]
    vals = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-4, 4, 500), special])
    vals = vals.astype(np.float32)  # (and the next f32 up: equal in bf16, mostly)
    vals = np.concatenate([vals, np.nextafter(vals, np.float32(np.inf))])
    cols = rng.permutation(2 * 2**15)[: vals.size].astype(np.int32)
    keys = np.asarray(kernel._pack(jnp.asarray(vals)[None], jnp.asarray(cols)))[0]
    rounded = np.asarray(jnp.asarray(vals, jnp.bfloat16), np.float64)
    want = (rounded[:, None] > rounded[None, :]) | (
      (rounded[:, None] == rounded[None, :]) & (cols[:, None] < cols[None, :])
    )
    np.testing.assert_array_equal(keys[:, None] > keys[None, :], want)
    idx, back = kernel.unpack(jnp.asarray(keys), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(idx), cols)
    np.testing.assert_array_equal(np.asarray(back, np.float64), rounded)  # (-0 comes back +0)

  def test_bad_input(self):
    qp, kp, q_lim, k_lim = inputs(0, 16, 32, 16)
    call = lambda *a, **kw: pooled_top_k(*a, scale=1.0, interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="k=0 must be in"):
      call(qp, kp, q_lim, k_lim, k=0)
    with pytest.raises(ValueError, match="k=33 must be in"):
      call(qp, kp, q_lim, k_lim, k=33)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
      call(qp.astype(jnp.bfloat16), kp, q_lim, k_lim, k=2)
    with pytest.raises(ValueError, match="power of two"):
      call(qp, kp, q_lim, k_lim, k=2, block_n=48)
    with pytest.raises(ValueError, match="k_lim must be int32"):
      call(qp, kp, q_lim, k_lim[:8], k=2)
    with pytest.raises(ValueError, match="qp must be"):
      call(qp, kp[:, :8], q_lim, k_lim, k=2)


@pytest.mark.gpu
class TestGPU(TopKTests):
  interpret = False
