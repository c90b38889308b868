"""Test helpers: random inputs, an independent numpy attention, plan invariants."""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import policies as P

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def random_inputs(seed, b, t, n, kh, h, dtype, modality="interleaved"):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, kh, h), jnp.float32).astype(dtype)
  if modality == "text":
    mod = None
  elif modality == "vision":
    mod = jnp.ones((b, t), jnp.int32)
  else:  # text prefix, then frames of 40 vision tokens after 8 text tokens, per batch shift
    pos = np.arange(t)
    mods = []
    for i in range(b):
      m = ((pos - 16 - 3 * i) % 48 >= 8) & (pos >= 16 + 3 * i)
      mods.append(m.astype(np.int32))
    mod = jnp.asarray(np.stack(mods))
  return q, k, v, mod


def numpy_attention(q, k, v, mask):
  """float64 masked softmax attention; mask [B, N, T, S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k = np.repeat(k, g, axis=2)
  v = np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.where(mask, np.exp(s), 0.0)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def small_policies(bq=16, bk=16):
  """Every policy with budgets small enough to be sparse at T ~ 200."""
  vs = P.get(
    "vertical_slash",
    last_q=16,
    vertical_size=20,
    slash_size=12,
    keep_first=4,
    keep_local=8,
    block_q=bq,
    block_k=bk,
  )
  ash = P.get("a_shape", sink_tokens=16, local_tokens=48, block_q=bq, block_k=bk)
  bs = P.get("block_sparse", top_k_blocks=3, block_q=bq, block_k=bk)
  grid = P.get(
    "grid",
    last_q=16,
    min_stride=8,
    max_stride=64,
    band_tokens=32,
    sink_tokens=16,
    top_k_blocks=2,
    block_q=bq,
    block_k=bk,
  )
  qb = P.get("q_boundary", patterns={0: vs, 1: ash}, default=bs, block_q=bq, block_k=bk)
  tb = P.get(
    "2d_boundary",
    patterns={(0, 0): vs, (1, 1): grid, (0, 1): bs, (1, 0): "dense"},
    default=ash,
    cross=bs,
    block_q=bq,
    block_k=bk,
  )
  return {
    "dense": P.get("dense", block_q=bq, block_k=bk),
    "a_shape": ash,
    "vertical_slash": vs,
    "block_sparse": bs,
    "grid": grid,
    "q_boundary": qb,
    "2d_boundary": tb,
  }


def mixed_table_policy(n, bq=16, bk=16):
  pols = list(small_policies(bq, bk).values())
  row = tuple(pols[(i * 3 + 1) % len(pols)] for i in range(n))
  return P.get("mminference", table=(row,), block_q=bq, block_k=bk)


def check_plan_invariants(plan):
  """Index lists in range, no duplicates, columns outside listed blocks."""
  bi, bc = np.asarray(plan.block_idx), np.asarray(plan.block_count)
  ci, cc = np.asarray(plan.col_idx), np.asarray(plan.col_count)
  assert bi.min(initial=0) >= 0 and bi.max(initial=0) < plan.num_k_blocks
  assert ci.min(initial=0) >= 0 and ci.max(initial=0) < plan.padded_len
  assert (bc >= 0).all() and (bc <= plan.max_blocks).all()
  assert (cc >= 0).all() and (cc <= plan.max_cols).all()
  for idx in np.ndindex(bc.shape):
    blocks = bi[idx][: bc[idx]]
    assert len(set(blocks.tolist())) == len(blocks), f"duplicate blocks at {idx}"
    cols = ci[idx][: cc[idx]]
    assert len(set(cols.tolist())) == len(cols), f"duplicate columns at {idx}"
    assert not set((cols // plan.block_k).tolist()) & set(blocks.tolist()), (
      f"column inside a listed block at {idx}"
    )
