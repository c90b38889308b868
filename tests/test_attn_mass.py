"""pallas_kernels.attn_mass against its reference, on fresh random inputs. `MassTests`
holds the checks; `TestInterpret` runs them on the CPU in interpret mode, `TestGPU`
compiled on a GPU (pytest --gpu -m gpu)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attn_mass import attention_mass, attention_mass_reference
from pallas_kernels.attn_mass import kernel as mass_kernel

TOL = {"float32": 2e-5, "bfloat16": 2e-5, "float16": 2e-5}  # f32 math on exact inputs


def inputs(seed, n_rows, length, h, dtype=jnp.bfloat16, gather=True, consecutive=True):
  """q [R, H], k [L, H], key_lim [L] (causal positions, some keys barred), q_lim [R] (the
  last queries, two rows barred), base [R] (the rows' ranks), perm [L] or None."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((n_rows, h)) * 2, jnp.float32).astype(dtype)
  k = jnp.asarray(rng.standard_normal((length, h)), jnp.float32).astype(dtype)
  perm = rng.permutation(length) if gather else np.arange(length)
  barred = rng.random(length) < 0.2
  key_lim = np.where(barred, 2**30, perm).astype(np.int32)  # a key's original position
  if consecutive:
    q_lim = length - 1 - np.arange(n_rows)
  else:
    q_lim = rng.choice(length, n_rows, replace=False)
  q_lim[[3, n_rows - 1]] = -1  # rows with nothing allowed
  base = q_lim.copy()
  base[5] = length - 1  # the largest base
  return (
    q,
    k,
    jnp.asarray(key_lim),
    jnp.asarray(q_lim, jnp.int32),
    jnp.asarray(base, jnp.int32),
    jnp.asarray(perm, jnp.int32) if gather else None,
  )


class MassTests:
  interpret: bool
  ranges_bit_for_bit = True  # test_key_range: a key range's numbers as barred keys' exactly

  def check(self, q, k, key_lim, q_lim, base, perm, index=None, **kw):
    kw = dict(scale=0.3, perm=perm, index=index, **kw)
    col, slash = attention_mass(q, k, key_lim, q_lim, base, interpret=self.interpret, **kw)
    kw.pop("tile", None), kw.pop("tiles", None)
    ref_col, ref_slash = attention_mass_reference(q, k, key_lim, q_lim, base, **kw)
    tol = TOL[jnp.dtype(q.dtype).name]
    np.testing.assert_allclose(np.asarray(col), np.asarray(ref_col), rtol=tol, atol=1e-6)
    np.testing.assert_allclose(np.asarray(slash), np.asarray(ref_slash), rtol=tol, atol=1e-6)
    # each row with an allowed key holds mass 1 in both views of it
    total = float((np.asarray(q_lim) >= 0).sum())
    assert abs(float(col.sum()) - float(ref_col.sum())) < 1e-3 and float(col.sum()) <= total + 1e-3

  @pytest.mark.parametrize(
    "n_rows, length, h, gather, consecutive",
    [(64, 1024, 128, True, True), (16, 512, 64, False, True), (32, 256, 32, True, False)],
  )
  def test_matches_reference(self, n_rows, length, h, gather, consecutive):
    self.check(*inputs(length + n_rows, n_rows, length, h, gather=gather, consecutive=consecutive))

  @pytest.mark.parametrize("heads_inner", [False, True])
  def test_p_stored_in_float16(self, heads_inner):
    """p_dtype="float16": the slash sums within 1e-3 relative of the reference (p kept as
    p * 2^15 in f16), the column sums as tight as in f32 (within 1e-3 too with
    TILE_STATS); one head alone or batched."""
    q, k, key_lim, q_lim, base, perm = inputs(11, 32, 512, 64)
    kw = dict(scale=0.3, perm=perm)
    ref_col, ref_slash = attention_mass_reference(q, k, key_lim, q_lim, base, **kw)

    def one(qh):
      return attention_mass(
        qh,
        k,
        key_lim,
        q_lim,
        base,
        p_dtype="float16",
        heads_inner=heads_inner,
        interpret=self.interpret,
        **kw,
      )

    col, slash = jax.vmap(one)(jnp.stack([q, q]))  # two heads, the same rows
    # (with TILE_STATS the column sums read the stored f16 values too)
    col_tol = 1e-3 if mass_kernel.TILE_STATS else 2e-5
    for c, sl in zip(col, slash, strict=True):
      np.testing.assert_allclose(np.asarray(c), np.asarray(ref_col), rtol=col_tol, atol=1e-6)
      np.testing.assert_allclose(np.asarray(sl), np.asarray(ref_slash), rtol=1e-3, atol=1e-7)
    # not the f32 values themselves: the option changes what pass 3 reads
    _, slash32 = attention_mass(q, k, key_lim, q_lim, base, interpret=self.interpret, **kw)
    assert not np.array_equal(np.asarray(slash[0]), np.asarray(slash32))

  @pytest.mark.parametrize(
    "consecutive, max_offset, heads_inner",
    [(True, 100, False), (False, 300, False), (True, 37, "per_head"), (True, 64, "shared")],
  )
  def test_window_of_offsets(self, consecutive, max_offset, heads_inner):
    """max_offset W: slash[:W] as the reference's (p computed only on the key tiles within
    W of a row's base), no column sums; alone, or vmapped over heads with a base per head
    (the window per head) or one base for all (as the planner's stride estimates)."""
    q, k, key_lim, q_lim, base, perm = inputs(12, 16, 512, 32, consecutive=consecutive)
    kw = dict(scale=0.3, perm=perm, tile=32)
    if heads_inner == "shared":
      bases = jnp.stack([base, base])
    else:
      bases = jnp.stack([base, jnp.where(base >= 0, base // 2, -1)])
    qs = jnp.stack([q, -q])

    def one(qh, bh):
      return attention_mass(
        qh,
        k,
        key_lim,
        q_lim,
        bh,
        max_offset=max_offset,
        heads_inner=bool(heads_inner),
        interpret=self.interpret,
        **kw,
      )

    kw.pop("tile")
    if heads_inner:
      shared = heads_inner == "shared"
      col, slash = jax.vmap(one, (0, None if shared else 0))(qs, base if shared else bases)
    else:
      col, slash = one(q, base)
    assert col is None
    for i in range(2 if heads_inner else 1):
      _, want = attention_mass_reference(qs[i], k, key_lim, q_lim, bases[i], **kw)
      got = slash[i] if heads_inner else slash
      assert got.shape == (max_offset,)
      np.testing.assert_allclose(
        np.asarray(got), np.asarray(want[:max_offset]), rtol=2e-5, atol=1e-6
      )
      assert float(got.min()) >= 0 and float(got.sum()) > 0.1  # some mass in the window

  @pytest.mark.parametrize(
    "max_offset, heads_inner, range_tiles",
    [(None, False, None), (None, True, None), (40, True, None), (40, False, None),
     (None, False, 2), (None, True, 5), (None, True, 16)],
  )  # fmt: skip
  def test_key_range(self, max_offset, heads_inner, range_tiles):
    """key_range (lo, hi): the numbers of the keys outside it barred by key_lim (bit for
    bit: the skipped tiles add nothing), and the reference's; per head under vmap (a range
    inside tiles, one over every key, an empty one), heads innermost or not, with and
    without the window of offsets. range_tiles: programs over the range's tiles only, 2
    or 5 of them for up to 16 tiles (a loop each), or 16 (L's tiles: one per tile); with
    2 or 5, pass 1's too (STATS_SHARE_RANGE: the same numbers to rounding)."""
    q, k, key_lim, q_lim, base, perm = inputs(31, 16, 512, 32)
    ranges = jnp.asarray([[300, 500], [0, 512], [200, 200]], jnp.int32)
    qs = jnp.stack([q, -q, q * 0.5])
    kw = dict(scale=0.3, perm=perm)

    def run(qh, kl, r):
      return attention_mass(
        qh, k, kl, q_lim, base, key_range=r, tile=32, heads_inner=heads_inner,
        max_offset=max_offset, interpret=self.interpret,
        range_tiles=range_tiles if r is not None else None, **kw,
      )  # fmt: skip

    j = jnp.arange(512)
    barred = jnp.stack([jnp.where((j < r[0]) | (j >= r[1]), 2**30, key_lim) for r in ranges])
    col, slash = jax.vmap(run, (0, None, 0))(qs, key_lim, ranges)
    col_b, slash_b = jax.vmap(lambda qh, kl: run(qh, kl, None))(qs, barred)
    # (bit for bit unless pass 1's programs share the range's tiles: STATS_SHARE_RANGE,
    # whose row sums add the tiles in other groups; or the two-pass form compiled, whose
    # per-tile scales XLA computes in fusions of its own in each program: 1e-7 apart)
    shared = range_tiles is not None and range_tiles < 16 and max_offset is None
    shared = shared or not self.ranges_bit_for_bit
    same = np.testing.assert_array_equal
    if shared:
      same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9)
    same(np.asarray(slash), np.asarray(slash_b))
    if max_offset is None:
      same(np.asarray(col), np.asarray(col_b))
    else:
      assert col is None and slash.shape == (3, max_offset)
    for i in range(3):
      ref_col, ref_slash = attention_mass_reference(qs[i], k, barred[i], q_lim, base, **kw)
      np.testing.assert_allclose(
        np.asarray(slash[i]), np.asarray(ref_slash[: slash.shape[1]]), rtol=2e-5, atol=1e-6
      )
      if max_offset is None:
        np.testing.assert_allclose(np.asarray(col[i]), np.asarray(ref_col), rtol=2e-5, atol=1e-6)
        assert not np.asarray(col[i])[np.asarray(barred[i]) == 2**30].any()
    assert float(slash[0].sum()) > 0.1 and not np.asarray(slash[2]).any()  # the empty range

  @pytest.mark.parametrize(
    "span, tiles, ranged, heads_inner",
    [(1, 1, False, False), (3, 2, True, True), (5, 8, True, False), (64, 2, False, True)],
  )
  def test_span_tiles(self, span, tiles, ranged, heads_inner):
    """span_tiles: programs for `span` tiles from the first visited one. A window (and a
    key range) wider than that is shared out, a loop per program (span 1, 3, 5 over a
    window of about 6 tiles of 32 keys), and a span past L is cut to L's tiles; the slash
    sums are the reference's, per head (bases and ranges of their own) under vmap."""
    q, k, key_lim, q_lim, base, perm = inputs(17, 16, 512, 32)
    bases = jnp.stack([base, jnp.where(base >= 0, base - 200, -1)])
    ranges = jnp.asarray([[250, 512], [0, 400]], jnp.int32)
    qs = jnp.stack([q, -q])
    kw = dict(scale=0.3, perm=perm)

    def run(qh, bh, r):
      return attention_mass(
        qh, k, key_lim, q_lim, bh, key_range=r if ranged else None, tile=32, tiles=tiles,
        heads_inner=heads_inner, max_offset=150, span_tiles=span, interpret=self.interpret,
        **kw,
      )  # fmt: skip

    col, slash = jax.vmap(run)(qs, bases, ranges)
    assert col is None and slash.shape == (2, 150)
    j = jnp.arange(512)
    for i in range(2):
      r = ranges[i]
      kl = jnp.where((j < r[0]) | (j >= r[1]), 2**30, key_lim) if ranged else key_lim
      _, want = attention_mass_reference(qs[i], k, kl, q_lim, bases[i], **kw)
      np.testing.assert_allclose(np.asarray(slash[i]), np.asarray(want[:150]), rtol=2e-5, atol=1e-6)
      assert float(slash[i].sum()) > 0.1

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
  def test_other_dtypes(self, dtype):
    self.check(*inputs(3, 16, 256, 64, dtype), tile=64)

  def test_programs_with_several_tiles(self):
    # 9 tiles of 32 keys, 4 per program: the last program has one
    self.check(*inputs(8, 16, 288, 32), tile=32, tiles=4)

  def test_in_place_slice_of_a_4d_input(self):
    q, k, key_lim, q_lim, base, perm = inputs(4, 16, 256, 64)
    k4 = jnp.stack([jnp.roll(k, 1, 0), k])[:, :, None].repeat(3, 2)  # [2, L, 3, H]
    k4 = k4.at[1, :, 0].set(0.5)
    self.check(q, k4, key_lim, q_lim, base, perm, index=jnp.asarray([1, 2], jnp.int32))

  def test_vmapped_over_the_index(self):
    q, k, key_lim, q_lim, base, perm = inputs(5, 16, 128, 32)
    k4 = jnp.stack([k, -k])[:, :, None]  # [2, L, 1, H]
    index = jnp.asarray([[1, 0], [0, 0]], jnp.int32)
    col, slash = jax.vmap(
      lambda ix: attention_mass(
        q, k4, key_lim, q_lim, base, scale=0.3, perm=perm, index=ix, interpret=self.interpret
      )
    )(index)
    for i in range(2):
      rc, rs = attention_mass_reference(
        q, k4, key_lim, q_lim, base, scale=0.3, perm=perm, index=index[i]
      )
      np.testing.assert_allclose(np.asarray(col[i]), np.asarray(rc), rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(slash[i]), np.asarray(rs), rtol=2e-5, atol=1e-6)

  @pytest.mark.parametrize("gather", [True, False])
  def test_heads_inner_under_vmap(self, gather):
    """heads_inner: vmapped over 4 query heads of 2 kv heads (one call, heads first in the
    grid), inside a vmap over 2 batch rows as the planner calls it, some arguments per
    head and some shared: each head's masses as computed alone."""
    n_rows, length, h = 16, 256, 32
    q, k, key_lim, q_lim, base, perm = inputs(9, n_rows, length, h, gather=gather)
    rng = np.random.default_rng(9)
    k4 = jnp.asarray(rng.standard_normal((2, length, 2, h)), jnp.bfloat16)  # [B, L, K, H]
    qs = jnp.asarray(rng.standard_normal((2, 4, n_rows, h)) * 2, jnp.bfloat16)  # [B, N, R, H]
    q_lims = jnp.stack([q_lim, jnp.roll(q_lim, 3), q_lim - 5, q_lim])  # per head
    kv = jnp.asarray([0, 0, 1, 1], jnp.int32)

    def head(qh, b, kv_id, ql, heads_inner):
      index = jnp.stack([b, kv_id])
      return attention_mass(
        qh,
        k4,
        key_lim,
        ql,
        base,
        scale=0.3,
        perm=perm,
        index=index,
        heads_inner=heads_inner,
        interpret=self.interpret,
      )

    per_b = lambda hi: jax.vmap(  # noqa: E731
      lambda qb, b: jax.vmap(lambda qh, kv_id, ql: head(qh, b, kv_id, ql, hi))(qb, kv, q_lims)
    )
    b_ids = jnp.arange(2, dtype=jnp.int32)
    got = per_b(True)(qs, b_ids)
    # one call for the 4 heads: its kernel reads the heads' (batch, kv head) indices
    # [4, 2] itself (vmap's batching gives each program an index [2])
    jaxpr = str(jax.make_jaxpr(per_b(True))(qs, b_ids))
    first = "mmjax_attn_mass_tiles" if mass_kernel.TILE_STATS else "mmjax_attn_mass_stats"
    sig = re.search(rf"let {first} = \{{ lambda ; a:Ref<\w+>(\{{[^}}]*\}})", jaxpr)
    assert sig and sig.group(1) == "{i32[4,2]}", sig and sig.group(1)
    for b in range(2):
      for n in range(4):
        want = attention_mass_reference(
          qs[b, n],
          k4,
          key_lim,
          q_lims[n],
          base,
          scale=0.3,
          perm=perm,
          index=jnp.asarray([b, int(kv[n])], jnp.int32),
        )
        for g, w in zip(got, want, strict=True):
          np.testing.assert_allclose(np.asarray(g[b, n]), np.asarray(w), rtol=2e-5, atol=1e-6)
    for g, w in zip(got, per_b(False)(qs, b_ids), strict=True):  # the usual batching
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)

  def test_heads_inner_with_keys_per_head(self):
    # every head its own keys: vmap's usual batching, the same values
    q, k, key_lim, q_lim, base, perm = inputs(10, 16, 128, 32)
    ks = jnp.stack([k, -k, k * 0.5])
    got = jax.vmap(
      lambda kk: attention_mass(
        q,
        kk,
        key_lim,
        q_lim,
        base,
        scale=0.3,
        perm=perm,
        heads_inner=True,
        interpret=self.interpret,
      )
    )(ks)
    for i in range(3):
      want = attention_mass_reference(q, ks[i], key_lim, q_lim, base, scale=0.3, perm=perm)
      for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), rtol=2e-5, atol=1e-6)


