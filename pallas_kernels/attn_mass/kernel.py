"""Attention mass of a few query rows, per key column and per diagonal; Pallas on the
Triton lowering.

The planner's online estimates (vertical-slash lines, the grid stride) softmax the last R
queries (R = last_q, 64) against all L keys and sum the probabilities p [R, L] down each
key column and along each diagonal (rank offset). In XLA that wrote the [R, L] scores,
read them twice for the softmax, wrote p and read it twice more (about 13 ms per
estimate at 1M tokens for 28 heads on an H200). Here the scores stay in registers and p
is written once:

  pass 1, one program per `tiles` tiles of `tile` keys (k rows gathered by the view's
    order, read in place from [B, L, N, H]), looping over its tiles:
      s = q k^T * scale, masked where not allowed            [R, tile]
      per row: running max m_p and sum of exp(s - m_p)       -> [n_programs, R] each
  combine (XLA, a few KB): m = max_p m_p, l = sum_p l_p exp(m_p - m)
  pass 2, one program per tile (a loop over tiles ran 1.4-1.6x slower on an H200): the
    same s, p = exp(s - m) / l (0 where not allowed)
      column sums: sum_r p                                   -> col [tile]
      p itself, stored whole (one contiguous store)          -> p [R, tile]
  pass 3, one program per `diag_tile` diagonal offsets o: slash[o] = sum_r p[r, base_r - o]
    (each row's entries gathered along the diagonals: contiguous runs; the first version
    stored p skewed from pass 2 instead, scattered from the dot's register layout); with
    a key range, a program whose offsets reach no key of it for any row stores zeros

With `max_offset` W (the grid stride's estimate reads the first few diagonals only) the
column sums are not made and passes 2 and 3 visit only the key tiles within W of some
row's base (the other programs of pass 2 return at once): pass 1 reads every key of the
key range (all of them without one), since each row's softmax is over those, and the
slash sums are the same numbers. A window of W keys is a few % of a long sequence, so
with `span_tiles` the two passes launch programs for about the tiles they visit, from the
first one on (the window and the range are data: a wider one is shared out, a loop in
each program), instead of programs for every tile of L that return at once.

p is stored in f32, or with `p_dtype=float16` as p * 2^15 in f16 (half the traffic of
passes 2 and 3; p <= 1 stays below f16's maximum and p >= 2e-9 stays a normal number, so
each entry keeps 11 significant bits); the sums are f32 either way.

With `tile_stats` there are two passes. The first, one program per key tile, stores e =
exp(s - m_t) with m_t the row maxima over the tile's allowed keys, and m_t and the row
sums l_t of e per (tile, row). XLA combines those into f [n_tiles, R] = exp(m_t - m) / l.
The diagonal pass reads e times f of the key's tile (a second gather, from a few KB),
and a column pass sums e times f down each column. p = e f, so the sums are the same to
rounding, without pass 1's second sweep over the keys.

A key j is allowed for row r iff key_lim[j] <= q_lim[r] (the caller folds causality,
the key's modality and the row's validity into these two integer vectors). With
`key_range` (lo, hi) only keys lo <= j < hi can be allowed, and the passes visit only the
tiles that hold them: a modality's keys in a modality-grouped view (the 2D boundary's
text-text estimate reads its text group, not the whole sequence). Pass 1 skips the other
tiles of its programs, pass 2's other programs write zero column sums and return, and pass
3 reads p only inside the range: the same numbers as masking those keys by key_lim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.heads_inner import HeadRefs, heads_innermost

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DIAG_TILE = 128  # diagonal offsets per program of the third pass (a power of two)
P_DTYPES = ("float32", "float16")  # how p is stored between passes 2 and 3
P_SCALE_F16 = 2.0**15  # p * P_SCALE_F16 in f16 (see the module docstring)
# With key_range and range_tiles (no max_offset), pass 1's programs are laid over the key
# range's tiles like pass 2's, one tile each (more when the range is wider than
# range_tiles), not `tiles` tiles of L each: the 2D boundary's text keys at 128k (80
# tiles) were read by 10 programs per head, 8 tiles in series each. False: as before.
STATS_SHARE_RANGE = True
# `attention_mass(tile_stats=None)`'s default: two passes instead of three
# (`_tile_passes`). The first stores each key tile's exp(s - the tile's row max) with that
# max and the row sums, XLA turns those into a scale per (tile, row), and the diagonal
# pass (and a column pass) applies it as it reads. The same sums to rounding, without the
# statistics pass. Off: not yet timed on a GPU (the planner's MASS_TILE_STATS).
TILE_STATS = False
# Triton software-pipeline stages of passes 1, 2 and 3. Pass 1 loops over tiles; passes 2
# and 3 have no loop, so stages only take shared memory from programs that could run side
# by side: pass 2 with 1 stage instead of 2 took 124 -> 62 us (the 2D boundary's text
# estimate at 128k) and 148 -> 87 us (its stride estimate), the same plans; pass 1 with 1
# stage ran slower (73 -> 90 us) (h200_2026-12-03g/1_launch).
NUM_STAGES = (3, 1, 1)


def _scores(src, t, heads, *, tile, scale, key_range=None):
  """The masked scores of key tile t: (s [R, tile] f32, -inf where not allowed; allowed).
  src: (q, k, key_lim, q_lim, index, perm) refs; key_range: (lo, hi) scalars, keys outside
  [lo, hi) not allowed, or None."""
  q_ref, k_ref, klim_ref, qlim_ref, index_ref, perm_ref = src
  sl = pl.ds(t * tile, tile)
  rows = heads.get("perm", perm_ref, sl) if perm_ref is not None else sl
  if index_ref is not None:  # k [B, L, N, H]: the (batch, head) slice, read in place
    b, n = heads.get("index", index_ref, 0), heads.get("index", index_ref, 1)
    k = k_ref[b, rows, n, :]
  else:
    k = k_ref[rows, :]
  q = heads.get("q", q_ref)
  tf32 = q.dtype != jnp.float32  # f32 inputs get f32 dots
  s = plgpu.dot(q, k, trans_b=True, allow_tf32=tf32) * scale  # [R, tile]
  allowed = heads.get("key_lim", klim_ref, sl)[None, :] <= heads.get("q_lim", qlim_ref)[:, None]
  if key_range is not None:
    j = t * tile + jnp.arange(tile, dtype=jnp.int32)
    allowed = allowed & ((j >= key_range[0]) & (j < key_range[1]))[None, :]
  return jnp.where(allowed, s, -jnp.inf), allowed


def _split(refs, gather, in_place):
  refs = list(refs)
  index_ref = refs.pop(0) if in_place else None
  perm_ref = refs.pop(0) if gather else None
  return index_ref, perm_ref, refs


def _range_of(range_ref, heads, tile):
  """((lo, hi) keys, (first, end) tiles) of `key_range`, or Nones without one."""
  if range_ref is None:
    return None, None
  lo, hi = heads.get("key_range", range_ref, 0), heads.get("key_range", range_ref, 1)
  return (lo, hi), _key_tiles(lo, hi, tile)


def _key_tiles(lo, hi, tile):
  """(first, end): the key tiles that hold keys of [lo, hi)."""
  return lo // tile, (hi + tile - 1) // tile


def _tile_range(tiles, n_tiles, heads):
  """(first tile, number of tiles) of this program."""
  first = heads.program_id(0) * tiles
  return first, jnp.minimum(tiles, n_tiles - first)


def _shared_range(lo, end, least, heads):
  """(first tile, number of tiles) of this program when the programs share the tiles
  [lo, end) in order: `least` each, more each when the range is wider than that."""
  n_progs = heads.num_programs(0)
  per = jnp.maximum(least, (end - lo + n_progs - 1) // n_progs)
  first = lo + heads.program_id(0) * per
  return first, jnp.clip(jnp.minimum(first + per, end) - first, 0, per)


def _whole(shape):
  """A BlockSpec of the whole array (every program reads or writes any part of it)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _with_heads(kernel, per_head):
  """kernel(*refs, heads=...): a batched call's head is its grid's first axis."""

  def wrapped(*refs, **kw):
    heads = HeadRefs(per_head, pl.program_id(0)) if per_head else HeadRefs()
    return kernel(*refs, heads=heads, **kw)

  return wrapped


