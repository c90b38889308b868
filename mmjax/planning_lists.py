"""The default planner: each query block's key blocks built as short candidate lists.

`planning.head_plan` (the reference) scores every (query block, key block) pair in dense
[nQ, nK] priority matrices; at 1M tokens that is 8192 x 16384 entries per head, and the
plan cost more than the sparse kernel it feeds. This planner makes the same plan
(`tests/test_planning_lists.py` compares them) from per-query-block candidates:

* Rank patterns are *intervals* of key ranks: the local window [qmin - local, qmax], a
  slash at offset o [qmin - o, qmax - o], the sinks [0, sink) (single key columns, not
  blocks, where a grid permutation scatters them). The keys a component owns are one
  contiguous run of view indices (`HeadView.key_span`), so a rank interval is an
  interval of key blocks, and their union per query block is enumerated in index order
  without a sort over nK.
* Pooled-score blocks come from `planning.top_k_entries` (chunk maxima, then a top-k
  inside the best chunks) rather than a top-k over whole rows; on a GPU each top-k is the
  counting kernel `pallas_kernels.topk_select`.
* The candidates (union, self blocks, scored, dense components) are merged by one sort
  per query block (key block, then priority), deduplicated, and the top `max_blocks` by
  priority kept, ties to the lower block: the reference's `select_blocks` rule.

Exactness where the union is cut: in a symmetric view every interval spans at most
`block_q` query ranks, so the union is bounded statically and enumerated whole, then
filtered by causality. In the query-only view (Q boundary) a query block may span a long
run of original positions (a vision block across a text segment), but keys are in
original order, so every interval block is causal and the first `max_blocks` of the
union are the ones the reference keeps when a row overflows (structural blocks in index
order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax import planning as pl
from mmjax.planning import BIG, NEG, PRI_SELF, PRI_STRUCT, HeadView
from pallas_kernels.spans import true_span


def _cdiv(a, b):
  return -(-a // b)


def _q_stats(v: HeadView, q_mod):
  """Rank min / max of each query block's queries of q_mod ([nQ] each; BIG / -BIG when the
  block has none, which makes every interval below empty)."""
  qmin, qmax, _ = pl._block_min_max(v.q_rank, v.q_ok(q_mod), v.n_q)
  return qmin, qmax


class _Intervals:
  """Token intervals [lo, hi] (view indices, inclusive; lo > hi empty), [nQ, m] each, with a
  static bound on the key blocks each one covers (where the view bounds it), and the
  query modality of the component that adds them."""

  def __init__(self):
    self.lo, self.hi, self.bounds, self.q_mods = [], [], [], []

  @property
  def bound(self):
    return sum(self.bounds)

  def add_ranks(self, v: HeadView, q_mod, k_mod, a, b, blocks_each):
    """Keys of k_mod with rank in [a, b] (a, b broadcastable to [nQ, m]) for the queries
    of q_mod."""
    start, n = v.key_span(k_mod)
    a = jnp.maximum(a, 0)
    b = jnp.minimum(b, n - 1)
    a, b = jnp.broadcast_arrays(a, b)
    self.lo.append(start + a)
    self.hi.append(jnp.where(a <= b, start + b, start + a - 1))
    self.bounds.append(blocks_each * a.shape[1])
    self.q_mods.append(q_mod)

  def subset(self, keep):
    """The intervals whose entry of keep (one per add_ranks call) is true."""
    out = _Intervals()
    for i, kp in enumerate(keep):
      if kp:
        out.lo.append(self.lo[i])
        out.hi.append(self.hi[i])
        out.bounds.append(self.bounds[i])
        out.q_mods.append(self.q_mods[i])
    return out

  def widest(self):
    """The split of `_wide_rows`: (the intervals of the query modality whose bound is the
    largest, the rest), or None where one query modality adds every interval."""
    by_mod = {}
    for q_mod, b in zip(self.q_mods, self.bounds, strict=True):
      by_mod[q_mod] = by_mod.get(q_mod, 0) + b
    if len(by_mod) < 2:
      return None
    wide = max(by_mod, key=by_mod.get)
    is_wide = [m == wide for m in self.q_mods]
    return self.subset(is_wide), self.subset([not w for w in is_wide])


def _sinks(iv: _Intervals, cands, kind, pat, v: HeadView, q_mod, k_mod):
  """The first sink keys: an interval of ranks, or, where a grid permutation scatters
  them, single key columns (`planning.sink_columns`) appended to cands."""
  if v.sinks_scattered(k_mod):
    cols, ok = pl._scattered_sink_cols(kind, pat, v, k_mod)
    cands.append(pl.vertical_candidates(v, q_mod, cols, ok))
    return
  qmin, _ = _q_stats(v, q_mod)
  a = jnp.where((qmin < BIG)[:, None], 0, BIG)
  sink = pat.sink_tokens
  iv.add_ranks(v, q_mod, k_mod, a, jnp.full_like(a, sink - 1), _cdiv(sink, v.block_k) + 1)


def _local(iv: _Intervals, v: HeadView, q_mod, k_mod, local):
  qmin, qmax = _q_stats(v, q_mod)
  blocks = _cdiv(local + v.block_q, v.block_k) + 1
  iv.add_ranks(v, q_mod, k_mod, (qmin - local)[:, None], qmax[:, None], blocks)


def _slashes(iv: _Intervals, v: HeadView, q_mod, k_mod, offs, offs_ok):
  qmin, qmax = _q_stats(v, q_mod)
  a = jnp.where(offs_ok[None, :], qmin[:, None] - offs[None, :], BIG)
  blocks = _cdiv(v.block_q, v.block_k) + 1
  iv.add_ranks(v, q_mod, k_mod, a, qmax[:, None] - offs[None, :], blocks)


def _dense(iv: _Intervals, lists, v: HeadView, q_mod, k_mod):
  qmin, _ = _q_stats(v, q_mod)
  qany = qmin < BIG
  if v.has_key_span(k_mod):
    a = jnp.where(qany, 0, BIG)[:, None]
    iv.add_ranks(v, q_mod, k_mod, a, jnp.full_like(a, BIG), v.n_k)
  else:  # keys of several modality groups: every block that holds one
    _, _, kany = pl._block_min_max(v.k_pos, v.k_ok(k_mod), v.n_k)
    idx = jnp.broadcast_to(jnp.arange(v.n_k, dtype=jnp.int32), (v.n_q, v.n_k))
    lists.append((idx, jnp.where(qany[:, None] & kany[None, :], PRI_STRUCT, NEG), True))


def _scored(v: HeadView, q_mod, k_mod, top_k, axis_names):
  if pl.score_topk_impl(top_k) == "pallas":  # scores and picks in one kernel
    idx, vals = pl.scored_top_k(v, q_mod, k_mod, top_k, axis_names)
  else:
    s, valid, cmax, present = pl.scored_matrix(v, q_mod, k_mod, pl.topk_chunk(v.n_k, top_k))
    idx, vals = pl.top_k_entries(s, valid, top_k, axis_names, present, chunk_max=cmax)
  vals = vals.astype(jnp.float32)  # (bf16 scores: `planning.SCORE_DTYPE`)
  return idx, jnp.where(vals > NEG, 1.0 + jax.nn.sigmoid(vals), NEG), False


_PACK_BITS = 15  # union_blocks sorts (start, end) packed in one int32 below 2^15 blocks


def union_blocks(lo, hi, block_k, cap, n_blocks=None):
  """The key blocks of the union of token intervals [lo, hi] ([nQ, m]; inside [0,
  n_blocks * block_k) where not empty), ascending, first `cap` of them: (idx [nQ, cap],
  valid [nQ, cap]).

  Intervals sorted by start; each adds the blocks past the ones before it; slot s of the
  output is found by a binary search over the running count. With n_blocks (static) below
  2^15 the sort is of one int32 key, start * 2^15 + end, rather than of two operands
  (intervals with the same start may come in any order: the union and the slots past it
  are the same).
  """
  empty = lo > hi
  blo = jnp.where(empty, BIG, lo // block_k)
  bhi = jnp.where(empty, BIG - 1, hi // block_k)
  if n_blocks is not None and n_blocks <= 1 << _PACK_BITS:
    top = jnp.iinfo(jnp.int32).max  # the empty intervals, last
    key = pl.sort_ints(jnp.where(empty, top, (blo << _PACK_BITS) | bhi).astype(jnp.int32), 1)
    blo = jnp.where(key == top, BIG, key >> _PACK_BITS)
    bhi = jnp.where(key == top, BIG - 1, key & ((1 << _PACK_BITS) - 1))
  else:
    blo, bhi = jax.lax.sort((blo, bhi), dimension=1, num_keys=1)
  covered = jax.lax.cummax(bhi, axis=1)
  prev = jnp.concatenate([jnp.full_like(covered[:, :1], -1), covered[:, :-1]], axis=1)
  first = jnp.maximum(blo, prev + 1)
  size = jnp.maximum(bhi - first + 1, 0)
  ends = jnp.cumsum(size, axis=1)  # inclusive running count
  slots = jnp.arange(cap, dtype=ends.dtype)
  # (unrolled: one fused pass instead of a loop of small kernels)
  m = jax.vmap(lambda e: jnp.searchsorted(e, slots, side="right", method="scan_unrolled"))(ends)
  m = jnp.minimum(m, lo.shape[1] - 1)
  before = jnp.take_along_axis(ends - size, m, axis=1)
  idx = jnp.take_along_axis(first, m, axis=1) + slots[None, :] - before
  return idx.astype(jnp.int32), slots[None, :] < ends[:, -1:]


_SORT_WIDTH = 16  # ascending lists up to this wide join the short lists' one sort


def sort_by_block(idx, pri, n_blocks=None):
  """Rows of (idx, pri) [nQ, w] sorted by idx (BIG entries last), equal blocks in their
  column order: as a stable sort of the pair.

  With n_blocks (static; idx < n_blocks or BIG) and (n_blocks + 1) * 2^ceil(log2 w) below
  2^31, one int32 key is sorted, block * 2^bits + column, and pri gathered by the column
  (a sort of three operands, the pair and the index XLA adds to keep it stable, became
  one; the keys are distinct, so stability is moot).
  """
  bits = max(1, (idx.shape[1] - 1).bit_length())
  if n_blocks is None or (n_blocks + 1) << bits >= 2**31:
    return jax.lax.sort((idx, pri), dimension=1, num_keys=1)
  col = jnp.arange(idx.shape[1], dtype=jnp.int32)[None, :]
  blk = jnp.minimum(idx, n_blocks).astype(jnp.int32)  # BIG -> n_blocks: last
  key = pl.sort_ints((blk << bits) | col, axis=1)
  blk = key >> bits
  pri = jnp.take_along_axis(pri, key & ((1 << bits) - 1), axis=1)
  return jnp.where(blk >= n_blocks, BIG, blk), pri


def merge_candidates(lists, axis_names=(), n_blocks=None):
  """Candidate lists [(idx [nQ, w], pri [nQ, w], ascending)] -> one list (idx, pri) whose
  rows are ascending (BIG where a list had no entry), for `select_candidates(runs=...)`.
  n_blocks: the number of key blocks (static), for `sort_by_block`'s one-key sort.

  A list marked ascending has rows ascending and distinct, entries without a candidate
  included (a union of intervals, whose unused slots continue past its last block; the
  self blocks; a dense component's every block); the others (pooled-score picks) hold
  distinct blocks in no order. The short lists (every unordered one, and ascending ones
  of at most `_SORT_WIDTH`: the self blocks) are put side by side and sorted once, their
  unused entries set to BIG (a 2D boundary's five pooled-score sets and its self blocks:
  one sort instead of five sorts and five merges); the long ascending lists are merged
  into that. Each block then fills at most len(lists) adjacent entries of a row.

  When no row of any head (`axis_names`: the vmapped axes, as `top_k_entries`' skip) has
  a valid short entry (a Q boundary's default pattern on input with only the modalities
  it names), the merge is skipped: its output would be the long lists followed by the
  short ones' BIG entries, which is what the skip gives.
  """
  is_short = [not asc or i.shape[1] <= _SORT_WIDTH for i, _, asc in lists]
  short = [x for x, sh in zip(lists, is_short, strict=True) if sh]
  long = [x[:2] for x, sh in zip(lists, is_short, strict=True) if not sh]

  def merged(out, longs):
    for idx, pri in longs:
      out = (idx, pri) if out is None else pl.merge_rows(*out, idx, pri, NEG)
    return out

  if len(short) == 1 and short[0][2]:  # one ascending list: as it is
    return merged(short[0][:2], long)
  if not short:
    return merged(None, long)
  idx = jnp.concatenate([jnp.where(p > NEG, i, BIG) for i, p, _ in short], axis=1)
  pri = jnp.concatenate([p for _, p, _ in short], axis=1)

  def sort_merge(idx, pri, longs):
    return merged(sort_by_block(idx, pri, n_blocks), longs)

  if not long or not pl.skip_empty_work():
    return sort_merge(idx, pri, long)

  def skip(idx, pri, longs):  # no valid short entry: they all sort last (BIG)
    l_idx, l_pri = merged(None, longs)
    return jnp.concatenate([l_idx, idx], axis=1), jnp.concatenate([l_pri, pri], axis=1)

  some = pl._any_over(pri > NEG, axis_names)
  return jax.lax.cond(some, sort_merge, skip, idx, pri, long)


def select_candidates(idx, pri, max_blocks, axis_names=(), runs=None):
  """The top `max_blocks` distinct blocks of candidate lists idx, pri [nQ, W] (a block may
  repeat; its highest priority counts; -inf = not a candidate) by priority, ties to the
  lower block: (block_idx [nQ, MB] ascending, count [nQ]); slots past the count hold 0.

  runs: the rows are ascending already and a block fills at most `runs` adjacent entries
  (`merge_candidates`): neighbours within `runs` give each block's first valid entry and
  its highest priority, without the sort.
  """
  n_q, width = idx.shape
  if runs is None:
    key = jnp.where(pri > NEG, idx, BIG)
    # (equal (key, -pri) pairs are equal entries: stability is moot)
    key, negpri = jax.lax.sort((key, -pri), dimension=1, num_keys=2, is_stable=False)
    first = (key < BIG) & jnp.concatenate(
      [jnp.ones((n_q, 1), bool), key[:, 1:] != key[:, :-1]], axis=1
    )
  else:
    valid = pri > NEG
    first = pl.first_of_runs(idx, valid, runs)
    best = jnp.where(valid, pri, NEG)
    for d in range(1, runs):  # the block's valid entries up to runs - 1 ahead
      ahead = jnp.where((idx[:, :-d] == idx[:, d:]) & valid[:, d:], pri[:, d:], NEG)
      best = jnp.maximum(best, jnp.pad(ahead, ((0, 0), (0, d)), constant_values=NEG))
    key = jnp.where(first, idx, BIG)
    negpri = -best
  n_fin = first.sum(-1)

  def compact(key, negpri, first):  # every row fits: keep all, in block order
    # (key is ascending: a prefix-count compaction, not a second sort)
    return pl._compact_rows(key, first, max_blocks)

  def top(key, negpri, first):
    vals, pos = jax.lax.top_k(jnp.where(first, -negpri, NEG), max_blocks)
    sel = jnp.where(vals > NEG, jnp.take_along_axis(key, pos, axis=1), BIG)
    return pl.sort_ints(sel, 1)

  if width <= max_blocks:
    sel = compact(key, negpri, first)
  else:
    fits = jnp.all(n_fin <= max_blocks)
    if axis_names:
      fits = jax.lax.pmin(fits.astype(jnp.int32), axis_names) > 0
    sel = jax.lax.cond(fits, compact, top, key, negpri, first)
  if sel.shape[1] < max_blocks:
    sel = jnp.pad(sel, ((0, 0), (0, max_blocks - sel.shape[1])), constant_values=BIG)
  count = (sel < BIG).sum(-1).astype(jnp.int32)
  return jnp.where(sel < BIG, sel, 0).astype(jnp.int32), count


# `_wide_rows`' window sizes in 32nds of nQ. Each is a branch of its lax.switch, and on a
# GPU every branch is a child graph of the plan's CUDA graph that the launch pays for,
# taken or not: with (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) the host spent about 0.17 ms more
# before 2d_boundary's 128k plan started on the device than with the switch replaced by
# its taken branch (0.47 -> 0.30 ms, h200_2026-12-03g/3_launch3). Five sizes, steps of at
# most 3x: its 80 text rows of 1024 still take 96, a short question 32.
ROW_WINDOWS = (1, 3, 8, 16, 32)
# 0: `_wide_rows` picks a window of `ROW_WINDOWS` (a lax.switch); w > 0: instead a loop
# over windows of w 32nds of nQ from the first row with a wide interval to the last (one
# loop body in the plan's graph, not a branch per size, each a child graph the launch
# pays for; a window per trip, so a long text run costs a trip of a small window's
# latency per w 32nds of nQ: about 11 trips where all rows are text). On an H200,
# 2d_boundary's 128k plan (80 text rows of 1024: one trip) -0.061 ms against the switch,
# timed in turn, the same plans (h200_2026-12-04/2_pool2). With text in every frame (11
# trips): -0.11 ms at 53% text, but +0.51 ms at 88% (h200_2026-12-04b/3_text_heavy).
ROW_LOOP = 3


def _count_below(sizes, x):
  """How many of the static ints `sizes` are below x (an int32 scalar): a sum of compares,
  not jnp.searchsorted, whose scan is a while loop (on a GPU a loop of conditional nodes
  in the plan's command buffer)."""
  return sum((jnp.int32(s) < x).astype(jnp.int32) for s in sizes)


def _wide_rows(rows_plan, iv, wide, narrow, n_q, axis_names):
  """(block_idx [nQ, MB], block_count [nQ]) where one query modality's intervals (`wide`:
  a 2D boundary's text slashes, some 400 key blocks a row against a vision row's 20) are
  enumerated only for the query blocks they are not empty in.

  Every row is planned from the other intervals (`narrow`: its union's cap is theirs),
  then the rows from the first to the last one with a wide interval not empty (a
  modality's query blocks are contiguous in a symmetric view), reduced over the vmapped
  axes, are planned again from all of them in a window of static size: the smallest of
  `ROW_WINDOWS` (32nds of nQ) that holds them (one `lax.switch` branch each, and one for
  no such row), or with `ROW_LOOP` in windows of ROW_LOOP 32nds of nQ, one per trip of a
  loop from the first such row on. Rows outside the windows have no wide interval, so
  their union, and plan, is the same either way.
  """
  block_idx, block_count = rows_plan(narrow, 0, n_q)
  has = jnp.any(jnp.concatenate(wide.lo, axis=1) <= jnp.concatenate(wide.hi, axis=1), axis=1)
  first, end = true_span(has)
  first = jnp.where(end > 0, first, n_q)  # (none: neutral for the minimum over the axes)
  if axis_names:
    first, end = jax.lax.pmin(first, axis_names), jax.lax.pmax(end, axis_names)
  if ROW_LOOP:
    size = _cdiv(n_q * ROW_LOOP, 32)

    def trip(i, carry):
      start = jnp.clip(first + i * size, 0, n_q - size)
      wi, wc = rows_plan(iv, start, size)
      return (
        jax.lax.dynamic_update_slice_in_dim(carry[0], wi, start, axis=0),
        jax.lax.dynamic_update_slice_in_dim(carry[1], wc, start, axis=0),
      )

    trips = jnp.where(end > first, _cdiv(end - first, size), 0)
    return jax.lax.fori_loop(0, trips, trip, (block_idx, block_count))
  sizes = sorted({_cdiv(n_q * w, 32) for w in ROW_WINDOWS})
  which = jnp.where(end > first, 1 + _count_below(sizes, end - first), 0)

  def window(size):
    def plan(bi, bc):
      start = jnp.clip(first, 0, n_q - size)
      wi, wc = rows_plan(iv, start, size)
      return (
        jax.lax.dynamic_update_slice_in_dim(bi, wi, start, axis=0),
        jax.lax.dynamic_update_slice_in_dim(bc, wc, start, axis=0),
      )

    return plan

  branches = [lambda bi, bc: (bi, bc)] + [window(size) for size in sizes]
  return jax.lax.switch(which, branches, block_idx, block_count)


def head_plan(
  layout,
  components,
  q,
  k,
  mod,
  *,
  seq_len,
  block_q,
  block_k,
  scale,
  max_blocks,
  max_cols,
  axis_names=(),
  k_pooled=None,
):
  """Plan of one (batch, head), as `planning.head_plan`, from candidate lists."""
  kw = dict(seq_len=seq_len, block_q=block_q, block_k=block_k, scale=scale)
  v, aux = pl.plan_view(layout, components, q, k, mod, k_pooled, axis_names, **kw)
  n_q, n_k = v.n_q, v.n_k
  _, qmax_all, _ = pl._block_min_max(v.q_pos, v.q_ok(None), n_q)
  kmin_all, _, _ = pl._block_min_max(v.k_pos, v.k_ok(None), n_k)

  iv = _Intervals()
  lists = []  # (idx [nQ, w], pri [nQ, w], ascending)
  cands = []  # vertical columns
  for comp in components:
    kind, pat, qm, km = comp.pattern.name, comp.pattern, comp.q_mod, comp.k_mod
    if kind == "dense":
      _dense(iv, lists, v, qm, km)
    elif kind == "a_shape":
      _sinks(iv, cands, kind, pat, v, qm, km)
      _local(iv, v, qm, km, pat.local_tokens)
    elif kind == "block_sparse":
      lists.append(_scored(v, qm, km, pat.top_k_blocks, axis_names))
    elif kind == "grid":
      _sinks(iv, cands, kind, pat, v, qm, km)
      _local(iv, v, qm, km, pat.band_tokens)
      lists.append(_scored(v, qm, km, pat.top_k_blocks, axis_names))
    elif kind == "vertical_slash":
      cols, cols_ok, offs, offs_ok = pl.vs_estimate(pat, v, qm, km)
      _slashes(iv, v, qm, km, offs, offs_ok)
      cands.append(pl.vertical_candidates(v, qm, cols, cols_ok))
    else:
      raise ValueError(f"unknown pattern kind {kind!r}")

  def rows_plan(ivs: _Intervals, start, n_rows):
    """The key blocks of the n_rows (static) query blocks from start on: (block_idx
    [n_rows, MB], block_count [n_rows]), from the lists and the intervals ivs."""
    if n_rows == n_q:
      start, cut = 0, lambda x: x
    else:
      cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, n_rows, axis=0)  # noqa: E731
    rows = [(cut(i), cut(p), asc) for i, p, asc in lists]
    if ivs.lo:
      # symmetric view: the whole union (bounded), then the causal filter; query-only
      # view: every interval block is causal, the first max_blocks suffice (module doc).
      cap = min(n_k, ivs.bound if v.symmetric else max_blocks)
      lo, hi = (cut(jnp.concatenate(x, axis=1)) for x in (ivs.lo, ivs.hi))
      idx, ok = union_blocks(lo, hi, block_k, cap, n_k)
      rows.append((idx, jnp.where(ok, PRI_STRUCT, NEG), True))
    if v.symmetric:  # the key blocks holding each query block's own tokens
      n_self = _cdiv(block_q, block_k) + 1
      i = (start + jnp.arange(n_rows, dtype=jnp.int32))[:, None]
      idx = (i * block_q) // block_k + jnp.arange(n_self, dtype=jnp.int32)[None, :]
      ok = idx <= ((i + 1) * block_q - 1) // block_k
      rows.append((idx, jnp.where(ok, PRI_SELF, NEG), True))
    if pl.merge_lists():  # one ascending list (merged, not sorted), then the causal filter
      idx, pri = merge_candidates(rows, axis_names, n_k)
      runs = len(rows)
    else:  # one sort per row (select_candidates)
      idx = jnp.concatenate([x for x, _, _ in rows], axis=1)
      pri = jnp.concatenate([p for _, p, _ in rows], axis=1)
      runs = None
    qmax = cut(qmax_all)
    pri = jnp.where(kmin_all[jnp.clip(idx, 0, n_k - 1)] <= qmax[:, None], pri, NEG)
    return select_candidates(idx, pri, max_blocks, axis_names, runs)

  split = iv.widest() if v.symmetric and pl.split_rows() else None
  if split is not None and min(n_k, split[1].bound) < min(n_k, iv.bound):
    block_idx, block_count = _wide_rows(rows_plan, iv, *split, n_q, axis_names)
  else:
    block_idx, block_count = rows_plan(iv, 0, n_q)
  return pl.finish_plan(v, cands, block_idx, block_count, max_cols, aux)
