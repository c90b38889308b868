"""pallas_kernels.attn_mass against its reference, on fresh random inputs. `MassTests`
holds the checks; `TestInterpret` runs them on the CPU in interpret mode, `TestGPU`
compiled on a GPU (pytest --gpu -m gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attn_mass import attention_mass, attention_mass_reference

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


@pytest.mark.gpu
class TestGPU(MassTests):
  interpret = False
