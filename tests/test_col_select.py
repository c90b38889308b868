"""pallas_kernels.col_select against its reference, on fresh random inputs. `ColTests`
holds the checks; `TestInterpret` runs them on the CPU in interpret mode (which fills the
outputs with int32 min first, so an unwritten slot fails), `TestGPU` compiled on a GPU
(pytest --gpu -m gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.col_select import kernel as col_kernel
from pallas_kernels.col_select import select_columns, select_columns_reference


def inputs(
  seed, n_rows=48, length=512, n_comp=3, per_comp=40, n_blocks=12, block_k=16, own=16, apart=False
):
  """A shared list of `n_comp` sets' picks (each set's keys distinct, sets overlapping,
  some entries invalid; apart: the last set's keys after all the others'), rows taking
  random sets with random causal limits, random ascending block lists, and (own > 0)
  each row's own tokens, some invalid."""
  rng = np.random.default_rng(seed)
  lim_of = rng.permutation(length).astype(np.int32)  # a key's position (causal limit)
  keys, bits = [], []
  for c in range(n_comp):
    pick = rng.choice(length // 2 + 64, per_comp, replace=False)  # overlapping sets
    if apart and c == n_comp - 1:
      pick = length // 2 + 64 + rng.choice(length // 2 - 64, per_comp, replace=False)
    keys.append(pick)
    bits.append(np.where(rng.random(per_comp) < 0.85, 1 << c, 0))
  keys, bits = np.concatenate(keys), np.concatenate(bits)
  order = np.argsort(keys, kind="stable")
  cand, cand_bits = keys[order].astype(np.int32), bits[order].astype(np.int32)
  row_bits = rng.integers(0, 1 << n_comp, n_rows).astype(np.int32)
  row_lim = rng.integers(-1, length, n_rows).astype(np.int32)
  row_lim[:3] = length  # rows that may take everything
  blocks = np.zeros((n_rows, n_blocks), np.int32)
  count = rng.integers(0, n_blocks + 1, n_rows).astype(np.int32)
  for r in range(n_rows):
    blocks[r, : count[r]] = np.sort(rng.choice(length // block_k, count[r], replace=False))
  args = [jnp.asarray(x) for x in (cand, cand_bits, lim_of[cand], row_bits, row_lim, blocks, count)]
  kw = {}
  if own:
    mine = np.stack([rng.choice(length // 2 + 64, own, replace=False) for _ in range(n_rows)])
    mine[:, : own // 4] = np.sort(mine[:, : own // 4], axis=1)  # partly sorted
    own_ok = rng.random((n_rows, own)) < 0.8
    mine = np.where(own_ok, mine, length - 1)  # invalid ones repeat a key
    kw = dict(
      own=jnp.asarray(mine, jnp.int32),
      own_ok=jnp.asarray(own_ok),
      own_lim=jnp.asarray(lim_of[mine]),
    )
  return args, kw, block_k


class ColTests:
  interpret: bool

  def check(self, args, kw, block_k, max_cols, chunk=16):
    got = select_columns(
      *args, block_k=block_k, max_cols=max_cols, chunk=chunk, interpret=self.interpret, **kw
    )
    want = select_columns_reference(*args, block_k=block_k, max_cols=max_cols, **kw)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    count = np.asarray(want[1])
    # not vacuous: rows with keys, rows without, duplicates across sets in the list
    assert count.max() > 3 and (count == 0).any()
    assert (np.diff(np.asarray(args[0])) == 0).any()
    return np.asarray(got[0]), count

  @pytest.mark.parametrize("own", [0, 16])
  def test_matches_reference(self, own):
    args, kw, bk = inputs(3 + own, own=own)
    cols, count = self.check(args, kw, bk, max_cols=160)
    assert count.max() < 160  # nothing cut here
    if own:  # rows that keep own tokens (the second kernel's) and rows that keep none
      alone = select_columns_reference(*args, block_k=bk, max_cols=160)
      keeps = np.asarray(alone[1]) != count
      assert keeps.any() and (~keeps & (count > 0)).any()

  @pytest.mark.parametrize("own", [0, 16])
  def test_rows_cut_at_max_cols(self, own):
    args, kw, bk = inputs(11 + own, own=own)
    _, count = self.check(args, kw, bk, max_cols=20)
    assert (count == 20).any()

  def test_list_not_a_whole_number_of_chunks(self):
    args, kw, bk = inputs(5, per_comp=37, own=8)
    self.check(args, kw, bk, max_cols=100, chunk=32)

  @pytest.mark.parametrize("own", [0, 16])
  def test_sets_apart_in_the_list(self, own):
    """A set whose entries all follow the others' (a 2D boundary's grid sink columns
    after its text vertical lines): rows taking only it loop over its chunks only."""
    args, kw, bk = inputs(13 + own, own=own, apart=True)
    self.check(args, kw, bk, max_cols=160)
    first, end = (np.asarray(x) for x in col_kernel._ranges(args[1], args[3], 16))
    n_chunks = -(-args[0].shape[0] // 16)
    only_last = np.asarray(args[3]) == 4  # rows taking the last set alone
    assert only_last.any() and (first[only_last] > 2).all() and (end == n_chunks).any()
    assert ((first == end) == (np.asarray(args[3]) == 0)).all()  # no set: no chunk

  def test_no_candidates_only_own_tokens(self):
    args, kw, bk = inputs(6, own=32)
    z = jnp.zeros((0,), jnp.int32)
    args = [z, z, z, *args[3:]]
    got = select_columns(*args, block_k=bk, max_cols=40, interpret=self.interpret, **kw)
    want = select_columns_reference(*args, block_k=bk, max_cols=40, **kw)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert np.asarray(want[1]).max() > 10

  def test_vmapped_over_heads(self):
    (a0, kw0, bk), (a1, kw1, _) = inputs(7, own=16), inputs(8, own=16)
    stack = lambda x, y: jnp.stack([x, y])  # noqa: E731
    args = jax.tree_util.tree_map(stack, a0, a1)
    kw = jax.tree_util.tree_map(stack, kw0, kw1)
    got = jax.vmap(
      lambda a, k: select_columns(
        *a, block_k=bk, max_cols=64, chunk=16, interpret=self.interpret, **k
      )
    )(args, kw)
    for h, (a, k) in enumerate(((a0, kw0), (a1, kw1))):
      want = select_columns_reference(*a, block_k=bk, max_cols=64, **k)
      np.testing.assert_array_equal(np.asarray(got[0][h]), np.asarray(want[0]))
      np.testing.assert_array_equal(np.asarray(got[1][h]), np.asarray(want[1]))


class TestInterpret(ColTests):
  interpret = True

  def test_bad_input(self):
    args, kw, bk = inputs(0, own=16)
    call = lambda *a, **k: select_columns(*a, block_k=bk, max_cols=8, interpret=True, **k)  # noqa: E731
    with pytest.raises(ValueError, match="cand_bits must be int32"):
      call(args[0], args[1][:-1], *args[2:])
    with pytest.raises(ValueError, match="blocks must be"):
      call(*args[:5], args[5][0], args[6])
    with pytest.raises(ValueError, match="row_lim must be int32"):
      call(*args[:4], args[4].astype(jnp.float32), *args[5:])
    with pytest.raises(ValueError, match="go together"):
      call(*args, own=kw["own"])
    with pytest.raises(ValueError, match="power of two"):
      call(*args, **{k: v[:, :12] for k, v in kw.items()})
    with pytest.raises(ValueError, match="chunk"):
      select_columns(*args, block_k=bk, max_cols=8, chunk=24, interpret=True)


@pytest.mark.gpu
class TestGPU(ColTests):
  interpret = False