def _stats_kernel(
  *refs, tile, tiles, n_tiles, n_rows, scale, gather, in_place, ranged, spanned, heads
):
  index_ref, perm_ref, rest = _split(refs, gather, in_place)
  range_ref = rest.pop(0) if ranged else None
  q_ref, k_ref, klim_ref, qlim_ref, m_ref, l_ref = rest
  src = (q_ref, k_ref, klim_ref, qlim_ref, index_ref, perm_ref)
  key_range, tile_range = _range_of(range_ref, heads, tile)
  if spanned:  # the programs share the range's tiles: `tiles` each, more if it is wider
    first, count = _shared_range(*(tile_range if ranged else (0, n_tiles)), tiles, heads)
  else:
    first, count = _tile_range(tiles, n_tiles, heads)
    if ranged:  # only this program's tiles that hold keys of the range
      end = jnp.minimum(first + count, tile_range[1])
      first = jnp.maximum(first, tile_range[0])
      count = jnp.maximum(end - first, 0)

  def body(i, carry):  # online max and sum over this program's tiles
    m, l = carry
    s, allowed = _scores(src, first + i, heads, tile=tile, scale=scale, key_range=key_range)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [R], -inf where nothing is allowed yet
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    e = jnp.where(allowed, jnp.exp(s - m_safe[:, None]), 0.0)
    return m_new, l * jnp.exp(m - m_safe) + jnp.sum(e, axis=1)

  init = (jnp.full((n_rows,), -jnp.inf, jnp.float32), jnp.zeros((n_rows,), jnp.float32))
  m, l = jax.lax.fori_loop(0, count, body, init)
  p = heads.program_id(0)
  heads.set("out", m_ref, (p, slice(None)), m)
  heads.set("out", l_ref, (p, slice(None)), l)


