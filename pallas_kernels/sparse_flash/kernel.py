"""Block-sparse + column flash attention (prefill forward), Pallas on the Triton lowering.

Shape legend: B batch, L length (a multiple of the block sizes), N query heads, K kv
heads (N % K == 0: GQA, k/v are never repeated), H head dim, nQ = L // block_q,
MB / MC the widths of the block / column index lists.

All tensors are in the caller's *view order* (a permutation of the tokens per batch and
head). `q_pos` / `k_pos` give every view token's ORIGINAL position; causality is applied
elementwise by them, so permuted layouts stay exactly causal.

Algorithm, one program per (query block i, batch b, head n):
  load q [block_q, H] and its positions;
  for t in range(block_count[b, n, i]):            # trip count read from memory
    j = block_idx[b, n, i, t]; load k, v, positions of key block j (contiguous slice)
    s = q k^T * scale * log2(e); mask k_pos > q_pos with -inf
    online softmax in base 2 (running max m, sum l, fp32 accumulator acc)
  for c in range(ceil(col_count / C)):              # single key columns, C at a time
    gather C rows of k, v and their positions by index; mask past the count; same update
  o = acc / l (0 where no key was admissible)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel knobs. block_q / block_k must equal the plan's; `col_chunk` columns are
  gathered per step (a power of two >= 16, the smallest matrix-unit tile)."""

  block_q: int = 64
  block_k: int = 64
  col_chunk: int = 16
  num_warps: int = 4
  num_stages: int = 2


