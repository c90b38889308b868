"""pallas_kernels.block_pool against its reference, on fresh random inputs and selections.
`BlockPoolTests` holds the checks; `TestInterpret` runs them on the CPU in interpret mode,
`TestGPU` compiled on a GPU (pytest --gpu -m gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_pool import block_mean, block_mean_reference

POISON = 1e4  # an unwritten output entry would keep it
RTOL = 1e-6  # both sum in f32 (in different orders), whatever the input dtype


def inputs(seed, length, h, n_sel, dtype=jnp.float32, gather=True):
  """x [L, H], selection bits [L] (each selection a random subset; rows 0-127 of selection
  0 empty), rows: a random permutation or None."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((length, h)) * 3 + 1, jnp.float32).astype(dtype)
  sel = rng.random((n_sel, length)) < rng.uniform(0.05, 0.9, (n_sel, 1))
  sel[0, :128] = False
  bits = (sel.astype(np.int64) << np.arange(n_sel)[:, None]).sum(0).astype(np.int32)
  rows = jnp.asarray(rng.permutation(length), jnp.int32) if gather else None
  return x, jnp.asarray(bits), rows


class BlockPoolTests:
  interpret: bool

  def check(self, x, bits, rows, block, n_sel, **kw):
    """block_mean against the reference, and its per-selection outputs (`stacked` False)
    equal to the stacked ones; the stacked means returned."""
    kw = dict(rows=rows, block=block, n_sel=n_sel, interpret=self.interpret, poison=POISON, **kw)
    out = block_mean(x, bits, **kw)
    ref = block_mean_reference(x, bits, rows=rows, block=block, n_sel=n_sel)
    n_view = x.shape[0] if rows is None else rows.shape[0]
    assert out.shape == (n_sel, n_view // block, x.shape[1]) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=RTOL, atol=1e-5)
    each = block_mean(x, bits, stacked=False, **kw)
    assert isinstance(each, tuple) and len(each) == n_sel
    np.testing.assert_array_equal(np.stack([np.asarray(e) for e in each]), np.asarray(out))
    return out

  @pytest.mark.parametrize(
    "length, h, block, n_sel, gather",
    [(512, 64, 64, 1, True), (1024, 128, 128, 3, True), (256, 32, 16, 2, False)],
  )
  def test_matches_reference(self, length, h, block, n_sel, gather):
    x, bits, rows = inputs(length + n_sel, length, h, n_sel, gather=gather)
    out = self.check(x, bits, rows, block, n_sel)
    assert not np.asarray(out[0, 0]).any()  # the empty block's mean is 0

  def test_fewer_view_rows_than_x(self):
    # the planner's sampled means (Grid.pool_tokens): every 4th view row of a permutation
    x, bits, rows = inputs(5, 1024, 64, 2, jnp.bfloat16)
    out = self.check(x, bits[::4], rows[::4], 16, 2)
    assert out.shape == (2, 16, 64)

  @pytest.mark.parametrize(
    "dtype, group, gather, block", [(jnp.float32, 16, True, 16), (jnp.bfloat16, 32, False, 16),
                                    (jnp.float16, 16, True, 32)],
  )  # fmt: skip
  def test_groups_of_blocks(self, dtype, group, gather, block):
    """group: each program sums `group` blocks per selection by one dot of 0/1 weights
    (the sampled means' 16-row blocks); three selections, one block empty in the first."""
    x, bits, rows = inputs(40 + group, 2048, 64, 3, dtype, gather=gather)
    out = self.check(x, bits, rows, block, 3, group=group)
    assert not np.asarray(out[0, 0]).any()

  def test_groups_under_vmap_heads_inner(self):
    """group with the heads innermost, each head its own rows (a grid order per head)."""
    rng = np.random.default_rng(41)
    x4 = jnp.asarray(rng.standard_normal((1, 1024, 3, 32)), jnp.bfloat16)
    index = jnp.asarray([[0, 2], [0, 0]], jnp.int32)
    per = [inputs(50 + i, 1024, 32, 2) for i in range(2)]
    bits = per[0][1][::2]
    rows = jnp.stack([r[::2] for _, _, r in per])  # (sampled: every other view row)
    out = jax.vmap(
      lambda ix, r: block_mean(
        x4, bits, rows=r, index=ix, block=16, n_sel=2, group=16, heads_inner=True,
        interpret=self.interpret, poison=POISON,
      )
    )(index, rows)  # fmt: skip
    for j in range(2):
      b, h = np.asarray(index[j])
      ref = block_mean_reference(x4[b, :, h], bits, rows=rows[j], block=16, n_sel=2)
      np.testing.assert_allclose(np.asarray(out[j]), np.asarray(ref), rtol=RTOL, atol=1e-5)

  @pytest.mark.parametrize("group, block", [(1, 32), (16, 16)])
  def test_selections_empty_in_whole_programs(self, group, block):
    """A selection with no row at all (a modality id the input lacks: its sums are
    skipped, zeros written) and one with rows in only a few programs' blocks, beside a
    full one; the other selections' means as the reference's."""
    x, bits, rows = inputs(60 + group, 2048, 64, 3, jnp.bfloat16)
    few = np.zeros(2048, bool)
    few[group * block * 3 + 5 : group * block * 3 + 9] = True  # (view rows of one program)
    bits = (bits & 1) | jnp.asarray(few.astype(np.int32) << 2)  # selection 1 empty
    out = self.check(x, bits, rows, block, 3, group=group)
    assert not np.asarray(out[1]).any()
    nonzero = np.asarray(out[2]).any(-1)
    assert nonzero.sum() in (1, 2) and nonzero[3 * group : 3 * group + 1].all()

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_low_precision_inputs(self, dtype):
    x, bits, rows = inputs(7, 512, 128, 2, dtype)
    self.check(x, bits, rows, 64, 2)

  @pytest.mark.parametrize("gather", [True, False])
  def test_in_place_slice_of_a_4d_input(self, gather):
    rng = np.random.default_rng(9)
    x4 = jnp.asarray(rng.standard_normal((2, 256, 3, 64)), jnp.bfloat16)
    _, bits, rows = inputs(10, 256, 64, 2, gather=gather)
    index = jnp.asarray([1, 2], jnp.int32)
    kw = dict(rows=rows, block=32, n_sel=2)
    out = block_mean(x4, bits, index=index, interpret=self.interpret, poison=POISON, **kw)
    ref = block_mean_reference(x4[1, :, 2], bits, **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=RTOL, atol=1e-5)

  def test_vmapped_over_the_index(self):
    # as the planner calls it: x unbatched [B, L, N, H], the (batch, head) index batched
    rng = np.random.default_rng(12)
    x4 = jnp.asarray(rng.standard_normal((2, 128, 4, 32)), jnp.float32)
    _, bits, rows = inputs(13, 128, 32, 1)
    index = jnp.asarray([[0, 3], [1, 0], [1, 2]], jnp.int32)
    out = jax.vmap(
      lambda ix: block_mean(
        x4, bits, rows=rows, index=ix, block=16, n_sel=1, interpret=self.interpret
      )
    )(index)
    for i, (b, h) in enumerate(np.asarray(index)):
      ref = block_mean_reference(x4[b, :, h], bits, rows=rows, block=16, n_sel=1)
      np.testing.assert_allclose(np.asarray(out[i]), np.asarray(ref), rtol=RTOL, atol=1e-5)

  @pytest.mark.parametrize("rows_per_head, bits_per_head", [(False, False), (True, True)])
  def test_heads_inner_under_vmap(self, rows_per_head, bits_per_head):
    """heads_inner: vmapped over (batch, head) indices, one call with the heads first in
    its grid; rows and bits shared by the heads or each head's own; x never batched.
    Nested in a vmap over the batch, as the planner calls it."""
    rng = np.random.default_rng(21)
    x4 = jnp.asarray(rng.standard_normal((2, 128, 5, 32)) * 2 + 0.5, jnp.bfloat16)
    index = jnp.asarray([[[0, 3], [0, 0], [0, 4]], [[1, 1], [1, 3], [1, 2]]], jnp.int32)
    n_h = index.shape[1]
    per = [inputs(30 + i, 128, 32, 2) for i in range(n_h)]
    bits = jnp.stack([b for _, b, _ in per]) if bits_per_head else per[0][1]
    rows = jnp.stack([r for _, _, r in per]) if rows_per_head else per[0][2]

    def pool(inner, stacked=True):
      def head(ix, b, r):
        return block_mean(
          x4, b, rows=r, index=ix, block=16, n_sel=2, heads_inner=inner,
          interpret=self.interpret, poison=POISON, stacked=stacked,
        )  # fmt: skip

      axes = (0, 0 if bits_per_head else None, 0 if rows_per_head else None)
      return jax.vmap(jax.vmap(head, axes), (0, None, None))(index, bits, rows)

    out = pool(True)
    assert out.shape == (2, n_h, 2, 8, 32)
    each = pool(True, stacked=False)  # (one output per selection, each with the head axes)
    assert len(each) == 2 and each[1].shape == (2, n_h, 8, 32)
    np.testing.assert_array_equal(np.stack([np.asarray(e) for e in each], 2), np.asarray(out))
    for bi in range(2):
      for j in range(n_h):
        b, h = np.asarray(index[bi, j])
        ref = block_mean_reference(
          x4[b, :, h],
          bits[j] if bits_per_head else bits,
          rows=rows[j] if rows_per_head else rows,
          block=16,
          n_sel=2,
        )
        np.testing.assert_allclose(np.asarray(out[bi, j]), np.asarray(ref), rtol=RTOL, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pool(False)))

  def test_vmapped_over_heads(self):
    # the planner calls it per head under vmap (the batching rule adds a grid axis)
    xs, bs, rs = zip(*(inputs(11 + i, 256, 64, 2) for i in range(3)), strict=True)
    x, bits, rows = jnp.stack(xs), jnp.stack(bs), jnp.stack(rs)
    out = jax.vmap(
      lambda a, b, r: block_mean(a, b, rows=r, block=32, n_sel=2, interpret=self.interpret)
    )(x, bits, rows)
    for i in range(3):
      ref = block_mean_reference(x[i], bits[i], rows=rows[i], block=32, n_sel=2)
      np.testing.assert_allclose(np.asarray(out[i]), np.asarray(ref), rtol=RTOL, atol=1e-5)