class TestInterpret(MassTests):
  interpret = True

  def test_bad_input(self):
    q, k, key_lim, q_lim, base, perm = inputs(0, 16, 128, 32)
    call = lambda *a, **kw: attention_mass(*a, scale=1.0, interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="power of two >= 16"):
      call(q[:8], k, key_lim, q_lim[:8], base[:8])
    with pytest.raises(ValueError, match="share one of"):
      call(q, k.astype(jnp.float32), key_lim, q_lim, base)
    with pytest.raises(ValueError, match="needs index"):
      call(q, k[None, :, None], key_lim, q_lim, base)
    with pytest.raises(ValueError, match="tile"):
      call(q, k, key_lim, q_lim, base, tile=48)
    with pytest.raises(ValueError, match="key_lim must be int32"):
      call(q, k, key_lim[:64], q_lim, base)
    with pytest.raises(ValueError, match="perm must be int32"):
      call(q, k, key_lim, q_lim, base, perm=perm[:64])
    with pytest.raises(ValueError, match="head dims differ"):
      call(q, k[:, :16], key_lim, q_lim, base)
    with pytest.raises(ValueError, match="p_dtype must be one of"):
      call(q, k, key_lim, q_lim, base, p_dtype="bfloat16")
    with pytest.raises(ValueError, match="max_offset must be in"):
      call(q, k, key_lim, q_lim, base, max_offset=129)
    with pytest.raises(ValueError, match="span_tiles=4 must be >= 1, with max_offset"):
      call(q, k, key_lim, q_lim, base, span_tiles=4)
    with pytest.raises(ValueError, match="span_tiles=0 must be"):
      call(q, k, key_lim, q_lim, base, span_tiles=0, max_offset=8)
    with pytest.raises(ValueError, match="key_range must be int32"):
      call(q, k, key_lim, q_lim, base, key_range=jnp.asarray([0, 5, 9], jnp.int32))
    rng = jnp.asarray([0, 5], jnp.int32)
    with pytest.raises(ValueError, match="range_tiles=4 must be >= 1, with key_range"):
      call(q, k, key_lim, q_lim, base, range_tiles=4)
    with pytest.raises(ValueError, match="range_tiles=4 must be >= 1, with key_range"):
      call(q, k, key_lim, q_lim, base, key_range=rng, max_offset=8, range_tiles=4)
    with pytest.raises(ValueError, match="range_tiles=0 must be"):
      call(q, k, key_lim, q_lim, base, key_range=rng, range_tiles=0)
    with pytest.raises(ValueError, match="key_range must be int32"):
      call(q, k, key_lim, q_lim, base, key_range=jnp.asarray([0.0, 5.0]))