def _kernel(
  cnt_ref,
  ccnt_ref,  # [nQ] counts of this (b, n)
  bidx_ref,  # [MB] key blocks of this query block
  cidx_ref,  # [MCp] key columns of this query block
  qpos_ref,  # [block_q]
  kpos_ref,  # [L] positions of the view keys (this kv head's; fused: this q head's)
  q_ref,  # [block_q, H] (fused: [L, H], original order)
  k_ref,
  v_ref,  # [L, H] (fused: original order)
  o_ref,  # [block_q, H] (fused: [L, H], original order)
  *,
  scale: float,
  block_k: int,
  col_chunk: int,
  fused: bool,
):
  i = pl.program_id(0)
  qpos = qpos_ref[...]
  # fused: q, k, v and o stay in original order; rows are gathered / scattered by position.
  q = q_ref[qpos, :] if fused else q_ref[...]
  block_q, head_dim = q.shape
  qk_scale = scale * LOG2E
  tf32 = q.dtype != jnp.float32  # f32 inputs get f32 dots (TF32 only matters for f32)

  def update(carry, k, v, admit):
    """One online-softmax step over keys k, v [c, H] with admit [block_q, c] bool."""
    acc, m, l = carry
    # [block_q, H] x [c, H]^T -> [block_q, c]
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=tf32) * qk_scale
    s = jnp.where(admit, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing admitted yet
    p = jnp.where(admit, jnp.exp2(s - m_safe[:, None]), 0.0)
    corr = jnp.exp2(m - m_safe)  # exp2(-inf) = 0 for the first admitted keys
    l = l * corr + jnp.sum(p, axis=1)
    # [block_q, c] x [c, H] -> [block_q, H]
    acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=tf32)
    return acc, m_new, l

  def block_body(t, carry):
    start = bidx_ref[t] * block_k
    sl = pl.ds(start, block_k)
    kpos = kpos_ref[sl]
    admit = kpos[None, :] <= qpos[:, None]
    rows = kpos if fused else sl
    return update(carry, k_ref[rows, :], v_ref[rows, :], admit)

  init = (
    jnp.zeros((block_q, head_dim), jnp.float32),
    jnp.full((block_q,), -jnp.inf, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  carry = jax.lax.fori_loop(0, cnt_ref[i], block_body, init)

  ccount = ccnt_ref[i]

  def col_body(c, carry):
    offs = c * col_chunk + jnp.arange(col_chunk)
    valid = offs < ccount
    cols = jnp.where(valid, cidx_ref[pl.ds(c * col_chunk, col_chunk)], 0)
    kpos = kpos_ref[cols]  # gathers
    admit = valid[None, :] & (kpos[None, :] <= qpos[:, None])
    rows = kpos if fused else cols
    return update(carry, k_ref[rows, :], v_ref[rows, :], admit)

  n_chunks = (ccount + col_chunk - 1) // col_chunk
  carry = jax.lax.fori_loop(0, n_chunks, col_body, carry)

  acc, _, l = carry
  out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
  if fused:
    o_ref[qpos, :] = out.astype(o_ref.dtype)  # scatter rows back to original positions
  else:
    o_ref[...] = out.astype(o_ref.dtype)


def check_qkv(q, k, v):
  """Shape checks of q [B, L, N, H], k and v [B, L, K, H] (N % K == 0): (B, L, N, K, H)."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q must be [B, L, N, H] and k, v [B, L, K, H]; got {q.shape}, {k.shape}")
  b, length, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[1] != length or k.shape[3] != h:
    raise ValueError(
      f"k and v must be [B, L, K, H] = [{b}, {length}, K, {h}]; got {k.shape}, {v.shape}"
    )
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
  return b, length, n, kh, h


def check_index_list(name, idx, count, bnq, bound, debug):
  """Checks an index list idx [B, N, nQ, M] int32 and its count [B, N, nQ] int32 (bnq the
  shape). With `debug` and concrete inputs also that counts lie in [0, M] and the listed
  entries in [0, bound); then returns the used-slot mask [B, N, nQ, M] (numpy), else None."""
  cname = name.replace("_idx", "_count")
  if tuple(count.shape) != bnq or count.dtype != jnp.int32:
    raise ValueError(f"{cname} must be int32 of shape {bnq}; got {count.dtype} {count.shape}")
  if idx.ndim != 4 or tuple(idx.shape[:3]) != bnq or idx.dtype != jnp.int32:
    raise ValueError(
      f"{name} must be int32 of shape ({', '.join(map(str, bnq))}, M); got {idx.dtype} {idx.shape}"
    )
  if not debug or any(isinstance(x, jax.core.Tracer) for x in (idx, count)):
    return None
  m = idx.shape[3]
  cnt, ix = np.asarray(count), np.asarray(idx)
  if (cnt < 0).any() or (cnt > m).any():
    raise ValueError(f"{cname} must lie in [0, {m}]")
  used = np.arange(m) < cnt[..., None]
  if ((ix < 0) | (ix >= bound))[used].any():
    raise ValueError(f"{name} out of range [0, {bound})")
  return used


def _check(
  q,
  k,
  v,
  q_pos,
  k_pos,
  block_idx,
  block_count,
  col_idx,
  col_count,
  block_q,
  block_k,
  debug,
  fused=False,
):
  b, length, n, kh, h = check_qkv(q, k, v)
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
      f"dtype: q, k, v must share one of {[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}; "
      f"got {q.dtype}, {k.dtype}, {v.dtype}"
    )
  if h not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim={h} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
  for name, bs in (("block_q", block_q), ("block_k", block_k)):
    if bs < 16 or bs & (bs - 1):
      raise ValueError(f"{name}={bs} must be a power of two >= 16")
    if length % bs:
      raise ValueError(f"L={length} must be a multiple of {name}={bs} (pad the inputs)")
  nq = length // block_q
  want = {"q_pos": ((b, n, length), q_pos), "k_pos": ((b, n if fused else kh, length), k_pos)}
  for name, (shape, arr) in want.items():
    if tuple(arr.shape) != shape or arr.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32 of shape {shape}; got {arr.dtype} {arr.shape}")
  check_index_list("block_idx", block_idx, block_count, (b, n, nq), length // block_k, debug)
  check_index_list("col_idx", col_idx, col_count, (b, n, nq), length, debug)
  return b, length, n, kh, h


def sparse_attention(
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
  block_q: int,
  block_k: int,
  sm_scale: float | None = None,
  interpret: bool = False,
  debug: bool = False,
  col_chunk: int | None = None,
  num_warps: int | None = None,
  num_stages: int | None = None,
  poison: float | None = None,
  fuse_permutation: bool = False,
):
  """Attention over the listed key blocks and columns, causal by original positions.

  Args:
    q: [B, L, N, H] queries in view order.
    k, v: [B, L, K, H] keys and values in view order (shared by the N // K query heads of
      each kv head).
    q_pos: [B, N, L] int32 original positions of the view queries.
    k_pos: [B, K, L] int32 original positions of the view keys.
    block_idx: [B, N, nQ, MB] int32 key-block indices; block_count [B, N, nQ] valid ones.
    col_idx: [B, N, nQ, MC] int32 key indices (none inside a listed block);
      col_count [B, N, nQ] valid ones. MC may be 0.
    block_q, block_k: the plan's block sizes.
    sm_scale: softmax scale, 1/sqrt(H) by default.
    interpret: run the kernel in Pallas interpret mode (CPU).
    debug: with concrete inputs, check index ranges and counts first.
    poison: tests only: start from an output buffer filled with this value (aliased into
      the kernel), so any tile the kernel fails to write keeps it.
    fuse_permutation: q, k, v and the output are in ORIGINAL order and k_pos is per query
      head, [B, N, L]; the kernel gathers q/k/v rows by position and scatters output rows
      (no permuted copies, k/v never repeated per query head).

  Returns:
    [B, L, N, H] in q's dtype, view order (fused: original order).
  """
  b, length, n, kh, h = _check(
    q,
    k,
    v,
    q_pos,
    k_pos,
    block_idx,
    block_count,
    col_idx,
    col_count,
    block_q,
    block_k,
    debug,
    fuse_permutation,
  )
  d = BlockSizes()
  col_chunk = col_chunk or d.col_chunk
  if col_chunk < 16 or col_chunk & (col_chunk - 1):
    raise ValueError(f"col_chunk={col_chunk} must be a power of two >= 16")
  mc = col_idx.shape[3]
  if mc == 0 or mc % col_chunk:  # whole chunks are loaded; the count masks the tail
    col_idx = jnp.pad(col_idx, ((0, 0), (0, 0), (0, 0), (0, col_chunk - mc % col_chunk)))
  return _call(
    q,
    k,
    v,
    q_pos,
    k_pos,
    block_idx,
    block_count,
    col_idx,
    col_count,
    block_q=block_q,
    block_k=block_k,
    sm_scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(h)),
    interpret=interpret,
    col_chunk=col_chunk,
    num_warps=num_warps or d.num_warps,
    num_stages=num_stages or d.num_stages,
    poison=poison,
    fused=fuse_permutation,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "block_q",
    "block_k",
    "sm_scale",
    "interpret",
    "col_chunk",
    "num_warps",
    "num_stages",
    "poison",
    "fused",
  ),
)
def _call(
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
  sm_scale,
  interpret,
  col_chunk,
  num_warps,
  num_stages,
  poison,
  fused,
):
  b, length, n, h = q.shape
  g = n // k.shape[2]
  nq = length // block_q
  mb, mcp = block_idx.shape[3], col_idx.shape[3]

  def bh(j):  # grid axis 1 -> (batch, q head, kv head)
    return j // n, j % n, (j % n) // g

  head = lambda i, j: (bh(j)[0], bh(j)[1], 0)  # noqa: E731  (this q head, whole length)
  kv_head = lambda i, j: (bh(j)[0], bh(j)[2], 0)  # noqa: E731
  if fused:  # whole sequences in original order; rows picked by position in the kernel
    q_spec = pl.BlockSpec((None, length, None, h), lambda i, j: (bh(j)[0], 0, bh(j)[1], 0))
    kpos_spec = pl.BlockSpec((None, None, length), head)
    out_spec = q_spec
  else:
    q_spec = pl.BlockSpec((None, block_q, None, h), lambda i, j: (bh(j)[0], i, bh(j)[1], 0))
    kpos_spec = pl.BlockSpec((None, None, length), kv_head)
    out_spec = q_spec
  kv_spec = pl.BlockSpec((None, length, None, h), lambda i, j: (bh(j)[0], 0, bh(j)[2], 0))
  in_specs = [
    pl.BlockSpec((None, None, nq), head),  # block_count
    pl.BlockSpec((None, None, nq), head),  # col_count
    pl.BlockSpec((None, None, None, mb), lambda i, j: (bh(j)[0], bh(j)[1], i, 0)),
    pl.BlockSpec((None, None, None, mcp), lambda i, j: (bh(j)[0], bh(j)[1], i, 0)),
    pl.BlockSpec((None, None, block_q), lambda i, j: (bh(j)[0], bh(j)[1], i)),  # q_pos
    kpos_spec,
    q_spec,
    kv_spec,
    kv_spec,
  ]
  kernel = functools.partial(
    _kernel, scale=sm_scale, block_k=block_k, col_chunk=col_chunk, fused=fused
  )
  args = [block_count, col_count, block_idx, col_idx, q_pos, k_pos, q, k, v]
  aliases = {}
  if poison is not None:  # a poisoned buffer becomes the output (the kernel ignores it)
    in_specs.append(out_spec)
    args.append(jnp.full(q.shape, poison, q.dtype))
    aliases = {len(args) - 1: 0}
    kernel = functools.partial(_drop_aliased_input, kernel)
  return pl.pallas_call(
    kernel,
    grid=(nq, b * n),
    in_specs=in_specs,
    out_specs=out_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="mmjax_sparse_flash",
  )(*args)


def _drop_aliased_input(kernel, *refs):
  *ins, _aliased, out = refs
  kernel(*ins, out)