class TestInterpret(BlockPoolTests):
  interpret = True

  @pytest.mark.parametrize("group, out_dtype", [(1, jnp.bfloat16), (16, jnp.float16)])
  def test_out_dtype(self, group, out_dtype):
    """out_dtype: the f32 means rounded once, as .astype on the f32 output (bit for bit)."""
    x, bits, rows = inputs(60 + group, 1024, 64, 2, jnp.bfloat16)
    kw = dict(rows=rows, block=16, n_sel=2, group=group, interpret=self.interpret)
    got = block_mean(x, bits, out_dtype=out_dtype, poison=POISON, **kw)
    want = block_mean(x, bits, **kw)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(out_dtype)))

  def test_bad_input(self):
    x, bits, rows = inputs(0, 128, 32, 1)
    with pytest.raises(ValueError, match="out_dtype int32 is not supported"):
      block_mean(x, bits, block=16, n_sel=1, out_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match=r"\[L, H\]"):
      block_mean(x[0], bits, block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="needs index"):
      block_mean(x[None, :, None], bits, block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match=r"\[L, H\] \(index None\)"):
      block_mean(x, bits, index=jnp.zeros(2, jnp.int32), block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="multiple of block"):
      block_mean(x[:120], bits[:120], block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
      block_mean(x, bits, block=24, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="n_sel"):
      block_mean(x, bits, block=16, n_sel=32, interpret=True)
    with pytest.raises(ValueError, match="bits must be int32"):
      block_mean(x, bits.astype(jnp.int8), block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="rows must be int32"):
      block_mean(x, bits, rows=rows.astype(jnp.float32), block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match=r"bits must be int32 of shape \(64,\)"):
      block_mean(x, bits, rows=rows[:64], block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match=r"V \(the rows given\)=120 must be a multiple"):
      block_mean(x, bits[:120], rows=rows[:120], block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
      block_mean(x.astype(jnp.int32), bits, block=16, n_sel=1, interpret=True)
    with pytest.raises(ValueError, match="group=8 must be 1 or a power of two >= 16"):
      block_mean(x, bits, block=16, n_sel=1, group=8, interpret=True)
    with pytest.raises(ValueError, match=r"group=16 must divide the 8 blocks"):
      block_mean(x, bits, block=16, n_sel=1, group=16, interpret=True)


@pytest.mark.gpu
class TestGPU(BlockPoolTests):
  interpret = False
