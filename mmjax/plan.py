"""`SparsePlan`: the block layout a policy builds and a backend executes.

Shape legend: B batch, T queries (= S keys in prefill), N query heads, L padded length
(a multiple of the block sizes), nQ = L // block_q query blocks, nK = L // block_k key
blocks, MB / MC the static maximum number of key blocks / single key columns per query block.

A plan lives in a *view*: queries and keys may be permuted (per batch and head) so that a
sparse pattern becomes dense blocks. `q_perm[b, n, i]` is the ORIGINAL position of the
query at view index i (likewise `k_perm` for keys). Positions >= T are padding. Causality
is always applied elementwise by original positions (key pos <= query pos), so a permuted
plan is exactly as causal as an unpermuted one, and padded keys are never seen by real
queries.

For query block i (view order) of head n, the backend visits
  * key blocks `block_idx[b, n, i, :block_count[b, n, i]]` (units of block_k, view order),
  * single keys `col_idx[b, n, i, :col_count[b, n, i]]` (view indices, none of them inside
    a listed block, no duplicates).
Entries past the counts are in range but meaningless.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparsePlan:
  """Per (batch, head, query block) lists of key blocks and key columns to visit.

  Attributes:
    block_idx: [B, N, nQ, MB] int32 key-block indices (view order).
    block_count: [B, N, nQ] int32 valid entries of `block_idx`.
    col_idx: [B, N, nQ, MC] int32 single key indices (view order); MC may be 0.
    col_count: [B, N, nQ] int32 valid entries of `col_idx`.
    q_perm: [B, N, L] int32 original position of each view query, or None (identity).
    k_perm: [B, N, L] int32 original position of each view key, or None (identity).
    aux: dict of extra per-head arrays a policy reports (e.g. "stride": [B, N]).
    seq_len: T, the real (unpadded) length. Static.
    block_q, block_k: block sizes. Static.
  """

  block_idx: jax.Array
  block_count: jax.Array
  col_idx: jax.Array
  col_count: jax.Array
  q_perm: jax.Array | None
  k_perm: jax.Array | None
  aux: dict[str, Any]
  seq_len: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))

  # ---- static sizes -------------------------------------------------------------------
  @property
  def batch(self) -> int:
    return self.block_idx.shape[0]

  @property
  def num_heads(self) -> int:
    return self.block_idx.shape[1]

  @property
  def num_q_blocks(self) -> int:
    return self.block_idx.shape[2]

  @property
  def padded_len(self) -> int:
    return self.num_q_blocks * self.block_q

  @property
  def num_k_blocks(self) -> int:
    return self.padded_len // self.block_k

  @property
  def max_blocks(self) -> int:
    return self.block_idx.shape[3]

  @property
  def max_cols(self) -> int:
    return self.col_idx.shape[3]

  # ---- positions ----------------------------------------------------------------------
  def q_positions(self) -> jax.Array:
    """[B, N, L] original position of each view query."""
    if self.q_perm is not None:
      return self.q_perm
    return jnp.broadcast_to(
      jnp.arange(self.padded_len, dtype=jnp.int32), (self.batch, self.num_heads, self.padded_len)
    )

  def k_positions(self) -> jax.Array:
    """[B, N, L] original position of each view key."""
    if self.k_perm is not None:
      return self.k_perm
    return jnp.broadcast_to(
      jnp.arange(self.padded_len, dtype=jnp.int32), (self.batch, self.num_heads, self.padded_len)
    )

  # ---- masks --------------------------------------------------------------------------
  def view_block_mask(self) -> jax.Array:
    """[B, N, nQ, nK] bool: key blocks listed for each query block (view order)."""
    valid = jnp.arange(self.max_blocks) < self.block_count[..., None]
    b, n, i, _ = jnp.indices(self.block_idx.shape, sparse=True)
    out = jnp.zeros(self.block_count.shape + (self.num_k_blocks,), jnp.int32)
    out = out.at[b, n, i, self.block_idx].add(valid.astype(jnp.int32))
    return out > 0

  def view_col_mask(self) -> jax.Array:
    """[B, N, nQ, L] bool: single keys listed for each query block (view order)."""
    valid = jnp.arange(self.max_cols) < self.col_count[..., None]
    b, n, i, _ = jnp.indices(self.col_idx.shape, sparse=True)
    out = jnp.zeros(self.col_count.shape + (self.padded_len,), jnp.int32)
    return out.at[b, n, i, self.col_idx].add(valid.astype(jnp.int32)) > 0

  def view_mask(self) -> jax.Array:
    """[B, N, L, L] bool: admitted (query, key) pairs in view order, causality included."""
    m = jnp.repeat(self.view_block_mask(), self.block_k, axis=3)
    m = jnp.repeat(m | self.view_col_mask(), self.block_q, axis=2)
    qp, kp = self.q_positions(), self.k_positions()
    return m & (kp[:, :, None, :] <= qp[:, :, :, None])

  def to_dense_mask(self) -> jax.Array:
    """[B, N, T, T] bool admitted pairs in ORIGINAL positions (small inputs: tests, plots)."""
    return self.mask_rows(np.arange(self.seq_len, dtype=np.int32))

  def mask_rows(self, rows) -> jax.Array:
    """[B, N, R, T] bool: `to_dense_mask()[:, :, rows]`, the admitted keys (original order,
    causality included) of the queries at ORIGINAL positions `rows` [R] int, each row
    taken from its view query block's lists (memory O(R * L), not O(L * L)).
    """
    t = self.seq_len
    if jnp.ndim(rows) != 1:
      raise ValueError(f"mask_rows: rows must be 1-D ints in [0, {t}); got shape {jnp.shape(rows)}")
    if not isinstance(rows, jax.core.Tracer):  # concrete rows: their dtype and range too
      arr = np.asarray(rows)
      if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= t)):
        raise ValueError(
          f"mask_rows: rows must be 1-D ints in [0, {t}); got {arr.dtype}"
          + (f" in [{arr.min()}, {arr.max()}]" if arr.dtype.kind in "iu" else "")
        )
    rows = jnp.asarray(rows, jnp.int32)
    # the view query block of each row: original position p sits at view index inv_q[p]
    inv_q = jnp.argsort(self.q_positions(), axis=-1)  # [B, N, L]
    qb = (inv_q[..., rows] // self.block_q)[..., None]  # [B, N, R, 1]
    m = jnp.repeat(jnp.take_along_axis(self.view_block_mask(), qb, axis=2), self.block_k, axis=3)
    m = m | jnp.take_along_axis(self.view_col_mask(), qb, axis=2)  # [B, N, R, L] view keys
    # original key p sits at view index inv_k[p]; keep keys at or before each row
    inv_k = jnp.argsort(self.k_positions(), axis=-1)[..., :t]  # [B, N, T]
    m = jnp.take_along_axis(m, inv_k[:, :, None, :], axis=3)
    return m & (jnp.arange(t, dtype=jnp.int32)[None, :] <= rows[:, None])

  # ---- cost ---------------------------------------------------------------------------
  def computed_pairs(self) -> jax.Array:
    """[B, N] float32 count of causal (query, key) pairs the plan computes (real tokens).

    Counted block by block without materialising an [L, L] mask (memory O(L * MB)).
    """
    t = self.seq_len
    qp = self.q_positions().reshape(self.batch, self.num_heads, self.num_q_blocks, self.block_q)
    kp = self.k_positions()
    kpb = kp.reshape(self.batch, self.num_heads, self.num_k_blocks, self.block_k)

    def per_head(qp_h, kpb_h, kp_h, bidx, bcnt, cidx, ccnt):
      # qp_h [nQ, bq], kpb_h [nK, bk], bidx [nQ, MB], cidx [nQ, MC]
      def per_qblock(args):
        qpos, idx, cnt, cols, ccount = args
        qreal = qpos < t
        kblk = kpb_h[idx]  # [MB, bk]
        ok = (kblk[:, None, :] <= qpos[None, :, None]) & qreal[None, :, None]
        ok &= (jnp.arange(idx.shape[0]) < cnt)[:, None, None]
        ck = kp_h[cols]  # [MC]
        cok = (ck[None, :] <= qpos[:, None]) & qreal[:, None]
        cok &= (jnp.arange(cols.shape[0]) < ccount)[None, :]
        return ok.sum(dtype=jnp.int32) + cok.sum(dtype=jnp.int32)

      # per-block counts fit int32; a head's total (up to T^2 / 2) may not: sum in f32.
      return jax.lax.map(per_qblock, (qp_h, bidx, bcnt, cidx, ccnt)).astype(jnp.float32).sum()

    f = jax.vmap(jax.vmap(per_head))
    return f(qp, kpb, kp, self.block_idx, self.block_count, self.col_idx, self.col_count)

  def density(self) -> jax.Array:
    """Fraction of causal (query, key) pairs computed, over all batches and heads."""
    t = self.seq_len
    causal = t * (t + 1) // 2 * self.batch * self.num_heads
    return self.computed_pairs().sum() / np.float32(causal)

  def head_density(self) -> jax.Array:
    """[B, N] fraction of causal pairs computed per head."""
    t = self.seq_len
    return self.computed_pairs() / np.float32(t * (t + 1) // 2)
