"""pallas_kernels.sparse_flash against its pure-jnp reference, on fresh random inputs.

`KernelTests` holds the Triton kernel's checks; `TestInterpret` runs them on the CPU in
interpret mode, `TestGPU` compiled on a GPU (pytest --gpu -m gpu). The Mosaic GPU kernel
cannot run in interpret mode: `TestMosaicGPU` runs on a Hopper GPU only; its argument
checks and the backend's kernel choice are tested on the CPU."""

import functools

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


# ----------------------------------------------------------------------------------------
# the Mosaic GPU kernel (Hopper only: jax's Mosaic GPU interpret mode cannot run it)
# ----------------------------------------------------------------------------------------
def identity_plan_inputs(seed, b, length, n, kh, h, dtype, bk, density=0.5):
  """q, k, v and ascending causal block lists (diagonal blocks kept, one empty row)."""
  rng = np.random.default_rng(seed)
  q, k, v = (
    jnp.asarray(rng.standard_normal((b, length, heads, h)), jnp.float32).astype(dtype)
    for heads in (n, kh, kh)
  )
  nq, bq = length // 128, 128
  idx = np.zeros((b, n, nq, length // bk), np.int32)
  cnt = np.zeros((b, n, nq), np.int32)
  for bb, nn, i in np.ndindex(b, n, nq):
    js = np.arange(((i + 1) * bq - 1) // bk + 1)
    keep = js[(js >= i * bq // bk) | (rng.random(js.size) < density)]
    idx[bb, nn, i, : keep.size] = keep
    cnt[bb, nn, i] = keep.size
  cnt[0, 0, 1] = 0  # a query block with nothing listed outputs zeros
  return q, k, v, jnp.asarray(idx), jnp.asarray(cnt)


def _identity_reference(q, k, v, idx, cnt, bk):
  b, length, n, _ = q.shape
  pos = jnp.arange(length, dtype=jnp.int32)
  none = jnp.zeros(idx.shape[:3] + (0,), jnp.int32)
  return sparse_attention_reference(
    q,
    k,
    v,
    jnp.broadcast_to(pos, (b, n, length)),
    jnp.broadcast_to(pos, (b, k.shape[2], length)),
    idx,
    cnt,
    none,
    jnp.zeros_like(cnt),
    block_q=128,
    block_k=bk,
  )


@pytest.mark.gpu
class TestMosaicGPU:
  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  @pytest.mark.parametrize("bk, h, density", [(64, 128, 0.5), (128, 128, 1.0), (64, 64, 0.2)])
  def test_matches_reference(self, dtype, bk, h, density):
    from pallas_kernels.sparse_flash import mosaic

    q, k, v, idx, cnt = identity_plan_inputs(bk + h, 2, 1024, 4, 2, h, dtype, bk, density)
    out = mosaic.sparse_attention(q, k, v, idx, cnt, block_q=128, block_k=bk, debug=True)
    ref = _identity_reference(q, k, v, idx, cnt, bk)
    assert out.shape == q.shape and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=3e-2, rtol=3e-2)
    np.testing.assert_array_equal(out[0, 128:256, 0], 0.0)

  def test_through_mmjax_policies(self):
    for name in ("dense", "a_shape", "block_sparse"):
      pol = helpers.small_policies(128, 64)[name]
      q, k, v, mod = helpers.random_inputs(4, 1, 1000, 4, 2, 128, jnp.bfloat16)
      plan = pol.plan(q, k, mod)
      ref = mmjax.sparse_attention(q, k, v, plan=plan, backend="reference")
      out = mmjax.sparse_attention(
        q, k, v, plan=plan, backend="pallas", pallas_options={"kernel": "mosaic"}
      )
      np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2, rtol=3e-2
      )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(block_q=64), "block_q=128"),
    (dict(block_k=32), "block_k 64 or 128"),
    (dict(interpret=True), "interpret mode"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps"),
  ],
)
def test_mosaic_kernel_bad_arguments(kwargs, match):
  from pallas_kernels.sparse_flash import mosaic

  q, k, v, idx, cnt = identity_plan_inputs(0, 1, 256, 2, 1, 64, jnp.bfloat16, 64)
  with pytest.raises(ValueError, match=match):
    mosaic.sparse_attention(q, k, v, idx, cnt, **{"block_q": 128, "block_k": 64, **kwargs})


def test_mosaic_kernel_bad_inputs():
  from pallas_kernels.sparse_flash import mosaic

  q, k, v, idx, cnt = identity_plan_inputs(0, 1, 256, 2, 1, 64, jnp.bfloat16, 64)
  run = functools.partial(mosaic.sparse_attention, block_q=128, block_k=64, debug=True)
  with pytest.raises(ValueError, match="dtype"):
    run(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), idx, cnt)
  with pytest.raises(ValueError, match="head_dim=32"):
    run(q[..., :32], k[..., :32], v[..., :32], idx, cnt)
  with pytest.raises(ValueError, match="ascending"):
    run(q, k, v, idx.at[0, 0, 1, :2].set(jnp.array([1, 0])), cnt.at[0, 0, 1].set(2))
  with pytest.raises(ValueError, match="out of range"):
    run(q, k, v, idx.at[0, 0, 0, 0].set(99), cnt)
  with pytest.raises(ValueError, match="block_count must lie"):
    run(q, k, v, idx, cnt + 9)


def test_pallas_kernel_choice_errors():
  q, k, v, mod = helpers.random_inputs(0, 1, 256, 2, 1, 64, jnp.bfloat16)
  plan = helpers.small_policies(128, 64)["block_sparse"].plan(q, k, mod)
  attend = functools.partial(mmjax.sparse_attention, q, k, v, plan=plan, backend="pallas")
  with pytest.raises(ValueError, match="kernel='bogus' is not one of"):
    attend(pallas_options={"kernel": "bogus"})
  with pytest.raises(ValueError, match="Mosaic GPU kernel cannot run this: it has no interp"):
    attend(pallas_options={"kernel": "mosaic"})  # the CPU: interpret mode
  with pytest.raises(ValueError, match="mosaic_steps.*the Triton kernel runs this plan"):
    attend(pallas_options={"mosaic_steps": 3})
  with pytest.raises(ValueError, match="unknown"):
    attend(pallas_options={"warps": 4})
  # auto on the CPU: the Triton kernel in interpret mode, equal to the reference
  out = attend()
  ref = mmjax.sparse_attention(q, k, v, plan=plan, backend="reference")
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2
  )
