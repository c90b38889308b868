"""pallas_kernels.pooled_scores against its reference on fresh random inputs.
`PooledScoreTests` holds the checks; `TestInterpret` runs them on the CPU in interpret
mode, `TestGPU` compiled on a GPU (pytest --gpu -m gpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.pooled_scores import pooled_scores, pooled_scores_reference

POISON_FREE = -1e30  # no output entry may be left at a value the kernel did not write


def inputs(seed, n_q, n_k, h):
  """Pooled means qp, kp (f32), and limits: causal-like (k_lim a block's first position,
  q_lim a block's last), some blocks barred on each side."""
  rng = np.random.default_rng(seed)
  qp = jnp.asarray(rng.standard_normal((n_q, h)), jnp.float32)
  kp = jnp.asarray(rng.standard_normal((n_k, h)), jnp.float32)
  q_lim = (np.arange(n_q) + 1) * max(1, n_k // n_q) - 1
  q_lim[rng.random(n_q) < 0.1] = -1
  k_lim = np.arange(n_k)
  k_lim[rng.random(n_k) < 0.1] = 2**30
  return qp, kp, jnp.asarray(q_lim, jnp.int32), jnp.asarray(k_lim, jnp.int32)


class PooledScoreTests:
  interpret: bool

  def check(self, qp, kp, q_lim, k_lim, chunk, **kw):
    s, cmax = pooled_scores(
      qp, kp, q_lim, k_lim, scale=0.2, chunk=chunk, interpret=self.interpret, **kw
    )
    ref_s, ref_c = pooled_scores_reference(qp, kp, q_lim, k_lim, scale=0.2, chunk=chunk)
    assert s.dtype == ref_s.dtype == qp.dtype
    s, ref_s = np.asarray(s, np.float32), np.asarray(ref_s, np.float32)
    fin = np.isfinite(ref_s)
    assert fin.any() and (~fin).any()
    np.testing.assert_array_equal(np.isfinite(s), fin)
    if qp.dtype == jnp.bfloat16:
      # bf16 products are exact in f32, the sums f32 in another order, rounded once to
      # bf16: at most one bf16 step (2^-8 relative) from the reference's
      np.testing.assert_allclose(s[fin], ref_s[fin], rtol=2**-8, atol=1e-6)
    else:
      # TF32 products on a GPU (10-bit mantissas): relative error ~1e-3 of |q||k| / sqrt(H)
      tol = 2e-2 if (kw.get("tf32", True) and not self.interpret) else 1e-5
      np.testing.assert_allclose(s[fin], ref_s[fin], rtol=tol, atol=tol)
    if chunk:
      # the maxima are exactly those of the kernel's own scores
      pad = -s.shape[1] % chunk
      padded = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
      want = padded.reshape(s.shape[0], -1, chunk).max(-1)
      assert cmax.dtype == qp.dtype and cmax.shape == ref_c.shape
      np.testing.assert_array_equal(np.asarray(cmax, np.float32), want)
    else:
      assert cmax is None

  @pytest.mark.parametrize(
    "n_q, n_k, h, chunk",
    [(64, 128, 128, 16), (128, 256, 64, 0), (32, 64, 32, 64), (37, 100, 32, 16)],
  )
  def test_matches_reference(self, n_q, n_k, h, chunk):
    self.check(*inputs(n_q + n_k + chunk, n_q, n_k, h), chunk)

  def test_full_f32_products(self):
    self.check(*inputs(3, 64, 64, 64), 16, tf32=False, block_m=32, block_n=32)

  @pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 64)])
  def test_tiles_without_pairs_skipped(self, block_m, block_n):
    # fill=False: chunks with an allowed pair as with fill, the rest's maxima -inf (their
    # scores are left unwritten and not compared)
    qp, kp, q_lim, k_lim = inputs(11, 64, 128, 32)
    q_lim = q_lim.at[16:40].set(-1)  # a band of query blocks without pairs
    kw = dict(scale=0.2, chunk=16, block_m=block_m, block_n=block_n, interpret=self.interpret)
    s_full, c_full = pooled_scores(qp, kp, q_lim, k_lim, **kw)
    s, c = pooled_scores(qp, kp, q_lim, k_lim, fill=False, **kw)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(c_full))
    live = np.repeat(np.isfinite(np.asarray(c)), 16, axis=1)[:, : s.shape[1]]
    assert live.any() and (~live).any()
    np.testing.assert_array_equal(np.asarray(s)[live], np.asarray(s_full)[live])

  def test_bfloat16_inputs(self):
    qp, kp, q_lim, k_lim = inputs(5, 64, 256, 128)
    self.check(qp.astype(jnp.bfloat16), kp.astype(jnp.bfloat16), q_lim, k_lim, 16)

  def test_vmapped_over_heads(self):
    qps, kps, qls, kls = zip(*(inputs(20 + i, 64, 64, 32) for i in range(2)), strict=True)
    qp, kp, ql, kl = map(jnp.stack, (qps, kps, qls, kls))
    s, c = jax.vmap(
      lambda a, b, x, y: pooled_scores(a, b, x, y, scale=0.2, chunk=16, interpret=self.interpret)
    )(qp, kp, ql, kl)
    for i in range(2):
      s1, c1 = pooled_scores(
        qp[i], kp[i], ql[i], kl[i], scale=0.2, chunk=16, interpret=self.interpret
      )
      np.testing.assert_array_equal(np.asarray(s[i]), np.asarray(s1))
      np.testing.assert_array_equal(np.asarray(c[i]), np.asarray(c1))


class TestInterpret(PooledScoreTests):
  interpret = True

  def test_bad_input(self):
    qp, kp, q_lim, k_lim = inputs(0, 64, 64, 32)
    call = lambda *a, **kw: pooled_scores(*a, scale=1.0, interpret=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[nQ, H\]"):
      call(qp, kp[:, :16], q_lim, k_lim)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
      call(qp.astype(jnp.bfloat16), kp, q_lim, k_lim)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
      call(qp.astype(jnp.float16), kp.astype(jnp.float16), q_lim, k_lim)
    with pytest.raises(ValueError, match="power of two"):
      call(qp, kp, q_lim, k_lim, block_m=48)
    with pytest.raises(ValueError, match="chunk"):
      call(qp, kp, q_lim, k_lim, chunk=24)
    with pytest.raises(ValueError, match="k_lim must be int32"):
      call(qp, kp, q_lim, k_lim[:32])
    with pytest.raises(ValueError, match="fill=False needs"):
      call(qp, kp, q_lim, k_lim, fill=False)


@pytest.mark.gpu
class TestGPU(PooledScoreTests):
  interpret = False
