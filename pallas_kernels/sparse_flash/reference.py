"""Pure-jnp reference of the sparse_flash kernel: the admissible mask, then fp32 softmax."""

import math

import jax
import jax.numpy as jnp


def admissible_mask(q_pos, k_pos, block_idx, block_count, col_idx, col_count, *, block_q, block_k):
  """[B, N, L, L] bool: (view query, view key) pairs the kernel must attend."""
  b, n, nq, mb = block_idx.shape
  length = nq * block_q
  g = n // k_pos.shape[1]
  kpos = jnp.repeat(k_pos, g, axis=1)  # [B, N, L]
  valid = jnp.arange(mb) < block_count[..., None]
  bi, ni, qi, _ = jnp.indices(block_idx.shape, sparse=True)
  blocks = jnp.zeros((b, n, nq, length // block_k), jnp.int32)
  blocks = blocks.at[bi, ni, qi, block_idx].add(valid.astype(jnp.int32)) > 0
  mask = jnp.repeat(jnp.repeat(blocks, block_q, axis=2), block_k, axis=3)
  cvalid = jnp.arange(col_idx.shape[3]) < col_count[..., None]
  bi, ni, qi, _ = jnp.indices(col_idx.shape, sparse=True)
  cols = jnp.zeros((b, n, nq, length), jnp.int32)
  cols = cols.at[bi, ni, qi, col_idx].add(cvalid.astype(jnp.int32)) > 0
  mask |= jnp.repeat(cols, block_q, axis=2)
  return mask & (kpos[:, :, None, :] <= q_pos[:, :, :, None])


def sparse_attention_reference(
  q,
  k,
  v,
  q_pos,
  k_pos,
  block_idx,
  block_count,
  col_idx,
  col_count,
  *,
  block_q,
  block_k,
  sm_scale=None,
):
  """Same contract as `sparse_attention`, materialising the mask (small inputs only)."""
  n, kh, h = q.shape[2], k.shape[2], q.shape[3]
  scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(h)
  mask = admissible_mask(
    q_pos, k_pos, block_idx, block_count, col_idx, col_count, block_q=block_q, block_k=block_k
  )
  kr = jnp.repeat(k, n // kh, axis=2).astype(jnp.float32)
  vr = jnp.repeat(v, n // kh, axis=2).astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  # [B, L, N, H] x [B, L, N, H] -> [B, N, L, L]
  s = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), kr, precision=hp) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  # [B, N, L, L] x [B, L, N, H] -> [B, L, N, H]
  return jnp.einsum("bnqk,bknh->bqnh", p, vr, precision=hp).astype(q.dtype)


def sparse_attention_reference_fused(
  q,
  k,
  v,
  q_pos,
  k_pos,
  block_idx,
  block_count,
  col_idx,
  col_count,
  *,
  block_q,
  block_k,
  sm_scale=None,
):
  """The `fuse_permutation=True` contract: q, k, v and the output in ORIGINAL order,
  k_pos [B, N, L] per query head. Gathers into view order, runs the reference, scatters."""
  n, kh = q.shape[2], k.shape[2]
  heads = jnp.arange(n) // (n // kh)
  # [B, L, N, H]: view row i of head n is original row q_pos[b, n, i]
  qv = jnp.take_along_axis(q, q_pos.transpose(0, 2, 1)[..., None], axis=1)
  kv = jnp.take_along_axis(k[:, :, heads], k_pos.transpose(0, 2, 1)[..., None], axis=1)
  vv = jnp.take_along_axis(v[:, :, heads], k_pos.transpose(0, 2, 1)[..., None], axis=1)
  out = sparse_attention_reference(
    qv,
    kv,
    vv,
    q_pos,
    k_pos,
    block_idx,
    block_count,
    col_idx,
    col_count,
    block_q=block_q,
    block_k=block_k,
    sm_scale=sm_scale,
  )
  inv = jnp.argsort(q_pos, axis=-1).transpose(0, 2, 1)  # view index of each position
  return jnp.take_along_axis(out, inv[..., None], axis=1)
