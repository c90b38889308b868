"""Each row's top-k masked pooled-block scores, without writing the scores; Pallas on the
Triton lowering.

The planner's block_sparse / grid picks are the k best pooled scores of each query
block: S = qp kp^T * scale over the pooled query and key blocks [nQ, nK], -inf where a
pair is not allowed. `pooled_scores` writes S (and its chunk maxima) and a top-k reads
the best chunks back: at 1M tokens that is 0.5 GB of S per head written. Here a program
keeps its rows' k best entries in registers while it sweeps the key blocks, so S never
leaves them.

Algorithm, one program per `block_m` rows (q tile in registers):
  run = k empty slots per row
  for each tile of `block_n` key blocks, in column order, from the first to the last tile
  that holds a pair the program may allow (`_tile_ranges`, computed by the wrapper):
    skip it if no pair is allowed (max q_lim < min k_lim)
    s = qp kp^T * scale, rounded to the inputs' dtype          [bm, bn], the same dot as
                                                               pooled_scores' tile
    key = s's f32 bits, order-preserving, | (0xFFFF - column);  (bf16 inputs: s rounded
          the lowest key where k_lim[j] > q_lim[i]               to bf16 has 16 zero bits)
    b = each row's greatest key
    while some row's b beats its worst slot w:
      rows where b > w: w takes b;  then b = the row's greatest key below b
  store the slots                                               [bm, k] (as a set)

The slots are the top k under the order (value descending, column ascending), the order
of `lax.top_k`: a greater key is a greater value, or an equal value at a lower column, so
one integer comparison decides, whatever order the columns arrive in. Empty slots hold
distinct keys below every entry's; rows with fewer than k allowed pairs keep them (-inf,
column 0). Each pass of the loop moves at most one entry per row, and after the first
tiles a row rarely takes more than one or two from a tile. f32 inputs have no spare bits:
their slots hold (value, column) pairs, and the comparison is made of both parts.

`sort_blocks=True` (for permuted views): in a grid-permuted view every tile holds some
allowed pair, so none is skipped, though only about half the pairs are allowed. The
wrapper then sorts the query blocks by q_lim and the key blocks by k_lim (stable), so
that each program's allowed keys are a prefix of the sorted keys: a program visits only
the tiles of that prefix (a count per program, from a binary search), with the key
blocks' own column ids. Columns then arrive out of order, which the order above handles
(an entry replaces a worst slot of equal value when its column is lower). The same picks;
the rows are put back in their order at the end. (On an H200 the packed keys saved 6% of grid's
1M picks, 5.90 -> 5.57 ms; sorted blocks then save 9% more, 5.53 -> 5.03 ms, but their
sorts cost the plan more than that: h200_2026-12-02f. Keys from the f32 bits and passes
that leave the tile alone then took grid's 1M picks 5.53 -> 4.93 ms: h200_2026-12-02g.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.pooled_scores.kernel import check_pooled, dot_tf32, pad_to_tiles
from pallas_kernels.spans import true_span

_BIG = 2**30
_EMPTY = -(2**31)  # the packed key of a pair that is not allowed (empty slots: _EMPTY + slot)
_FULL = 2**31 - 1  # the packed key of a slot past k: never the worst, never replaced
MAX_PACKED_COLUMNS = 2**16  # bf16 inputs' keys hold the column in their low 16 bits
NUM_STAGES = 2  # Triton software-pipeline stages of the loop over key tiles


def _kernel(
  qp_ref, kp_ref, qlim_ref, klim_ref, *refs, scale, k, block_n, n_tiles, tf32, sort_blocks, packed
):
  if sort_blocks:  # the key blocks' column ids (sorted order), tiles per program
    kid_ref, ntile_ref, *out_refs = refs
  else:  # the program's first and past-last tile with an allowed pair (`_tile_ranges`)
    first_ref, end_ref, *out_refs = refs
  dtype = qp_ref.dtype
  bm, slots = out_refs[0].shape
  q, q_lim = qp_ref[...], qlim_ref[...]
  slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
  q_max = jnp.max(q_lim)

  def tile(t, carry):
    if sort_blocks:
      cols = kid_ref[pl.ds(t * block_n, block_n)]
    else:
      cols = t * block_n + jnp.arange(block_n, dtype=jnp.int32)
    k_lim = klim_ref[pl.ds(t * block_n, block_n)]

    def scores(carry):
      kp = kp_ref[pl.ds(t * block_n, block_n), :]
      s = plgpu.dot(q, kp, trans_b=True, allow_tf32=tf32) * scale  # [bm, bn]
      allowed = k_lim[None, :] <= q_lim[:, None]
      if packed:
        key = jnp.where(allowed, _pack(s, cols), _EMPTY)
        return _insert_packed(key, carry)
      s = jnp.where(allowed, s, -jnp.inf)
      s = s.astype(dtype).astype(jnp.float32)  # (pooled_scores' values: rounded)
      return _insert(s, cols, slot, *carry)

    return jax.lax.cond(q_max >= jnp.min(k_lim), scores, lambda c: c, carry)

  pid = pl.program_id(0)
  if sort_blocks:
    t0, t1 = 0, ntile_ref[pid]
  else:
    t0, t1 = first_ref[pid], end_ref[pid]
  if packed:  # empty slots: distinct keys below any entry's; past k (a power of two): _FULL
    keys0 = jnp.where(slot < k, _EMPTY + slot, _FULL) + jnp.zeros((bm, 1), jnp.int32)
    out_refs[0][...] = jax.lax.fori_loop(t0, t1, tile, keys0)
  else:  # slots past k hold +inf
    vals0 = jnp.where(slot < k, -jnp.inf, jnp.inf) + jnp.zeros((bm, 1), jnp.float32)
    idx0 = jnp.zeros((bm, slots), jnp.int32)
    vals, idx = jax.lax.fori_loop(t0, t1, tile, (vals0, idx0))
    out_refs[0][...] = idx
    out_refs[1][...] = vals


def input_specs(block_m, n_k, h):
  """The BlockSpecs of (qp, kp, q_lim, k_lim) for a grid of one program per `block_m`
  query blocks: its query rows and their limits, every key block and limit."""
  return [
    pl.BlockSpec((block_m, h), lambda i: (i, 0)),
    pl.BlockSpec((n_k, h), lambda i: (0, 0)),
    pl.BlockSpec((block_m,), lambda i: (i,)),
    pl.BlockSpec((n_k,), lambda i: (0,)),
  ]


def _tile_ranges(q_lim, k_lim, block_m, block_n):
  """Per program (block_m rows), the tiles [first, end) from the first to the last one
  holding a pair it may allow (a key whose limit is at most its rows' greatest): the loop
  visits no tile outside them (those inside without such a pair are still skipped one by
  one). A 2D boundary's text-query component then runs no tile in its vision programs,
  and its vision-query, text-key component only the tiles of the text keys."""
  q_max = jnp.max(q_lim.reshape(-1, block_m), axis=1)  # [P]
  t_min = jnp.min(k_lim.reshape(-1, block_n), axis=1)  # [T]
  return true_span(t_min[None, :] <= q_max[:, None])  # [P, T] -> [P] each


def _pack(s, cols):
  """f32 scores s [bm, bn] and their columns -> int32 keys in the top-k order of the scores
  rounded to bf16: the rounded score's f32 bits (bf16's 16 bits, then 16 zero bits) made
  order-preserving (a negative value's magnitude bits flipped; -0 counted as +0), the low
  half then set to 0xFFFF - column, so that of equal scores the lower column has the
  greater key. (Computed on the f32 bits: no 16-bit integers, one conversion.)"""
  s = s.astype(jnp.bfloat16).astype(jnp.float32)
  s = jnp.where(s == 0, jnp.zeros_like(s), s)  # (-0 -> +0: equal scores, equal keys)
  bits = jax.lax.bitcast_convert_type(s, jnp.int32)
  bits = bits ^ ((bits >> 31) & 0x7FFF0000)
  return bits | (0xFFFF - cols[None, :])


def unpack(keys, dtype):
  """The kernel's packed keys [.., k] -> (idx int32, vals in dtype; -inf / 0 where empty)."""
  ordered = keys >> 16
  empty = ordered == -(2**15)  # (no score's key: that would be a NaN's)
  hi = jnp.where(ordered < 0, ordered ^ 0x7FFF, ordered).astype(jnp.int16)
  vals = jax.lax.bitcast_convert_type(hi, dtype)
  idx = jnp.where(empty, 0, 0xFFFF - (keys & 0xFFFF))
  return idx.astype(jnp.int32), jnp.where(empty, -jnp.inf, vals).astype(dtype)


def _insert_packed(key, slots):
  """Moves a tile's entries (packed keys [bm, bn]) into the slots [bm, slots]: while some
  row's best entry not yet offered beats its worst slot, that slot takes it (one per row
  and pass). One comparison of keys orders by (score, column) in any column order. Keys
  are distinct, so each pass offers the greatest key below the last one offered and the
  tile itself is never rewritten; a row whose offer fails has no later offer that could
  succeed (its offers fall, its worst slot only rises)."""

  def more(state):
    _, best, worst = state
    # (an int max: the Triton lowering has no reduce_or for jnp.any)
    return jnp.max((best > worst).astype(jnp.int32)) > 0

  def take(state):
    slots, best, worst = state
    ins = (best > worst)[:, None]
    slots = jnp.where(ins & (slots == worst[:, None]), best[:, None], slots)
    best = jnp.max(jnp.where(key < best[:, None], key, _EMPTY), axis=1)
    return slots, best, jnp.min(slots, axis=1)

  # (the first pass unconditionally: most tiles move an entry into some row, and the test
  # before it is a reduction over the whole program's rows)
  state = take((slots, jnp.max(key, axis=1), jnp.min(slots, axis=1)))
  return jax.lax.while_loop(more, take, state)[0]


def _insert(s, cols, slot, vals, idx):
  """`_insert_packed` for f32 scores s [bm, bn]: slots of (value, column), the order
  compared in two parts."""

  def more(state):  # some row's best remaining entry beats its worst slot
    return jnp.max(_beats(*state[3:7]).astype(jnp.int32)) > 0  # (b, c, w, w_col)

  def take(state):
    s, vals, idx, b, c, w, w_col, w_slot = state
    ins = _beats(b, c, w, w_col)
    put = ins[:, None] & (slot == w_slot[:, None])
    vals = jnp.where(put, b[:, None], vals)
    idx = jnp.where(put, c[:, None], idx)
    s = jnp.where(ins[:, None] & (cols[None, :] == c[:, None]), -jnp.inf, s)
    return (s, vals, idx, *_best(s, cols), *_worst(vals, idx, slot))

  state = (s, vals, idx, *_best(s, cols), *_worst(vals, idx, slot))
  _, vals, idx, *_ = jax.lax.while_loop(more, take, state)
  return vals, idx


def _best(s, cols):
  """Each row's best remaining entry: (value, its lowest column among equal values)."""
  b = jnp.max(s, axis=1)
  return b, jnp.min(jnp.where(s == b[:, None], cols[None, :], _BIG), axis=1)


def _worst(vals, idx, slot):
  """Each row's worst slot under (value descending, column ascending): (value, column,
  slot) of the lowest value, then the highest column (then the highest slot)."""
  slots = vals.shape[1]
  w = jnp.min(vals, axis=1)
  key = jnp.max(jnp.where(vals == w[:, None], idx * slots + slot, -1), axis=1)
  return w, key // slots, key % slots


def _beats(b, c, w, w_col):
  """Whether entry (b, c) comes before the worst slot (w, w_col) in the top-k order."""
  return (b > w) | ((b == w) & (c < w_col))


def pooled_top_k(
  qp,
  kp,
  q_lim,
  k_lim,
  *,
  k: int,
  scale: float,
  block_m: int = 64,
  block_n: int = 128,
  tf32: bool = True,
  num_warps: int = 4,
  sort_blocks: bool = False,
  interpret: bool = False,
):
  """Per row, the k highest allowed pooled scores (ties to the lower column), as a set.

  Args:
    qp: [nQ, H] pooled queries; kp: [nK, H] pooled keys (padded inside to whole tiles:
      padded pairs are not allowed), both float32 or both bfloat16 (as pooled_scores).
    q_lim: [nQ] int32; k_lim: [nK] int32: pair (i, j) is allowed iff k_lim[j] <= q_lim[i].
    k: entries per row (>= 1; at most nK).
    scale: the scores' scale.
    block_m, block_n: the tile (powers of two >= 16; pooled_scores' tile, so that both
      compute each score by the same dot).
    tf32: f32 inputs rounded to TF32 (as pooled_scores); False: full f32 products.
    sort_blocks: visit only the tiles of each program's allowed keys, the blocks sorted
      by their limits (module docstring): for views whose limits are not monotone
      (grid-permuted); the same picks.
    interpret: Pallas interpret mode (CPU).

  Returns:
    (idx [nQ, k] int32, vals [nQ, k] in the inputs' dtype): the entries `lax.top_k`
    picks from the masked scores (rounded to the inputs' dtype, as pooled_scores gives
    them), in no particular order; a row with fewer than k allowed pairs has -inf
    values (column 0) in the rest.
  """
  block_m, block_n = check_pooled(qp, kp, q_lim, k_lim, block_m, block_n)
  if not 1 <= k <= kp.shape[0]:
    raise ValueError(f"k={k} must be in [1, nK={kp.shape[0]}]")
  return _call(
    qp,
    kp,
    q_lim,
    k_lim,
    k=int(k),
    scale=float(scale),
    block_m=block_m,
    block_n=block_n,
    tf32=tf32,
    num_warps=num_warps,
    sort_blocks=bool(sort_blocks),
    interpret=interpret,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "k",
    "scale",
    "block_m",
    "block_n",
    "tf32",
    "num_warps",
    "sort_blocks",
    "interpret",
  ),
)
def _call(
  qp, kp, q_lim, k_lim, *, k, scale, block_m, block_n, tf32, num_warps, sort_blocks, interpret
):
  (n_q0, h) = qp.shape
  qp, kp, q_lim, k_lim = pad_to_tiles(qp, kp, q_lim, k_lim, block_m, block_n)
  n_q, n_k = qp.shape[0], kp.shape[0]
  slots = max(2, 1 << (k - 1).bit_length())  # (a power of two for the register arrays)
  packed = qp.dtype == jnp.bfloat16 and n_k <= MAX_PACKED_COLUMNS
  tf32 = dot_tf32(qp.dtype, tf32)
  kernel = functools.partial(
    _kernel,
    scale=scale,
    k=k,
    block_n=block_n,
    n_tiles=n_k // block_n,
    tf32=tf32,
    sort_blocks=sort_blocks,
    packed=packed,
  )
  programs = pl.BlockSpec((n_q // block_m,), lambda i: (0,))
  if not sort_blocks:
    extra, extra_specs = list(_tile_ranges(q_lim, k_lim, block_m, block_n)), [programs] * 2
  else:  # blocks in limit order (stable); each program's allowed-key prefix
    q_order = jnp.argsort(q_lim, stable=True).astype(jnp.int32)
    k_order = jnp.argsort(k_lim, stable=True).astype(jnp.int32)
    qp, q_lim = qp[q_order], q_lim[q_order]
    kp, k_lim = kp[k_order], k_lim[k_order]
    q_max = q_lim[block_m - 1 :: block_m]  # (ascending: each program's last row)
    n_allowed = jnp.searchsorted(k_lim, q_max, side="right").astype(jnp.int32)
    extra = [k_order, -(-n_allowed // block_n)]
    extra_specs = [pl.BlockSpec((n_k,), lambda i: (0,)), programs]
  out_shape = [jax.ShapeDtypeStruct((n_q, slots), jnp.int32)]
  if not packed:
    out_shape.append(jax.ShapeDtypeStruct((n_q, slots), jnp.float32))
  out = pl.pallas_call(
    kernel,
    grid=(n_q // block_m,),
    in_specs=[*input_specs(block_m, n_k, h), *extra_specs],
    out_specs=[pl.BlockSpec((block_m, slots), lambda i: (i, 0))] * len(out_shape),
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
    interpret=interpret,
    name="mmjax_pooled_topk",
  )(qp, kp, q_lim, k_lim, *extra)
  idx, vals = unpack(out[0], qp.dtype) if packed else out
  if sort_blocks:  # the rows back in their order
    inv = jnp.zeros_like(q_order).at[q_order].set(jnp.arange(n_q, dtype=jnp.int32))
    idx, vals = idx[inv], vals[inv]
  return idx[:n_q0, :k], vals[:n_q0, :k].astype(qp.dtype)  # (exact: rounded in the kernel)