def _mass_kernel(
  *refs, tile, scale, gather, in_place, p_dtype, windowed, ranged, spanned, shared, heads
):
  """One key tile per program, as straight-line code (a loop over tiles, with the stores
  inside it, ran 1.4-1.6x slower on an H200). windowed: no column sums, and only the
  tiles in [window[0], window[1]] are computed (the others return). ranged: tiles outside
  the key range write zero column sums and return. spanned (windowed): the programs are
  laid over the window's tiles from its first on, one tile each, or an equal share each
  (a loop) when the window is wider than the grid. shared (ranged, not windowed): so
  over the key range's tiles; the tiles outside it are left unwritten (the wrapper
  zeroes their column sums)."""
  index_ref, perm_ref, rest = _split(refs, gather, in_place)
  range_ref = rest.pop(0) if ranged else None
  if windowed:
    q_ref, k_ref, klim_ref, qlim_ref, m_ref, inv_ref, win_ref, p_ref = rest
  else:
    q_ref, k_ref, klim_ref, qlim_ref, m_ref, inv_ref, col_ref, p_ref = rest
  src = (q_ref, k_ref, klim_ref, qlim_ref, index_ref, perm_ref)
  key_range, tile_range = _range_of(range_ref, heads, tile)

  def body(t):
    m, inv = heads.get("out", m_ref), heads.get("out", inv_ref)
    s, allowed = _scores(src, t, heads, tile=tile, scale=scale, key_range=key_range)
    p = jnp.where(allowed, jnp.exp(s - m[:, None]) * inv[:, None], 0.0)
    if not windowed:
      heads.set("out", col_ref, (pl.ds(t * tile, tile),), jnp.sum(p, axis=0))
    if p_dtype == "float16":
      p = (p * P_SCALE_F16).astype(jnp.float16)
    heads.set("out", p_ref, (slice(None), pl.ds(t * tile, tile)), p)

  if spanned or shared:  # the tiles [c0, c1]: the window's (from base, per head), or
    # the key range's
    if spanned:
      c0, c1 = heads.get("base", win_ref, 0), heads.get("base", win_ref, 1)
      if ranged:
        c0, c1 = jnp.maximum(c0, tile_range[0]), jnp.minimum(c1, tile_range[1] - 1)
    else:
      c0, c1 = tile_range[0], tile_range[1] - 1
    _over_tiles(body, (c0, c1 + 1), None, True, heads)
    return
  t = heads.program_id(0)
  run = None
  if windowed:
    run = (t >= heads.get("base", win_ref, 0)) & (t <= heads.get("base", win_ref, 1))
  if ranged:
    inside = (t >= tile_range[0]) & (t < tile_range[1])
    run = inside if run is None else run & inside
    if not windowed:

      @pl.when(jnp.logical_not(inside))
      def _():
        heads.set("out", col_ref, (pl.ds(t * tile, tile),), jnp.zeros((tile,), jnp.float32))

  if run is None:
    body(t)
  else:
    pl.when(run)(lambda: body(t))


def _diag_kernel(
  *refs, diag_tile, length, n_rows, n_offsets, p_dtype, ranged, shared, scale_tile=None
):
  """slash[o] = sum_r p[r, base_r - o] for this program's offsets o < n_offsets (p flat
  [R * L]); ranged: only keys inside the key range are read (p is written there only).
  shared (ranged): the programs share the offset tiles that reach the range
  (`_reaching_tiles`), in order, a loop each when there are more tiles than programs; the
  other tiles are left unwritten (the wrapper zeroes them). scale_tile (TILE_STATS): p
  holds each key tile's unscaled exp, and a second input f [n_tiles * R] the scale of
  each (tile, row), applied as p is read."""
  refs = list(refs)
  p_ref = refs.pop(0)
  f_ref = refs.pop(0) if scale_tile else None
  if ranged:
    base_ref, range_ref, slash_ref = refs
    key_range = (range_ref[0], range_ref[1])
  else:
    (base_ref, slash_ref), key_range = refs, None
  base = base_ref[...]
  sums = functools.partial(
    _offset_sums, p_ref, base, key_range, length=length, n_rows=n_rows,
    n_offsets=n_offsets, p_dtype=p_dtype, f_ref=f_ref, scale_tile=scale_tile,
  )  # fmt: skip

  def store(o0, vals):
    slash_ref[pl.ds(o0, diag_tile)] = vals

  if shared:  # (an unbatched call: vmap batches this kernel's heads)
    first, count = _shared_range(
      *_reaching_tiles(base, *key_range, diag_tile, length), 1, HeadRefs()
    )

    def one(i, carry):
      o0 = (first + i) * diag_tile
      store(o0, sums(o0 + jnp.arange(diag_tile, dtype=jnp.int32)))
      return carry

    jax.lax.fori_loop(0, count, one, 0)
    return
  d = pl.program_id(0)
  o0 = d * diag_tile
  o = o0 + jnp.arange(diag_tile, dtype=jnp.int32)
  if ranged:  # offsets that reach no key of the range, for any row: zeros, nothing read
    # (most programs where the range is one modality's run: the 2D boundary's text keys)
    d0, d1 = _reaching_tiles(base, *key_range, diag_tile, length)
    zeros = lambda: jnp.zeros((diag_tile,), jnp.float32)  # noqa: E731
    store(o0, jax.lax.cond((d >= d0) & (d < d1), lambda: sums(o), zeros))
  else:
    store(o0, sums(o))


