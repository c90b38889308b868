"""pallas_kernels.sparse_flash against its pure-jnp reference, on fresh random inputs.

`KernelTests` holds the checks; `TestInterpret` runs them on the CPU in interpret mode,
`TestGPU` compiled on a GPU (pytest --gpu -m gpu)."""

import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from pallas_kernels.sparse_flash import (
  sparse_attention,
  sparse_attention_reference,
  sparse_attention_reference_fused,
)
from tests import helpers

POISON = 1e4  # unwritten outputs would keep this


def random_plan_inputs(seed, b, length, n, kh, h, dtype, bq, bk, mb, mc, permute=True):
  rng = np.random.default_rng(seed)
  nq, nk = length // bq, length // bk
  q = jnp.asarray(rng.standard_normal((b, length, n, h)), jnp.float32).astype(dtype)
  k = jnp.asarray(rng.standard_normal((b, length, kh, h)), jnp.float32).astype(dtype)
  v = jnp.asarray(rng.standard_normal((b, length, kh, h)), jnp.float32).astype(dtype)

  def perms(heads):
    if not permute:
      return np.broadcast_to(np.arange(length), (b, heads, length)).copy()
    return np.stack([[rng.permutation(length) for _ in range(heads)] for _ in range(b)])

  q_pos, k_pos = perms(n), perms(kh)
  bi = np.zeros((b, n, nq, mb), np.int32)
  bc = rng.integers(0, mb + 1, (b, n, nq)).astype(np.int32)
  bc.flat[0] = 0  # one query block with no blocks at all
  ci = np.zeros((b, n, nq, mc), np.int32)
  cc = np.zeros((b, n, nq), np.int32)
  for idx in np.ndindex(b, n, nq):
    if idx == (0, 0, 0):
      continue  # one query block with nothing listed
    blocks = rng.choice(nk, mb, replace=False)
    bi[idx] = blocks
    taken = [np.arange(x * bk, (x + 1) * bk) for x in blocks[: bc[idx]]]
    free = np.setdiff1d(np.arange(length), np.concatenate([np.arange(0), *taken]))
    c = int(rng.integers(0, min(mc, len(free)) + 1)) if mc else 0
    ci[idx][:c] = rng.choice(free, c, replace=False)
    cc[idx] = c
  ints = [jnp.asarray(x, jnp.int32) for x in (q_pos, k_pos, bi, bc, ci, cc)]
  return (q, k, v, *ints)


class KernelTests:
  interpret: bool

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize(
    "b, length, n, kh, h, bq, bk, mb, mc",
    [
      (2, 128, 4, 2, 32, 32, 16, 4, 20),  # GQA, permuted, bq != bk
      (1, 128, 2, 2, 64, 16, 32, 3, 0),  # no columns
      (1, 64, 2, 1, 128, 16, 16, 2, 33),  # column count not a multiple of the chunk
    ],
  )
  def test_matches_reference(self, dtype, b, length, n, kh, h, bq, bk, mb, mc):
    args = random_plan_inputs(
      hash((b, length, h)) % 997, b, length, n, kh, h, dtype, bq, bk, mb, mc
    )
    out = sparse_attention(*args, block_q=bq, block_k=bk, interpret=self.interpret, debug=True)
    ref = sparse_attention_reference(*args, block_q=bq, block_k=bk)
    assert out.shape == args[0].shape and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    tol = helpers.TOL[dtype]
    np.testing.assert_allclose(out, ref, atol=2 * tol, rtol=2 * tol)
    # the query block with nothing listed outputs zeros, not NaN.
    np.testing.assert_array_equal(out[0, :bq, 0], 0.0)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_fused_permutation_matches_reference(self, dtype):
    # k_pos per query head: the heads of one kv group order their keys differently.
    b, length, n, kh, h, bq, bk = 2, 128, 4, 2, 64, 32, 16
    args = list(random_plan_inputs(17, b, length, n, kh, h, dtype, bq, bk, 4, 20))
    rng = np.random.default_rng(3)
    args[4] = jnp.asarray(
      np.stack([[rng.permutation(length) for _ in range(n)] for _ in range(b)]), jnp.int32
    )
    out = sparse_attention(
      *args, block_q=bq, block_k=bk, interpret=self.interpret, fuse_permutation=True, poison=POISON
    )
    ref = sparse_attention_reference_fused(*args, block_q=bq, block_k=bk)
    tol = helpers.TOL[dtype]
    np.testing.assert_allclose(
      np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2 * tol, rtol=2 * tol
    )

  def test_every_output_written(self):
    args = random_plan_inputs(5, 1, 64, 2, 2, 32, jnp.float32, 16, 16, 4, 8)
    out = sparse_attention(*args, block_q=16, block_k=16, interpret=self.interpret, poison=POISON)
    assert float(jnp.abs(out).max()) < POISON / 10, "a tile was not written"

  def test_through_mmjax_policies(self):
    for name in ("2d_boundary", "q_boundary", "grid", "vertical_slash"):
      pol = helpers.small_policies()[name]
      q, k, v, mod = helpers.random_inputs(4, 1, 160, 4, 2, 32, jnp.float32)
      plan = pol.plan(q, k, mod)
      ref = mmjax.sparse_attention(q, k, v, plan=plan, backend="reference")
      tol = 1e-5 if self.interpret else 2e-3
      for fuse in (False, True):
        out = mmjax.sparse_attention(
          q,
          k,
          v,
          plan=plan,
          backend="pallas",
          interpret=self.interpret,
          pallas_options={"fuse_permutation": fuse},
        )
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)


class TestInterpret(KernelTests):
  interpret = True


@pytest.mark.gpu
class TestGPU(KernelTests):
  interpret = False


@pytest.mark.parametrize(
  "mutate, match",
  [
    (
      lambda a: (*(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 16))) for x in a[:3]), *a[3:]),
      "head_dim=48",
    ),
    (lambda a: (a[0].astype(jnp.int32), *a[1:]), "dtype"),
    (lambda a: (a[0][:, :, :3], *a[1:]), "multiple of kv heads"),
    (lambda a: (*a[:3], a[3][..., :10], *a[4:]), "q_pos must be"),
    (lambda a: (*a[:6], a[6] + 7, *a[7:]), "block_count must lie"),
    (lambda a: (*a[:5], a[5] + 100, *a[6:]), "block_idx out of range"),
  ],
)
def test_bad_kernel_inputs(mutate, match):
  args = random_plan_inputs(1, 1, 64, 4, 2, 32, jnp.float32, 16, 16, 2, 4)
  with pytest.raises(ValueError, match=match):
    sparse_attention(*mutate(args), block_q=16, block_k=16, interpret=True, debug=True)


def test_length_must_divide_blocks():
  args = random_plan_inputs(1, 1, 64, 2, 1, 32, jnp.float32, 16, 16, 2, 4)
  with pytest.raises(ValueError, match="multiple of block_q"):
    sparse_attention(*args, block_q=128, block_k=16, interpret=True)


def test_mmjax_pallas_backend_errors():
  q, k, v, mod = helpers.random_inputs(0, 1, 64, 2, 1, 48, jnp.float32)
  with pytest.raises(ValueError, match="head_dim"):
    mmjax.sparse_attention(q, k, v, helpers.small_policies()["dense"], mod, backend="pallas")
  q, k, v, mod = helpers.random_inputs(0, 1, 64, 2, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="return_lse"):
    mmjax.sparse_attention(
      q, k, v, helpers.small_policies()["dense"], mod, backend="pallas", return_lse=True
    )