@pytest.mark.gpu
class TestGPU(MassTests):
  interpret = False


class TileStats:
  """MassTests with TILE_STATS: two passes, the first storing each key tile's exp(s - its
  row max) with the row max and sum, the diagonal and column passes rescaling per tile."""

  @property
  def ranges_bit_for_bit(self):
    return self.interpret

  @pytest.fixture(autouse=True)
  def _tile_stats(self, monkeypatch):
    monkeypatch.setattr(mass_kernel, "TILE_STATS", True)

  @pytest.mark.parametrize("max_offset", [None, 40])
  def test_two_passes(self, max_offset):
    """The calls are the tile pass, the column pass (without max_offset) and the diagonal
    pass; no statistics pass."""
    q, k, key_lim, q_lim, base, perm = inputs(5, 16, 256, 32)
    jaxpr = str(
      jax.make_jaxpr(
        lambda q: attention_mass(
          q, k, key_lim, q_lim, base, scale=0.3, perm=perm, tile=32, max_offset=max_offset,
          interpret=self.interpret,
        )
      )(q)
    )  # fmt: skip
    names = set(re.findall(r"mmjax_attn_mass\w*", jaxpr))
    want = {"mmjax_attn_mass_tiles", "mmjax_attn_mass_diagonals"}
    assert names == (want if max_offset else want | {"mmjax_attn_mass_cols"}), names


class TestInterpretTileStats(TileStats, MassTests):
  interpret = True


@pytest.mark.gpu
class TestGPUTileStats(TileStats, MassTests):
  interpret = False