def _offset_sums(
  p_ref, base, key_range, o, *, length, n_rows, n_offsets, p_dtype, f_ref=None, scale_tile=None
):
  """sum_r p[r, base_r - o] for the offsets o [D] (f32), reading p only at keys >= 0,
  inside key_range (lo, hi) if not None, for offsets below n_offsets; with f_ref, each
  entry times f[(base_r - o) // scale_tile, r] (f flat [n_tiles * R])."""
  j = base[:, None] - o[None, :]  # [R, D]: key of row r at offset o
  ok = j >= 0
  if key_range is not None:
    ok = ok & (j >= key_range[0]) & (j < key_range[1])
  if n_offsets < length:  # (p is written only where these offsets read it)
    ok = ok & (o < n_offsets)[None, :]
  r = jnp.arange(n_rows, dtype=jnp.int32)[:, None]
  vals = plgpu.load(p_ref.at[jnp.where(ok, r * length + j, 0)], mask=ok, other=0.0)
  vals = vals.astype(jnp.float32)
  if f_ref is not None:
    at = jnp.where(ok, (j // scale_tile) * n_rows + r, 0)
    vals = vals * plgpu.load(f_ref.at[at], mask=ok, other=0.0)
  sums = jnp.sum(vals, axis=0)
  if p_dtype == "float16":
    sums = sums * (1.0 / P_SCALE_F16)
  return sums


def _reaching_tiles(base, lo, hi, diag_tile, length):
  """The offset tiles [d0, d1) that may reach a key of [lo, hi) for some row (bases
  `base` [..., R], -1 for none): those holding an offset in [min base - hi + 1, max base
  - lo] (row r reaches key base_r - o)."""
  n_diag = -(-length // diag_tile)
  o_lo = jnp.maximum(jnp.min(base, axis=-1) - hi + 1, 0)
  o_hi = jnp.max(base, axis=-1) - lo
  d0 = jnp.minimum(o_lo // diag_tile, n_diag)
  d1 = jnp.where(o_hi >= o_lo, jnp.minimum(o_hi // diag_tile + 1, n_diag), d0)
  return d0, d1


def attention_mass(
  q,
  k,
  key_lim,
  q_lim,
  base,
  *,
  scale: float,
  perm=None,
  index=None,
  tile: int = 128,
  tiles: int = 8,
  num_warps: int = 4,
  heads_inner: bool = False,
  p_dtype: str = "float32",
  max_offset: int | None = None,
  key_range=None,
  span_tiles: int | None = None,
  range_tiles: int | None = None,
  tile_stats: bool | None = None,
  interpret: bool = False,
):
  """Column and diagonal sums of the softmax of a few query rows against all keys.

  Args:
    q: [R, H] the query rows (R a power of two >= 16; pad with rows nothing is allowed
      for: q_lim -1).
    k: [L, H], or [B, L, N, H] with `index` (read in place); f32, bf16 or f16 like q.
    key_lim: [L] int32, per key in view order; q_lim: [R] int32. Key j is allowed for
      row r iff key_lim[j] <= q_lim[r].
    base: [R] int32 in [-1, L - 1]: row r's diagonal offset of key j is base[r] - j.
    scale: the scores' scale.
    perm: [L] int32, the row of k at each view index, or None (identity).
    index: int32 [2] (batch, head) of a 4-D k.
    tile: keys per step (a power of two >= 16 dividing L); tiles: steps per program of
      the first pass.
    heads_inner: under vmap (over query heads), one call whose grid runs every head's
      programs of a key tile together (heads innermost), so heads that share keys (GQA)
      read each tile from memory once; without it vmap puts the heads outermost. The
      same values either way.
    p_dtype: how p is stored between the second and third passes: "float32", or
      "float16" (scaled by 2^15; half the memory traffic, slash sums within about 1e-3
      relative of the f32 ones; the column sums are the same).
    max_offset: W in [1, L]: only slash[:W] is wanted, and no column sums (col is None);
      p is computed and stored only for the key tiles within W of some row's base.
    key_range: int32 [2] (lo, hi), 0 <= lo <= hi <= L, or None: only keys lo <= j < hi can
      be allowed (the others are not, whatever key_lim says), and only the key tiles
      that hold them are read (the caller's range of the allowed keys: the same numbers,
      fewer reads).
    span_tiles: with max_offset, about how many key tiles the keys that pass 1 reads
      (key_range's, or all) and pass 2's window span (static; a window is data): both
      passes launch programs for that many tiles, from the first tile they visit, not
      for all L / tile, and a wider span is shared out (a loop per program), the same
      numbers. None: programs over every tile, most of which return at once when the
      window is narrow.
    range_tiles: without max_offset, with key_range: passes 2 and 3 (and 1, with
      STATS_SHARE_RANGE, one tile a program) launch this many programs (static) per
      head, laid over the key range's tiles and over the diagonal
      offsets' tiles that reach it, in order (a loop each when those are more), not one
      per tile of L, most of which return at once when the range is narrow (one modality's
      keys); the sums outside them are zeros, set by XLA. The same numbers. None, or at
      least L / tile: one program per tile.
    tile_stats: two passes (None: `TILE_STATS`): the first stores each key tile's
      exp(s - its row max) with the row max and sum for every tile the statistics would
      read (the key range's, or all: with max_offset, more than the window unless the
      range is about the window), and the diagonal pass (and a column pass) rescales per
      (tile, row). The same sums to rounding; with p_dtype float16 the column sums are
      rounded like the slash sums.
    interpret: Pallas interpret mode (CPU).

  Returns:
    (col [L] f32: sum_r p[r, j], slash [L] f32: sum_r p[r, base[r] - o] over rows with
    base[r] - o >= 0), p the row-wise softmax over allowed keys (rows with none: 0).
    With max_offset: (None, slash[:max_offset]).
  """
  if q.ndim != 2:
    raise ValueError(f"q must be [R, H]; got shape {q.shape}")
  n_rows, h = q.shape
  if n_rows < 16 or n_rows & (n_rows - 1):
    raise ValueError(f"R={n_rows} query rows must be a power of two >= 16 (pad them)")
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
    raise ValueError(
      f"q and k must share one of {[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}; "
      f"got {q.dtype}, {k.dtype}"
    )
  if k.ndim == 4:
    if index is None or index.shape != (2,) or index.dtype != jnp.int32:
      raise ValueError("a 4-D k [B, L, N, H] needs index: int32 (batch, head) [2]")
  elif k.ndim != 2 or index is not None:
    raise ValueError(f"k must be [L, H] (index None) or [B, L, N, H] with index; got {k.shape}")
  if k.shape[-1] != h:
    raise ValueError(f"q and k head dims differ: {h} vs {k.shape[-1]}")
  length = k.shape[1] if k.ndim == 4 else k.shape[0]
  if tile < 16 or tile & (tile - 1) or length % tile:
    raise ValueError(f"tile={tile} must be a power of two >= 16 dividing L={length}")
  for name, arr, n in (
    ("key_lim", key_lim, length),
    ("q_lim", q_lim, n_rows),
    ("base", base, n_rows),
  ):
    if arr.shape != (n,) or arr.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32 of shape ({n},); got {arr.dtype} {arr.shape}")
  if perm is not None and (perm.shape != (length,) or perm.dtype != jnp.int32):
    raise ValueError(f"perm must be int32 of shape ({length},); got {perm.dtype} {perm.shape}")
  if p_dtype not in P_DTYPES:
    raise ValueError(f"p_dtype must be one of {P_DTYPES}; got {p_dtype!r}")
  if max_offset is not None and not 1 <= int(max_offset) <= length:
    raise ValueError(f"max_offset must be in [1, L={length}] or None; got {max_offset}")
  if span_tiles is not None and (max_offset is None or int(span_tiles) < 1):
    raise ValueError(f"span_tiles={span_tiles} must be >= 1, with max_offset, or None")
  if range_tiles is not None and (
    max_offset is not None or key_range is None or int(range_tiles) < 1
  ):
    raise ValueError(
      f"range_tiles={range_tiles} must be >= 1, with key_range and without max_offset, or None"
    )
  if key_range is not None and (key_range.shape != (2,) or key_range.dtype != jnp.int32):
    got = f"{key_range.dtype} {key_range.shape}"
    raise ValueError(f"key_range must be int32 (lo, hi) of shape (2,) or None; got {got}")
  static = dict(
    scale=float(scale),
    p_dtype=p_dtype,
    max_offset=None if max_offset is None else int(max_offset),
    span_tiles=None if span_tiles is None else int(span_tiles),
    range_tiles=None if range_tiles is None else int(range_tiles),
    tile=tile,
    tiles=max(1, int(tiles)),
    num_warps=num_warps,
    tile_stats=bool(TILE_STATS if tile_stats is None else tile_stats),
    interpret=interpret,
  )
  if not heads_inner:
    return _call(q, k, key_lim, q_lim, base, perm, index, key_range, **static)
  optional = {"perm": perm, "index": index, "key_range": key_range}
  fn = _heads_inner(
    tuple(n for n, a in optional.items() if a is not None), tuple(sorted(static.items()))
  )
  return fn(q, k, key_lim, q_lim, base, *(a for a in optional.values() if a is not None))


_ARGS = ("q", "k", "key_lim", "q_lim", "base", "perm", "index", "key_range")


def _passes(q, k, key_lim, q_lim, base, perm, index, key_range, *, per_head, n_heads, **static):
  """The three passes. per_head: the names of the arguments with a leading head axis of
  n_heads (a call batched over heads, the head the first grid axis); empty: one head."""
  if static.pop("tile_stats"):
    return _tile_passes(
      q, k, key_lim, q_lim, base, perm, index, key_range, per_head=per_head, n_heads=n_heads,
      **static,
    )  # fmt: skip
  scale, tile, tiles = static["scale"], static["tile"], static["tiles"]
  p_dtype, max_offset = static["p_dtype"], static["max_offset"]
  num_warps, interpret = static["num_warps"], static["interpret"]
  span = static["span_tiles"]
  range_tiles = static["range_tiles"]
  lead = (n_heads,) if per_head else ()
  n_rows = q.shape[-2]
  length = key_lim.shape[-1]
  n_tiles = length // tile
  spanned = span is not None
  gather, in_place, ranged = perm is not None, index is not None, key_range is not None
  # (range_tiles: passes 2 and 3 over the key range's tiles only; pass 1 too, one tile a
  # program, with STATS_SHARE_RANGE)
  shared = ranged and range_tiles is not None and range_tiles < n_tiles
  stats_shared = shared and not spanned and STATS_SHARE_RANGE
  if stats_shared:
    n_progs = range_tiles
  else:
    n_progs = -(-(min(span, n_tiles) if spanned else n_tiles) // tiles)
  head = ([index] if in_place else []) + ([perm] if gather else [])
  head += [key_range] if ranged else []
  names = frozenset(per_head) | ({"out"} if per_head else set())

  def kernel(fn, **kw):
    return _with_heads(functools.partial(fn, **kw), names)

  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES[0])
  params2 = plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES[1])
  common = dict(tile=tile, scale=scale, gather=gather, in_place=in_place, ranged=ranged)

  args = head + [q, k, key_lim, q_lim]
  stats = lead + (n_progs, n_rows)
  m_t, l_t = pl.pallas_call(
    kernel(
      _stats_kernel,
      n_rows=n_rows,
      tiles=1 if stats_shared else tiles,
      n_tiles=n_tiles,
      spanned=spanned or stats_shared,
      **common,
    ),
    grid=lead + (n_progs,),
    in_specs=[_whole(a.shape) for a in args],
    out_specs=[_whole(stats)] * 2,
    out_shape=[jax.ShapeDtypeStruct(stats, jnp.float32)] * 2,
    compiler_params=params,
    interpret=interpret,
    name="mmjax_attn_mass_stats",
  )(*args)
  # the row statistics: m = max over tiles, l = sum of the tiles' sums rescaled to m
  m = jnp.max(m_t, axis=-2)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  l = jnp.sum(jnp.where(m_t == -jnp.inf, 0.0, l_t * jnp.exp(m_t - m_safe[..., None, :])), axis=-2)
  inv = 1.0 / jnp.maximum(l, 1e-30)

  args = head + [q, k, key_lim, q_lim, m_safe, inv]
  b = jnp.clip(base, -1, length - 1)  # the bases as the third pass reads them
  windowed = max_offset is not None
  p_spec = (
    _whole(lead + (n_rows, length)),
    jax.ShapeDtypeStruct(lead + (n_rows, length), jnp.dtype(p_dtype)),
  )
  if windowed:  # the tiles holding a key within max_offset of some row's base
    lo = jnp.min(jnp.where(b >= 0, b - (max_offset - 1), length), axis=-1)
    hi = jnp.max(b, axis=-1)
    win = jnp.stack([jnp.maximum(lo, 0) // tile, jnp.where(hi >= 0, hi // tile, -1)], -1)
    args.append(win.astype(jnp.int32))
    outs = [p_spec]
  else:
    outs = [(_whole(lead + (length,)), jax.ShapeDtypeStruct(lead + (length,), jnp.float32)), p_spec]
  *col, p = pl.pallas_call(
    kernel(
      _mass_kernel, p_dtype=p_dtype, windowed=windowed, spanned=spanned, shared=shared, **common
    ),
    grid=lead + (min(span, n_tiles) if spanned else range_tiles if shared else n_tiles,),
    in_specs=[_whole(a.shape) for a in args],
    out_specs=[spec for spec, _ in outs],
    out_shape=[shape for _, shape in outs],
    compiler_params=params2,
    interpret=interpret,
    name="mmjax_attn_mass",
  )(*args)
  col = col[0] if col else None
  if shared:  # the tiles outside the range were not written: zeros
    col = _zero_outside(col, key_range, tile, length)
  slash = _slash_pass(
    p, b, key_range, None, per_head=per_head, n_rows=n_rows, n_offsets=max_offset or length,
    p_dtype=p_dtype, shared=shared, range_tiles=range_tiles, num_warps=num_warps,
    interpret=interpret,
  )  # fmt: skip
  return col, slash


def _tile_kernel(*refs, tile, scale, gather, in_place, p_dtype, ranged, laid, n_tiles, heads):
  """TILE_STATS' first pass, per key tile t: s as in the other passes, the row maxima m_t
  over the tile's allowed keys, e = exp(s - m_t) (0 where not allowed), stored like p, and
  the row sums of e. laid: the programs are laid over the key range's tiles (all tiles
  without a range), one each, a loop when there are more tiles than programs; else one
  program per tile of L (those outside the range return)."""
  index_ref, perm_ref, rest = _split(refs, gather, in_place)
  range_ref = rest.pop(0) if ranged else None
  q_ref, k_ref, klim_ref, qlim_ref, m_ref, l_ref, p_ref = rest
  src = (q_ref, k_ref, klim_ref, qlim_ref, index_ref, perm_ref)
  key_range, tile_range = _range_of(range_ref, heads, tile)

  def body(t):
    s, allowed = _scores(src, t, heads, tile=tile, scale=scale, key_range=key_range)
    m = jnp.max(s, axis=1)  # [R], -inf where nothing is allowed
    e = jnp.where(allowed, jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[:, None]), 0.0)
    heads.set("out", m_ref, (t, slice(None)), m)
    heads.set("out", l_ref, (t, slice(None)), jnp.sum(e, axis=1))
    if p_dtype == "float16":
      e = (e * P_SCALE_F16).astype(jnp.float16)
    heads.set("out", p_ref, (slice(None), pl.ds(t * tile, tile)), e)

  _over_tiles(body, tile_range, n_tiles, laid, heads)


def _over_tiles(body, tile_range, n_tiles, laid, heads):
  """body(t) for this program's key tiles: laid over tile_range ((first, end), or all
  tiles if None), one each and a loop when there are more tiles than programs; else tile
  program_id, if inside tile_range."""
  if laid:
    t0, count = _shared_range(*(tile_range or (0, n_tiles)), 1, heads)
    pl.when(count > 0)(lambda: body(t0))

    def more(i, carry):  # (only when there are more tiles than programs)
      body(t0 + i)
      return carry

    jax.lax.fori_loop(1, count, more, 0)
    return
  t = heads.program_id(0)
  if tile_range is None:
    body(t)
  else:
    pl.when((t >= tile_range[0]) & (t < tile_range[1]))(lambda: body(t))


def _col_kernel(*refs, tile, p_dtype, ranged, laid, n_tiles, heads):
  """TILE_STATS' column sums: col[j] = sum_r e[r, j] f[tile of j, r], for the tiles of
  `_tile_kernel`'s layout (the others are left unwritten: the wrapper zeroes them)."""
  refs = list(refs)
  range_ref = refs.pop(0) if ranged else None
  p_ref, f_ref, col_ref = refs
  _, tile_range = _range_of(range_ref, heads, tile)

  def body(t):
    e = heads.get("out", p_ref, slice(None), pl.ds(t * tile, tile)).astype(jnp.float32)
    c = jnp.sum(e * heads.get("out", f_ref, t, slice(None))[:, None], axis=0)
    if p_dtype == "float16":
      c = c * (1.0 / P_SCALE_F16)
    heads.set("out", col_ref, (pl.ds(t * tile, tile),), c)

  _over_tiles(body, tile_range, n_tiles, laid, heads)


def _tile_passes(
  q, k, key_lim, q_lim, base, perm, index, key_range, *, per_head, n_heads, **static
):  # fmt: skip
  """TILE_STATS: the first pass stores e = exp(s - the tile's row max) for every key tile
  the statistics pass would read (the key range's, or all), with each tile's row max and
  sum; XLA turns those into a scale f [n_tiles, R] = exp(m_t - m) / l per (tile, row); the
  diagonal pass, and a column pass (without max_offset), read e times f. The same sums as
  the three passes to rounding (with p_dtype float16 the column sums too are within 1e-3:
  they are read from the stored e). With max_offset, e is stored for the whole key range, not
  only the window: the planner's windowed estimate (`Grid.stride_norm="window"`) passes
  a key range about the window's size. The per-tile statistics are [n_tiles, R] per head
  where pass 1's were [n_tiles / tiles, R] (at 1M, 28 heads of 64 rows: 59 MB each)."""
  scale, tile = static["scale"], static["tile"]
  p_dtype, max_offset = static["p_dtype"], static["max_offset"]
  num_warps, interpret = static["num_warps"], static["interpret"]
  span, range_tiles = static["span_tiles"], static["range_tiles"]
  lead = (n_heads,) if per_head else ()
  n_rows = q.shape[-2]
  length = key_lim.shape[-1]
  n_tiles = length // tile
  gather, in_place, ranged = perm is not None, index is not None, key_range is not None
  shared = ranged and range_tiles is not None and range_tiles < n_tiles
  n_progs = min(span, n_tiles) if span is not None else range_tiles if shared else n_tiles
  laid = n_progs < n_tiles
  head = ([index] if in_place else []) + ([perm] if gather else [])
  names = frozenset(per_head) | ({"out"} if per_head else set())

  def kernel(fn, **kw):
    return _with_heads(functools.partial(fn, **kw), names)

  args = head + ([key_range] if ranged else []) + [q, k, key_lim, q_lim]
  stats = jax.ShapeDtypeStruct(lead + (n_tiles, n_rows), jnp.float32)
  p_shape = jax.ShapeDtypeStruct(lead + (n_rows, length), jnp.dtype(p_dtype))
  layout = dict(tile=tile, ranged=ranged, laid=laid, n_tiles=n_tiles, p_dtype=p_dtype)
  m_t, l_t, p = pl.pallas_call(
    kernel(_tile_kernel, scale=scale, gather=gather, in_place=in_place, **layout),
    grid=lead + (n_progs,),
    in_specs=[_whole(a.shape) for a in args],
    out_specs=[_whole(stats.shape)] * 2 + [_whole(p_shape.shape)],
    out_shape=[stats, stats, p_shape],
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES[1]),
    interpret=interpret,
    name="mmjax_attn_mass_tiles",
  )(*args)
  # per (tile, row): f = exp(m_t - m) / l, 0 for tiles not computed (outside the range)
  if ranged:
    t0, t1 = _key_tiles(key_range[..., 0:1], key_range[..., 1:2], tile)
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    done = ((t >= t0) & (t < t1))[..., None]  # [..., n_tiles, 1]
  else:
    done = jnp.ones((n_tiles, 1), bool)
  m_t = jnp.where(done, m_t, -jnp.inf)
  m = jnp.max(m_t, axis=-2)
  w = jnp.where(m_t == -jnp.inf, 0.0, jnp.exp(m_t - jnp.where(m == -jnp.inf, 0.0, m)[..., None, :]))
  l = jnp.sum(w * jnp.where(done, l_t, 0.0), axis=-2)
  f = w * (1.0 / jnp.maximum(l, 1e-30))[..., None, :]
  col = None
  if max_offset is None:
    args = ([key_range] if ranged else []) + [p, f]
    col = pl.pallas_call(
      kernel(_col_kernel, **layout),
      grid=lead + (n_progs,),
      in_specs=[_whole(a.shape) for a in args],
      out_specs=_whole(lead + (length,)),
      out_shape=jax.ShapeDtypeStruct(lead + (length,), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="mmjax_attn_mass_cols",
    )(*args)
    if ranged:  # the tiles outside the range were not written: zeros
      col = _zero_outside(col, key_range, tile, length)
  slash = _slash_pass(
    p, jnp.clip(base, -1, length - 1), key_range, f, per_head=per_head, n_rows=n_rows,
    n_offsets=max_offset or length, p_dtype=p_dtype, shared=shared, range_tiles=range_tiles,
    num_warps=num_warps, interpret=interpret,
  )  # fmt: skip
  return col, slash


def _zero_outside(col, key_range, tile, length):
  """col with the sums of the key tiles outside the key range (left unwritten) zeroed."""
  t = jnp.arange(length, dtype=jnp.int32) // tile
  t0, t1 = _key_tiles(key_range[..., 0:1], key_range[..., 1:2], tile)
  return jnp.where((t >= t0) & (t < t1), col, 0.0)


def _slash_pass(
  p, b, key_range, f, *, per_head, n_rows, n_offsets, p_dtype, shared, range_tiles, num_warps,
  interpret,
):  # fmt: skip
  """The diagonal pass: slash [..., n_offsets] from p [..., R, L] and the clipped bases b,
  one call per head (vmapped over a leading head axis when per_head); f [..., n_tiles, R]
  (or None): the scale of each (key tile of L / n_tiles keys, row), applied to p."""
  length = p.shape[-1]
  ranged = key_range is not None
  scale_tile = None if f is None else length // f.shape[-2]
  diag_tile = min(DIAG_TILE, length & -length)
  n_diag = -(-n_offsets // diag_tile)

  def diagonals(p, *rest):
    scales = [rest[0].reshape(-1)] if f is not None else []
    base, *rng = rest[1:] if f is not None else rest
    ins = [_whole((n_rows * length,))] + [_whole(a.shape) for a in scales]
    return pl.pallas_call(
      functools.partial(
        _diag_kernel,
        diag_tile=diag_tile,
        length=length,
        n_rows=n_rows,
        n_offsets=n_offsets,
        p_dtype=p_dtype,
        ranged=ranged,
        shared=shared,
        scale_tile=scale_tile,
      ),
      grid=(min(range_tiles, n_diag) if shared else n_diag,),
      in_specs=ins + [_whole((n_rows,))] + [_whole((2,))] * ranged,
      out_specs=_whole((n_diag * diag_tile,)),
      out_shape=jax.ShapeDtypeStruct((n_diag * diag_tile,), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES[2]),
      interpret=interpret,
      name="mmjax_attn_mass_diagonals",
    )(p.reshape(-1), *scales, base, *rng)

  args = [p] + ([f] if f is not None else []) + [b] + ([key_range] if ranged else [])
  if per_head:
    axes = [0] + ([0] if f is not None else []) + [0 if "base" in per_head else None]
    axes += [0 if "key_range" in per_head else None] if ranged else []
    slash = jax.vmap(diagonals, axes)(*args)
  else:
    slash = diagonals(*args)
  if shared:  # the offset tiles that reach no key of the range were not written: zeros
    d0, d1 = _reaching_tiles(b, key_range[..., 0], key_range[..., 1], diag_tile, length)
    d = jnp.arange(n_diag * diag_tile, dtype=jnp.int32) // diag_tile
    slash = jnp.where((d >= d0[..., None]) & (d < d1[..., None]), slash, 0.0)
  return slash[..., :n_offsets]


_STATIC = (
  "scale", "tile", "tiles", "num_warps", "p_dtype", "max_offset", "span_tiles",
  "range_tiles", "tile_stats", "interpret",
)  # fmt: skip
_call = jax.jit(
  functools.partial(_passes, per_head=frozenset(), n_heads=None), static_argnames=_STATIC
)


@functools.cache
def _heads_inner(optional, static):
  """The call for one head, batched by vmap into one call whose grid has the heads first
  (innermost): the programs of one key tile for every head run together, so the query
  heads of a kv head read its key tile once from memory (the L2 cache serves the others),
  instead of each head sweeping all the keys in turn (vmap's usual batching puts the head
  axis outermost). Keys batched per head: vmap's usual batching."""
  static = dict(static)

  def split(args):  # (q, k, key_lim, q_lim, base, the `optional` present) -> _ARGS order
    given = dict(zip(optional, args[5:], strict=True))
    return (*args[:5], *(given.get(n) for n in _ARGS[5:]))

  return heads_innermost(
    functools.partial(_call, **static),
    functools.partial(_passes, **static),
    split,
    _ARGS,
    "k",
  )
