"""Per-head plan construction, shared by every policy (runs under jit, vmapped over heads).

Every policy reduces to a *view* and a list of *components*:

* The view orders queries and keys: identity, grouped by modality (both sides: 2D
  boundary; queries only: Q boundary), and optionally one modality group (or the whole
  sequence) re-ordered by a grid stride so that lines at that stride become contiguous.
* A component is a pattern (a_shape, vertical_slash, block_sparse, grid, dense) applied to
  the (query modality, key modality) pair it owns (None = every modality).

Each component scores the [nQ, nK] key blocks with a priority:
  3 = a block holding the query's own token (always kept),
  2 = a structural block (sink, local window, slash line, grid band),
  (1, 2) = a block picked by its pooled score (top-k),
  -inf = not wanted.
Blocks that no query of the block can see causally are dropped, the components' priorities
are merged by max, and each query block keeps its top `max_blocks` (a static size), sorted
ascending. Vertical columns are single keys kept per query block unless a kept block
already holds them.

Coordinates: a pattern measures distances in *ranks*, not view indices. In a symmetric
view the rank of a token is its index inside its modality group in view order (so slash
lines of text continue across the video between two text segments, and a grid-permuted
group has its band along its own diagonal); `orank` is the index inside the group in
original order (sinks are the first tokens of a group). In a query-only view (Q boundary)
keys stay in original order, so ranks are original positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attn_mass import P_DTYPES, attention_mass
from pallas_kernels.block_pool import MAX_SELECTIONS, block_mean, is_group
from pallas_kernels.col_select import select_columns as col_select
from pallas_kernels.pooled_scores import pooled_scores
from pallas_kernels.pooled_topk import pooled_top_k
from pallas_kernels.topk_select import top_k_select

NEG = -jnp.inf
# The top-k of a scored component sits in a lax.cond that skips it when no head has an
# allowed pair (`skip_empty_topk()`; the plan is the same either way). None: on everything
# but a GPU. On a GPU a cond outside a CUDA graph reads its predicate back to the host
# and splits the plan's graphs, while the top-k of an empty component is cheap there
# (pooled_topk and pooled_scores visit no tile of it). On an H200 at 128k, with the
# inputs of the attention benchmark (every component present), plans without these
# conds: block_sparse 0.91 -> 0.75 ms (XLA's default command buffers), 2d_boundary 2.39
# -> 2.24 ms and mminference 2.83 -> 2.75 ms (with CONDITIONAL,WHILE; h200_2026-12-03b).
SKIP_EMPTY_TOPK = None
# The other lax.conds that skip work no head needs: the merge of a row's short candidate
# lists when none of them has an entry (`planning_lists.merge_candidates`), and with
# `POOL_OPTIONAL_APART` the pooled means of the selectors only `_optional` components use
# (`pool_all`). True: skipped (a conditional each); False: always done (the same plan, no
# conditional); None: True.
SKIP_EMPTY_WORK = None
# The pooled means of the selectors only `_optional` components use: False, in the
# selectors' one pooling per side (block_mean skips a selection's sum in a block without
# its rows); True, in a pooling of their own inside a lax.cond (`SKIP_EMPTY_WORK`) that
# skips it when no head has such a component's query and key: a conditional node and a
# child graph in the plan's CUDA graph, which the launch pays for (h200_2026-12-03g).
POOL_OPTIONAL_APART = False
# Group sorts (`group_sort`) of modality ids all in [0, GROUP_COUNT_IDS) are counting sorts
# (prefix counts by matmuls and one scatter); other ids take a sort (a lax.cond between
# the two). 0: always the sort. The same arrays either way.
GROUP_COUNT_IDS = 16
_CHUNK = 128  # chunk of the sort-free prefix counts
BIG = np.int32(2**30)
PRI_SELF = 3.0
PRI_STRUCT = 2.0


@dataclasses.dataclass(frozen=True)
class OtherThan:
  """Modality selector: every real token whose id is not in `ids`."""

  ids: tuple[int, ...]


def _single_id(sel):
  """Whether a modality selector is one id (an int; not None, an `OtherThan` or a bool)."""
  return isinstance(sel, int) and not isinstance(sel, bool)


def _mod_ok(mods, sel):
  if sel is None:
    return jnp.ones(mods.shape, bool)
  if isinstance(sel, OtherThan):
    return ~jnp.isin(mods, jnp.asarray(sel.ids, jnp.int32))
  return mods == sel


@dataclasses.dataclass(frozen=True)
class Component:
  """A pattern on a (query modality, key modality) pair; None matches every modality."""

  q_mod: int | OtherThan | None
  k_mod: int | OtherThan | None
  pattern: object  # a simple policy (see mmjax.policies); read through its fields


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the view is built.

  group: "none" (identity order), "both" (2D boundary) or "q" (Q boundary).
  grid_groups: modality ids whose group is grid-permuted (-1 = the whole sequence, when
    group == "none"), each with the grid pattern that estimates its stride.
  """

  group: str
  grid_groups: tuple[tuple[int, object], ...] = ()


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _block_min_max(x, valid, nb):
  xb = x.reshape(nb, -1)
  vb = valid.reshape(nb, -1)
  mn = jnp.where(vb, xb, BIG).min(-1)
  mx = jnp.where(vb, xb, -BIG).max(-1)
  return mn, mx, vb.any(-1)


def _rank_in_group(group_of_sorted):
  """Index of each element within its group, for elements already sorted by group."""
  n = group_of_sorted.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  is_start = jnp.concatenate([jnp.array([True]), group_of_sorted[1:] != group_of_sorted[:-1]])
  start = jax.lax.cummax(jnp.where(is_start, idx, 0))
  return idx - start


def _topk_threshold_mask(score, valid, k, axis_names=(), present=None):
  """Per row, True for the k highest valid scores (ties to the lower index): [nQ, nK].

  The reference planner's scored blocks. The top-k runs only when some entry is valid: one
  `lax.cond` whose predicate is reduced (any) over `axis_names`, the vmapped axes, so that
  it stays a branch (a pattern's component for a modality the input lacks, such as
  2d_boundary's ids never named, has none).
  """
  k = min(k, score.shape[-1])
  s = jnp.where(valid, score, NEG)

  def mask(x):
    vals, idx = jax.lax.top_k(x, k)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros(x.shape, bool).at[rows, idx].set(vals > NEG)

  if not skip_empty_topk():
    return mask(s)
  present = _any_over(valid if present is None else present, axis_names)
  return jax.lax.cond(present, mask, lambda x: jnp.zeros(x.shape, bool), s)


def _any_over(valid, axis_names):
  present = jnp.any(valid)
  if axis_names:
    present = jax.lax.pmax(present.astype(jnp.int32), axis_names) > 0
  return present


# The per-row top-k: "pallas" (pallas_kernels.topk_select: counts instead of sorting),
# "xla" (lax.top_k, a sort of the row on a GPU for k > 16), or None: the kernel where jax's
# backend is a GPU, lax.top_k elsewhere. Both pick the same entries. Tests and tools set it
# (`policies.Policy.plan` keys its jit on `kernel_settings()`; other jitted callers would
# keep a trace made before a change).
TOPK_IMPL = None
# The pooled block means: "pallas" (pallas_kernels.block_pool: every selection of a side in
# one read, rows gathered by the view's permutation), "xla" (`_masked_mean` on the permuted
# view), or None: the kernel on a GPU, XLA elsewhere. The same means up to the order of
# the f32 sums.
POOL_IMPL = None
# The pooled means of a policy's heads as one block_pool call with the heads innermost in
# its grid (`heads_inner`: the programs of one block for every head run together, so a
# view the heads share reads neighbouring bytes of [B, L, N, H] at once), rather than
# vmap's usual batching (the heads outermost: each head sweeps its strided [L, H] slice).
# The same means. On an H200 at 1M tokens (28 heads): block_sparse's query means 2.01 ->
# 1.92 ms, the 2D boundary's 3.69 -> 3.59; grid's (each head its own order) unchanged
# (benchmarks/results/h200_2026-12-02d; tools/pool_bench.py times both).
POOL_HEADS_INNER = True
# Blocks per block_pool program for the sampled means (`Grid.pool_tokens`: blocks of 16
# view rows): 1, a program per block and a reduction per selection (as before), or a power
# of two >= 16, that many blocks per program and one dot of 0/1 weights per selection
# (`block_mean(group=...)`; the same means up to the order of the f32 sums). Applied where
# it divides a side's blocks and a program reads at most 512 rows. On an H200 at 1M tokens
# (h200_2026-12-02h/1_pool_group) grid's means went 0.82 + 0.41 -> 0.68 + 0.35 ms and the
# 2D boundary's three selections 2.47 + 1.24 -> 1.37 ms (its plan 26.7 -> 24.8 ms);
# pool_bench on those shapes: 16 blocks 1.37x / 1.55x faster than 1, 32 slower than 1.
POOL_GROUP = 16
_POOL_GROUP_MAX_ROWS = 512  # (the rows one grouped program loads: its registers)
# The last-query estimates' column and diagonal sums: "pallas" (pallas_kernels.attn_mass:
# the scores stay in registers, two passes over the keys read in place, p written once
# and its diagonals summed by a third), "xla" (scores and softmax in XLA, `slash_sums`),
# or None: the kernel on a GPU (2.1x faster at 1M: h200_2026-12-01b/mass_bench.json).
MASS_IMPL = None
# The last-query estimates of a policy's query heads as one attn_mass call with the heads
# innermost in its grid (`heads_inner`: a kv head's key tile read once for its query
# heads), rather than vmap's usual batching (the heads outermost: each head sweeps all
# the keys). The same values (max diff 0); on an H200 1.06-1.09x faster at 128k,
# 1.06-1.07x at 1M (tools/mass_bench.py, h200_2026-12-01d/mass_bench_*.json).
MASS_HEADS_INNER = True
# How the attn_mass kernel stores the probabilities p [64, L] between its second and third
# passes: "float32", or "float16" (scaled by 2^15: half those passes' memory traffic, the
# slash sums within about 1e-3 relative, the column sums unchanged). On an H200 the
# kernel is 1.21-1.29x faster with float16 (h200_2026-12-02/mass_bench.txt), which saved
# 0.5 of 35 ms in a 1M mminference plan (2 heads per step) and 3.27 -> 3.22 ms in its
# 128k plan (h200_2026-12-02d/3_traces); not yet in a benchmark, so float32 stays.
MASS_P_DTYPE = "float32"
# A last-query estimate over one modality group of a grouped view (the 2D boundary's
# text-text vertical-slash) reads the group's keys only; its second and third passes then
# launch L / tile / this many programs per head, laid over the group's key tiles and the
# offsets that reach them (`attention_mass(range_tiles=)`), not one per tile of L, most of
# which returned at once: the text of a video input is a few % of its tokens. A group of
# more than that many tiles is shared out, a loop per program (a loop over tiles ran
# 1.4-1.6x slower than a program per tile on an H200). 32 instead: within the noise of 8
# in 2d_boundary's 128k plan on an H200 (h200_2026-12-03d/3_variants and 4_early).
MASS_RANGE_DIV = 8
# The last-query estimates' key tile (attn_mass's `tile`; at most the length's largest
# power-of-two divisor).
MASS_TILE = 128
# The estimates by attn_mass's two-pass form (`attention_mass(tile_stats=True)`: each key
# tile's exp stored with its own row max and sum, rescaled in the diagonal and column
# passes; no statistics pass). The same sums to rounding, the same plans. On an H200,
# 2d_boundary's 128k plan: device busy 1.33 -> 1.24 ms, wall -0.026 ms against three
# passes timed in turn (h200_2026-12-04/2_pool2; False: three passes,
# --config.planner.mass_tile_stats=False).
MASS_TILE_STATS = True

# XLA compile options for a program that builds plans (`jax.jit(..., compiler_options=)`;
# an inner jit's options are ignored, so they go on the outermost one). Concurrent
# command-buffer scheduling lets independent kernels overlap: a plan is a chain of small,
# latency-bound kernels, and an mminference plan runs one chain per pattern group. On an
# H200 at 128k: mminference 6.29 -> 4.02 ms, q_boundary 7.36 -> 6.91; temp memory 0.21 ->
# 1.26 GiB and 0.99 -> 2.55 GiB. At 1M it bought little (mminference 44.0 -> 40.5 ms, 2
# heads per step) for 4.4x the memory (3.0 -> 13.2 GiB): h200_2026-12-01e/README.md.
PLAN_COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}

# The pooled-block scores: "pallas" (pallas_kernels.pooled_scores: masked in the kernel,
# the chunk maxima of `top_k_entries` taken from the tile in registers, tiles without an
# allowed pair skipped) or "xla" (an einsum; the mask and maxima are passes over it).
# None: the kernel on a GPU (benchmarks/results/h200_2026-12-01b/score_bench.json: with
# the same top-k, 1.15-1.67x faster than cuBLAS' dot + XLA's maxima pass at 1M tokens).
SCORE_IMPL = None
# The lists planner's pooled-score picks: "pallas" (pallas_kernels.pooled_topk: each
# row's top-k kept in registers as the kernel sweeps the key blocks; the [nQ, nK] scores
# and their chunk maxima never written, no top-k passes) or "xla" (the scores by
# `score_impl`, then `top_k_entries`). The same picks from the same dot (it needs
# SCORE_IMPL "pallas", which the dense planner's scores come from). None: "pallas" on a
# GPU for top k up to SCORE_TOPK_MAX_K, "xla" elsewhere. On an H200 at 1M tokens, 14
# heads per step, pooled_topk for k <= 8 made grid's plan 1.17x faster, 2D boundary's
# 1.20x and mminference's 1.05x (benchmarks/results/h200_2026-12-02b); for block_sparse's
# k = 32 it was 1.04x at 1M and 0.81x at 128k (h200_2026-12-02/score_bench.txt): each
# entry that beats a row's worst slot is inserted in a loop, so its cost grows with k.
SCORE_TOPK_IMPL = None
# With SCORE_TOPK_IMPL "pallas" (or None on a GPU): only components whose top k is at most
# this take the one kernel, the rest the scores + top_k_entries; 0: every component.
SCORE_TOPK_MAX_K = 8
# pooled_topk with `sort_blocks` in grid-permuted views (`HeadView.grid_mods`): their
# blocks' limits are in no order, so every tile holds an allowed pair and none is skipped
# (grid's picks were 5.9 of its 19 ms plan at 1M on an H200, h200_2026-12-02d); with the
# blocks sorted by their limits each program visits only its allowed keys (about half).
# The same picks. Not yet measured on a GPU: off (`tools/plan_trace.py --score_topk_sort 1`).
SCORE_TOPK_SORT = False
# Candidate lists: True merges ascending lists by binary searches (`merge_rows`,
# `planning_lists.merge_candidates`), False sorts each query block's row; None: merges on
# a GPU (a row sort there cost 12 ms of a 1M-token plan), sorts elsewhere (on the CPU the
# unrolled searches compiled 1.6x slower than the sorts and ran no faster). The same plan.
MERGE_LISTS = None
# Symmetric views whose query modalities' intervals differ in width (a 2D boundary: the text
# pair's slashes, some 400 key blocks per query block, the vision pair's window and sinks
# about 20): True plans every query block from the narrow ones and only a window of the
# query blocks that have the wide ones from all (`planning_lists._wide_rows`), False all
# from all; None: True on a GPU (one lax.switch branch per window size, compiled slower on
# the CPU). The same plan.
SPLIT_ROWS = None
# Each query block's columns: "pallas" (pallas_kernels.col_select: one program per query
# block over the head's shared column list, binary searches in its key blocks, no [nQ, V]
# array written) or "xla" (the merges, searches and compactions of `select_columns` as
# XLA passes); None: the kernel on a GPU.
COLS_IMPL = None
# The col_select kernel's (candidates per loop step, warps): one warp per query block,
# 128 candidates a step (tools/cols_bench.py on an H200 at 1M tokens, against 64 and 4
# warps: 1.50x on vertical_slash's shape, 2.32x on q_boundary's;
# h200_2026-12-01c/cols_bench.json).
COLS_TILES = (128, 1)
# The dtype of the pooled-block scores and of the pooled means they multiply: "float32"
# (the means as pooled; TF32 products on a GPU, as XLA's f32 dot there), "bfloat16" (the
# means rounded to the model's dtype, exact products, f32 sums rounded once to bf16: the
# pooled scores as MInference's bf16 matmul gives them; half the bytes each score tile
# loads and stores, the matrix units' bf16 rate), or None: "bfloat16" on a GPU, "float32"
# elsewhere (the CPU's plans and results as before). The picks may differ between the two
# at near-ties (bf16 scores tie more often: ties go to the lower key block); the dense
# and the lists planner take the same. On an H200 at 1M tokens (28 heads) bf16 made
# block_sparse's picks 1.72x faster (10.36 -> 6.04 ms; the score kernel 6.46 -> 3.15 ms)
# and grid's fused picks 1.45x (6.26 -> 4.32 ms); the 1M block_sparse plan 13.26 ->
# 9.19 ms (benchmarks/results/h200_2026-12-02c).
SCORE_DTYPE = None
SCORE_DTYPES = ("float32", "bfloat16")
# The pooled_scores kernel's tile (query blocks, key blocks) and warps.
SCORE_TILES = (64, 128, 4)
# rows up to this long go to the Pallas top-k whole, longer ones in chunks (its time grows
# with the row; on an H200 a pooled-score top-k of 28 heads with rows up to 512 instead of
# 4096 ran 1.17x faster at 1M and 1.91x at 128k: h200_2026-12-01b/score_bench.json)
_KERNEL_ROW = 512
# calls of fewer rows (per vmapped call: the vertical-slash estimate's one row per head)
# go to the kernel only whole, one program per row held in registers, for rows up to
# _KERNEL_WHOLE_ROW long (8 warps), else to lax.top_k: re-read tile by tile, the kernel's
# 32 dependent counting passes are latency-bound (28 rows of 16384, k 512: 0.44 ms vs 0.16
# on an H200). Whole, in one call's wall on an H200 (a 0.07-0.08 ms dispatch floor in
# each): 28 rows of 8192, k 512: 0.087 ms vs lax.top_k's 0.152; of 4096, k 128: 0.093 vs
# 0.153; of 16384, k 512: 0.125 vs 0.173 (h200_2026-12-03c/topk.txt)
_KERNEL_MIN_ROWS = 64
_KERNEL_WHOLE_ROW = 16384


def kernel_settings():
  """What the planner's kernels and list merges depend on, as a hashable jit key."""
  return tuple(kernel_settings_dict().values())


def kernel_settings_dict():
  """`kernel_settings()` by name, as they apply here (for a run's records)."""
  if MASS_P_DTYPE not in P_DTYPES:
    raise ValueError(f"planning.MASS_P_DTYPE must be one of {P_DTYPES}; got {MASS_P_DTYPE!r}")
  return dict(
    topk_impl=topk_impl(),
    kernel_row=_KERNEL_ROW,
    kernel_min_rows=_KERNEL_MIN_ROWS,
    kernel_whole_row=_KERNEL_WHOLE_ROW,
    pool_impl=pool_impl(),
    mass_impl=mass_impl(),
    score_impl=score_impl(),
    score_tiles=SCORE_TILES,
    score_dtype=score_dtype(),
    merge_lists=merge_lists(),
    split_rows=split_rows(),
    skip_empty_topk=skip_empty_topk(),
    skip_empty_work=skip_empty_work(),
    group_count_ids=_group_count_ids_setting(),
    score_topk_impl=score_topk_impl(),
    score_topk_max_k=SCORE_TOPK_MAX_K,
    score_topk_sort=bool(SCORE_TOPK_SORT),
    cols_impl=cols_impl(),
    cols_tiles=COLS_TILES,
    mass_heads_inner=bool(MASS_HEADS_INNER),
    mass_p_dtype=MASS_P_DTYPE,
    mass_range_div=_mass_range_div_setting(),
    mass_tile_stats=bool(MASS_TILE_STATS),
    pool_heads_inner=bool(POOL_HEADS_INNER),
    pool_group=_pool_group_setting(),
  )


# the settings `settings` overrides, by lowercase name
SETTING_NAMES = {
  "topk_impl": "TOPK_IMPL",
  "pool_impl": "POOL_IMPL",
  "mass_impl": "MASS_IMPL",
  "score_impl": "SCORE_IMPL",
  "score_topk_impl": "SCORE_TOPK_IMPL",
  "score_topk_max_k": "SCORE_TOPK_MAX_K",
  "score_topk_sort": "SCORE_TOPK_SORT",
  "score_dtype": "SCORE_DTYPE",
  "cols_impl": "COLS_IMPL",
  "merge_lists": "MERGE_LISTS",
  "split_rows": "SPLIT_ROWS",
  "skip_empty_topk": "SKIP_EMPTY_TOPK",
  "skip_empty_work": "SKIP_EMPTY_WORK",
  "group_count_ids": "GROUP_COUNT_IDS",
  "mass_heads_inner": "MASS_HEADS_INNER",
  "mass_p_dtype": "MASS_P_DTYPE",
  "pool_heads_inner": "POOL_HEADS_INNER",
  "pool_group": "POOL_GROUP",
  "mass_range_div": "MASS_RANGE_DIV",
  "mass_tile_stats": "MASS_TILE_STATS",
}


# the settings that are on / off (`settings` takes True or False for them)
SWITCH_SETTINGS = ("mass_heads_inner", "pool_heads_inner", "score_topk_sort", "mass_tile_stats")


@contextlib.contextmanager
def settings(**overrides):
  """The planner's settings (module globals, by lowercase name: `SETTING_NAMES`) set for
  the block and restored after it; unknown names and bad values raise a ValueError
  before anything runs. `plan` keys its jit on `kernel_settings()`, so plans made in the
  block are traced with them."""
  unknown = sorted(set(overrides) - set(SETTING_NAMES))
  if unknown:
    raise ValueError(f"planning.settings: unknown {unknown}; known: {sorted(SETTING_NAMES)}")
  g = globals()
  for name, value in overrides.items():
    if name in SWITCH_SETTINGS and value not in (True, False):  # (not "0": bool("0") is True)
      raise ValueError(f"planning.settings: {name} takes True or False, got {value!r}")
  old = {name: g[SETTING_NAMES[name]] for name in overrides}
  try:
    for name, value in overrides.items():
      g[SETTING_NAMES[name]] = value
    kernel_settings()  # (checks the values)
    yield
  finally:
    for name, value in old.items():
      g[SETTING_NAMES[name]] = value


def _int_setting(name, least):
  """The int setting planning.<name>, checked to be an int >= least."""
  n = globals()[name]
  if isinstance(n, bool) or not isinstance(n, int) or n < least:
    raise ValueError(f"planning.{name} must be an int >= {least}; got {n!r}")
  return n


def _mass_range_div_setting():
  return _int_setting("MASS_RANGE_DIV", 1)


def _group_count_ids_setting():
  return _int_setting("GROUP_COUNT_IDS", 0)


def _pool_group_setting():
  if not is_group(POOL_GROUP):
    raise ValueError(f"planning.POOL_GROUP must be 1 or a power of two >= 16; got {POOL_GROUP!r}")
  return POOL_GROUP


def _on_gpu():
  return jax.default_backend() == "gpu"


def _interpret():
  """The planner's Pallas kernels run compiled on a GPU, in interpret mode elsewhere."""
  return not _on_gpu()


def _impl(name, value, on_gpu="pallas"):
  """A kernel setting's value: as set, or by default `on_gpu` on a GPU and XLA elsewhere."""
  if value not in (None, "pallas", "xla"):
    raise ValueError(f"planning.{name} must be None, 'pallas' or 'xla'; got {value!r}")
  if value is not None:
    return value
  return on_gpu if _on_gpu() else "xla"


def topk_impl():
  return _impl("TOPK_IMPL", TOPK_IMPL)


def pool_impl():
  return _impl("POOL_IMPL", POOL_IMPL)


def mass_impl():
  return _impl("MASS_IMPL", MASS_IMPL)


def _switch(name, value, on_gpu=True, elsewhere=None):
  """An on / off setting's value: as set, or by default `on_gpu` on a GPU and `elsewhere`
  (None: the opposite) elsewhere."""
  if value not in (None, True, False):
    raise ValueError(f"planning.{name} must be None, True or False; got {value!r}")
  if value is not None:
    return value
  if _on_gpu():
    return on_gpu
  return (not on_gpu) if elsewhere is None else elsewhere


def merge_lists():
  return _switch("MERGE_LISTS", MERGE_LISTS)


def skip_empty_topk():
  return _switch("SKIP_EMPTY_TOPK", SKIP_EMPTY_TOPK, on_gpu=False)


def skip_empty_work():
  return _switch("SKIP_EMPTY_WORK", SKIP_EMPTY_WORK, on_gpu=True, elsewhere=True)


def split_rows():
  return _switch("SPLIT_ROWS", SPLIT_ROWS)


def score_impl():
  return _impl("SCORE_IMPL", SCORE_IMPL)


def cols_impl():
  return _impl("COLS_IMPL", COLS_IMPL)


def score_dtype():
  """The dtype of the pooled scores and of the pooled means they multiply (`SCORE_DTYPE`)."""
  if SCORE_DTYPE is not None and SCORE_DTYPE not in SCORE_DTYPES:
    raise ValueError(
      f"planning.SCORE_DTYPE must be None or one of {SCORE_DTYPES}; got {SCORE_DTYPE!r}"
    )
  return SCORE_DTYPE or ("bfloat16" if _on_gpu() else "float32")


def score_topk_impl(k=None):
  """The pooled-score picks' implementation ("pallas" or "xla"); with `k`, for a component
  with that top k (`SCORE_TOPK_MAX_K`)."""
  mk = SCORE_TOPK_MAX_K
  if not (isinstance(mk, int) and mk >= 0):
    raise ValueError(f"planning.SCORE_TOPK_MAX_K must be an int >= 0; got {mk!r}")
  impl = _impl("SCORE_TOPK_IMPL", SCORE_TOPK_IMPL)
  if SCORE_TOPK_IMPL is None and score_impl() != "pallas":
    impl = "xla"  # (the default follows the score kernel)
  if impl == "pallas" and score_impl() != "pallas":
    raise ValueError(
      "planning.SCORE_TOPK_IMPL='pallas' needs SCORE_IMPL 'pallas' (the dense planner's "
      f"scores from the same dot); SCORE_IMPL is {score_impl()!r}"
    )
  if impl == "pallas" and k is not None and 0 < mk < k:
    return "xla"
  return impl


def _row_top_k_mode(n_rows, n):
  """How `_row_top_k` runs rows [n_rows, n]: "tiles" (the Pallas top-k, its own tiles),
  "whole" (the Pallas top-k, one program per row, the row held whole) or "xla"
  (lax.top_k). The kernel's picks come in index order, lax.top_k's in value order."""
  if topk_impl() != "pallas":
    return "xla"
  if n_rows >= _KERNEL_MIN_ROWS:
    return "tiles"
  return "whole" if n <= _KERNEL_WHOLE_ROW else "xla"


def _row_top_k(x, k):
  """The k largest entries of each row of x [R, n] (ties to the lower index) as a set:
  (values [R, k], int32 indices [R, k]) in index order (the kernel) or value order
  (lax.top_k), as `_row_top_k_mode` says."""
  mode = _row_top_k_mode(*x.shape)
  if mode == "tiles":
    idx, vals = top_k_select(x, k, interpret=_interpret())
    return vals, idx
  if mode == "whole":
    tile = 1 << max(0, (x.shape[1] - 1).bit_length())
    idx, vals = top_k_select(x, k, tile=tile, block_rows=1, num_warps=8, interpret=_interpret())
    return vals, idx
  vals, idx = jax.lax.top_k(x, k)
  return vals, idx.astype(jnp.int32)


def sort_ints(x, axis=-1):
  """x's integers sorted along `axis`. Equal keys are equal values, so the sort need not be
  stable; a stable one (jnp.sort's) makes XLA add an index operand to break the ties."""
  return jax.lax.sort(x, dimension=axis % x.ndim, is_stable=False)


def topk_chunk(n, k):
  """The chunk C of `top_k_entries` for rows of n entries and top k (1: no chunks)."""
  k = min(k, n)
  c = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n / max(k, 1))))))
  if topk_impl() == "pallas" and n <= _KERNEL_ROW:
    c = 1  # (longer rows' chunk maxima may be chunked again: `_chunks_top_k`)
  return c


def top_k_entries(score, valid, k, axis_names=(), present=None, skip_empty=True, chunk_max=None):
  """`_top_k_entries`' picks (idx, values), as a set."""
  return _top_k_entries(score, valid, k, axis_names, present, skip_empty, chunk_max)[:2]


def _top_k_entries(score, valid, k, axis_names=(), present=None, skip_empty=True, chunk_max=None):
  """Per row, the k highest valid scores (ties to the lower index), without a top-k over
  the whole row: (idx [R, k'], values [R, k'], -inf where fewer are valid), k' = min(k, n),
  as a set (in no particular order).

  The row is cut into chunks of C; the top k chunks by their maximum (ties to the lower
  chunk) hold the row's top k (an entry outside them is beaten by the k chunks' maxima),
  so one top-k over the n / C chunk maxima and one over the k * C entries of those chunks,
  in index order, give the entries a top-k over the row gives. `valid` may be a function
  returning the mask, so that the mask is built inside the branch (fused into its first
  pass) rather than passed in as an [R, n] operand. C ~ sqrt(n / k) balances
  the two. With the Pallas top-k, rows of at most `_KERNEL_ROW` go to it whole, and
  longer rows of chunk maxima are chunked again (`_chunks_top_k`). Runs under a `lax.cond` like
  `_topk_threshold_mask` (predicate: `present`, some valid entry if None) unless
  `skip_empty` is False. `valid` None: the score is masked already (-inf); then
  `chunk_max` [R, ceil(n / C)] may give the chunk maxima (pooled_scores' kernel); then
  the score is read only in chunks whose maximum is above -inf (the kernel leaves the
  tiles without an allowed pair unwritten).

  Returns (idx, values, in_order): in_order (static) whether the picks come in index
  order (the last top-k's, `_row_top_k`, on [R, n] rows or on [R, kc * C] candidates).
  """
  n_r, n = score.shape
  k = min(k, n)
  c = topk_chunk(n, k)
  n_c = -(-n // c)
  kc = min(k, n_c)
  in_order = _row_top_k_mode(n_r, n if c == 1 else kc * c) != "xla"
  if chunk_max is not None and (valid is not None or chunk_max.shape != (n_r, n_c)):
    raise ValueError(f"top_k_entries: chunk_max needs valid None and shape {(n_r, n_c)}")

  # the mask: an [R, n] operand, a function (built inside the branch), or None (s masked)
  mask_fn = valid if callable(valid) else None
  masked = valid is None
  if (mask_fn or masked) and present is None:
    raise ValueError("top_k_entries: a mask function or a masked score needs `present`")
  if mask_fn or masked:
    valid = jnp.zeros((), bool)  # unused operand

  def run(s, ok, cmax):
    if not masked:
      s = jnp.where(mask_fn() if mask_fn else ok, s, NEG)
    if c == 1:
      vals, idx = _row_top_k(s, k)
      return idx, vals
    s = jnp.pad(s, ((0, 0), (0, n_c * c - n)), constant_values=NEG).reshape(n_r, n_c, c)
    cmax_top, chunks, in_order = _chunks_top_k(s.max(-1) if cmax is None else cmax, kc)
    if not in_order:  # [R, kc] chunks in index order (distinct: stability is moot)
      chunks, cmax_top = jax.lax.sort((chunks, cmax_top), dimension=1, num_keys=1, is_stable=False)
    cand = jnp.take_along_axis(s, chunks[:, :, None], axis=1)  # [R, kc, C]
    if cmax is not None:  # the kernel leaves chunks without an allowed pair unwritten
      cand = jnp.where(cmax_top[:, :, None] > NEG, cand, NEG)
    cand = cand.reshape(n_r, kc * c)
    vals, pos = _row_top_k(cand, k)
    idx = (chunks[:, :, None] * c + jnp.arange(c, dtype=jnp.int32)).reshape(n_r, kc * c)
    return jnp.take_along_axis(idx, pos, axis=1).astype(jnp.int32), vals

  def empty(s, ok, cmax):
    return jnp.zeros((n_r, k), jnp.int32), jnp.full((n_r, k), NEG, s.dtype)

  if not (skip_empty and skip_empty_topk()):
    return (*run(score, valid, chunk_max), in_order)
  present = _any_over(valid if present is None else present, axis_names)
  return (*jax.lax.cond(present, run, empty, score, valid, chunk_max), in_order)


def _chunks_top_k(m, k):
  """The top k of the chunk maxima m [R, n_c]: (values, indices, whether they are in
  index order), as `_row_top_k`. With the Pallas top-k, rows are chunked again
  (`top_k_entries`) unless the kernel takes them whole (`_row_top_k_mode`): its cost
  grows with the row, and a few short rows beat one long one (1M tokens: maxima of 1024
  chunks -> 256 maxima of maxima, then 128 chunk maxima). The picks of `top_k_entries`
  come in index order when its last top-k is the kernel's (the chunks are put in order)."""
  mode = _row_top_k_mode(*m.shape)
  if topk_impl() == "pallas" and mode != "whole" and topk_chunk(m.shape[1], k) > 1:
    idx, vals, in_order = _top_k_entries(m, None, k, present=jnp.asarray(True), skip_empty=False)
    return vals, idx, in_order
  vals, idx = _row_top_k(m, k)
  return vals, idx, mode != "xla"


def _masked_mean(x, w, nb):
  """Mean of x [L, H] over rows with w [L] bool, per block of L // nb rows -> [nb, H] f32.

  The masked rows zeroed and each block summed by one window reduction. On an H200, for
  two heads at 1M tokens: 0.40 ms, against 1.02 ms for a multiply-and-sum over [nb, R, H]
  (which XLA ran as two kernels) and 0.88 ms for an einsum with the 0/1 weights.
  """
  r = x.shape[0] // nb
  xm = jnp.where(w[:, None], x, 0).astype(jnp.float32)
  total = jax.lax.reduce_window(xm, 0.0, jax.lax.add, (r, 1), (r, 1), "VALID")
  count = w.reshape(nb, r).sum(1)
  return total / jnp.maximum(count, 1).astype(jnp.float32)[:, None]


# ----------------------------------------------------------------------------------------
# the per-head context: the view and its block statistics
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class HeadSource:
  """The [L, H] rows of one (batch, head) of x [B, L, N, H], left in place: the planner's
  kernels read them through the (batch, head) index, and only the XLA paths (and the
  last-query scores) slice rows out. Under the planner's vmap, b and h are the batched
  ids and x is unbatched."""

  x: jax.Array  # [B, L, N, H]
  b: jax.Array | int
  h: jax.Array | int

  @classmethod
  def of(cls, x):
    """x itself if a HeadSource, else an [L, H] array as the only head of a batch of one."""
    if isinstance(x, HeadSource):
      return x
    if x.ndim != 2:
      raise ValueError(f"planner: a head's q / k must be [L, H] or a HeadSource; got {x.shape}")
    return cls(x[None, :, None, :], 0, 0)

  @property
  def length(self):
    return self.x.shape[1]

  def index(self):
    """int32 [2]: (batch, head)."""
    return jnp.stack([jnp.asarray(self.b, jnp.int32), jnp.asarray(self.h, jnp.int32)])

  def rows(self, idx):
    """The rows idx [R] of the head: [R, H] (a gather)."""
    return self.x[self.b, idx, self.h]

  def dense(self):
    """The head's [L, H] (a copy)."""
    return self.x[self.b, :, self.h]


@dataclasses.dataclass
class HeadView:
  """Arrays of one (batch, head) in view order. L padded length, T real length."""

  q_src: HeadSource  # the head's queries in ORIGINAL order (input dtype; f32 math)
  k_src: HeadSource  # its keys, original order
  q_pos: jax.Array  # [L] original positions
  k_pos: jax.Array
  q_mod: jax.Array  # [L] modality ids (-1 for padding)
  k_mod: jax.Array
  q_rank: jax.Array  # [L] rank coordinates (see module docstring)
  k_rank: jax.Array
  k_orank: jax.Array  # [L] rank inside group in original order (sinks)
  q_perm: jax.Array | None
  k_perm: jax.Array | None
  symmetric: bool
  seq_len: int
  block_q: int
  block_k: int
  scale: float
  # "positions": a key's rank is its view index (identity, Q boundary, a grid over the
  # whole sequence); "modality": keys grouped by modality id, rank = index - group start.
  key_layout: str = "positions"
  grid_mods: tuple = ()  # modality ids whose group is grid-permuted (-1: the whole view)
  pool_tokens: int = 0  # pooled means over at most this many tokens a block (0: all)
  # [L] the modality ids in original order (-1 for padding): the same for every head of a
  # batch row, so sums over it are made once per row under vmap (`key_span`)
  mod_row: jax.Array | None = None
  # pooled means already computed in this view, by (side, selector): components sharing a
  # modality (2D boundary's pairs, Q boundary's keys) pool it once
  pooled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
  # vertical-slash estimates made before the grid permutation, by (pattern, q_mod, k_mod)
  # (`early_estimates`): `vs_estimate` returns these
  estimates: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @functools.cached_property
  def q(self):
    """[L, H] queries in view order (a copy; a gather where the view permutes them)."""
    return self.q_src.dense() if self.q_perm is None else self.q_src.rows(self.q_perm)

  @functools.cached_property
  def k(self):
    """[L, H] keys in view order."""
    return self.k_src.dense() if self.k_perm is None else self.k_src.rows(self.k_perm)

  @property
  def length(self):
    return self.q_src.length

  @property
  def n_q(self):
    return self.length // self.block_q

  @property
  def n_k(self):
    return self.length // self.block_k

  def q_ok(self, mod):
    return (self.q_pos < self.seq_len) & _mod_ok(self.q_mod, mod)

  def k_ok(self, mod):
    return (self.k_pos < self.seq_len) & _mod_ok(self.k_mod, mod)

  def has_key_span(self, k_mod):
    """Whether the keys of selector `k_mod` are one run of view indices (static)."""
    if self.key_layout == "positions":
      return k_mod is None
    return _single_id(k_mod)

  def key_span(self, k_mod):
    """(start, n): the keys of selector `k_mod` are view indices [start, start + n) with
    rank = index - start. Only where that holds (`has_key_span`: every view and selector
    the policies build for rank patterns); raises otherwise."""
    if not self.has_key_span(k_mod):
      raise ValueError(
        f"planner: keys {k_mod!r} are not one contiguous run of ranks in a "
        f"{self.key_layout!r} view; rank patterns need a single modality id (2D boundary) "
        "or every key (other layouts)"
      )
    if self.key_layout == "positions":
      return jnp.int32(0), jnp.int32(self.seq_len)
    # (counts: the same in original order as in the view's, which is per head)
    if self.mod_row is None:
      mod, real = self.k_mod, self.k_pos < self.seq_len
    else:
      mod, real = self.mod_row, jnp.arange(self.length) < self.seq_len
    start = jnp.sum(real & (mod < k_mod)).astype(jnp.int32)
    return start, jnp.sum(real & (mod == k_mod)).astype(jnp.int32)

  def sinks_scattered(self, k_mod):
    """Whether the first keys (original order) of `k_mod` are scattered (grid-permuted)."""
    return -1 in self.grid_mods or (k_mod is not None and k_mod in self.grid_mods)

  def causal_possible(self):
    """[nQ, nK] some real query of block i may see some key of block j."""
    _, qmax, _ = _block_min_max(self.q_pos, self.q_ok(None), self.n_q)
    kmin, _, _ = _block_min_max(self.k_pos, self.k_ok(None), self.n_k)
    return kmin[None, :] <= qmax[:, None]


class GroupSort(typing.NamedTuple):
  """The head-independent half of `_group_order` for one batch row: the stable sort of
  the tokens by group (one sort of L)."""

  by_group: jax.Array  # [L] int32: the original index at each group-sorted place
  g_sorted: jax.Array  # [L] the group id at each place (BIG: padding)
  orank: jax.Array  # [L] the index inside the group (original order)
  size: jax.Array  # [L] the size of the place's group


class Modality(typing.NamedTuple):
  """A batch row's modality ids [L] (padding -1) with the group sorts the views need,
  computed once per row (`modality_row`) instead of once per head and step of heads
  (the lax.scan over steps does not hoist them): by modality (Q / 2D boundary views) and
  of the whole sequence (a grid over it). None where no view needs one. The planners take
  this or the plain ids [L] (then each view sorts for itself)."""

  ids: jax.Array
  by_modality: GroupSort | None = None
  whole: GroupSort | None = None


def group_sort(pos, mod, real, axis_names=()) -> GroupSort:
  """`GroupSort` of tokens at positions pos [L] with group ids mod [L] (real [L]: not
  padding). Where every real id is in [0, GROUP_COUNT_IDS) (over `axis_names`, the vmapped
  axes, so that the test stays one branch) it is a counting sort (`_count_sort`), else a
  sort; the same arrays."""
  grp = jnp.where(real, mod, BIG).astype(jnp.int32)
  n_ids = GROUP_COUNT_IDS
  if not n_ids:
    return _sorted_groups(grp, pos)
  few = ~_any_over(real & ((mod < 0) | (mod >= n_ids)), axis_names)
  return jax.lax.cond(few, functools.partial(_count_sort, n_ids=n_ids), _sorted_groups, grp, pos)


def _sorted_groups(grp, pos) -> GroupSort:
  """`group_sort` by one sort of L."""
  n_all = pos.shape[0]
  # one stable sort keyed by the group alone (pos ascends, so ties keep original order):
  # the key as uint32 in the same order (sign bit flipped), which XLA on a GPU runs as one
  # CUB radix sort of (key, value) pairs; jnp.lexsort's two keys were a bitonic sort of
  # 24 kernels (0.12 ms of the 2D boundary's 128k plan on an H200)
  key = jax.lax.bitcast_convert_type(grp, jnp.uint32) ^ jnp.uint32(2**31)
  _, by_group = jax.lax.sort((key, pos.astype(jnp.int32)), num_keys=1, is_stable=True)
  g_sorted = grp[by_group]
  orank = _rank_in_group(g_sorted)  # in group-sorted order
  idx = jnp.arange(n_all, dtype=jnp.int32)
  start = idx - orank
  is_last = jnp.concatenate([g_sorted[1:] != g_sorted[:-1], jnp.array([True])])
  size = jax.lax.cummin(jnp.where(is_last, idx, n_all), reverse=True) - start + 1
  return GroupSort(by_group.astype(jnp.int32), g_sorted, orank, size)


def _count_sort(grp, pos, *, n_ids) -> GroupSort:
  """`group_sort` of grp [L] whose real ids are in [0, n_ids) (padding BIG) without a sort:
  each token's place is its id's offset (the tokens of lower ids) plus its rank among
  its id's tokens (a prefix count of the [n_ids + 1, L] one-hot rows, by matmuls), and
  the order is one scatter of the positions to their places. On a GPU the sort was some
  20 kernels at the head of a plan's critical path."""
  n = grp.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  bucket = jnp.minimum(grp, n_ids)  # (padding: the last bucket)
  hot = bucket[None, :] == jnp.arange(n_ids + 1, dtype=jnp.int32)[:, None]  # [C + 1, L]
  incl = _prefix_count_long(hot)  # [C + 1, L]
  count = incl[:, -1]
  offset = jnp.cumsum(count) - count  # [C + 1] the places before each bucket
  rank = jnp.take_along_axis(incl, bucket[None, :], axis=0)[0] - 1
  by_group = (
    jnp.zeros((n,), jnp.int32)
    .at[offset[bucket] + rank]
    .set(pos.astype(jnp.int32), unique_indices=True)
  )
  # the bucket at each place: the buckets that end at or before it
  b_sorted = jnp.sum(idx[:, None] >= (offset + count)[None, :n_ids], axis=1).astype(jnp.int32)
  g_sorted = jnp.where(b_sorted < n_ids, b_sorted, BIG).astype(jnp.int32)
  return GroupSort(by_group, g_sorted, idx - offset[b_sorted], count[b_sorted])


def _chunk_sums(x, dtype=jnp.bfloat16, precision=None):
  """Inclusive sums of x [R, n] along its last axis inside chunks of _CHUNK (zero-padded):
  f32 [R, C, _CHUNK], one matmul with a triangular 0/1 matrix in `dtype` (exact for 0/1
  in bf16; for integers below 2^24 in f32 at full precision)."""
  n_r, n = x.shape
  n_c = -(-n // _CHUNK)
  c = jnp.pad(x, ((0, 0), (0, n_c * _CHUNK - n))).reshape(n_r, n_c, _CHUNK)
  tri = jnp.triu(jnp.ones((_CHUNK, _CHUNK), dtype))  # tri[j, l] = j <= l
  return jnp.einsum(
    "rcj,jl->rcl", c.astype(dtype), tri, precision=precision, preferred_element_type=jnp.float32
  )


def _prefix_count_long(mask):
  """Inclusive count of True along the last axis of mask [R, n], any n: int32 [R, n].
  `_prefix_count`'s sums inside chunks of 128 (`_chunk_sums`), the chunks' counts
  prefixed the same way level by level (not by an [C, C] matmul, which grows with n^2)."""

  def prefix(x, dtype, precision):  # [R, m] -> inclusive sums along the last axis
    n_r, m = x.shape
    inner = _chunk_sums(x, dtype, precision)  # [R, C, 128]
    if inner.shape[1] > 1:
      tot = inner[:, :, -1]
      before = prefix(tot, jnp.float32, jax.lax.Precision.HIGHEST) - tot  # [R, C]
      inner = inner + before[:, :, None]
    return inner.reshape(n_r, -1)[:, :m]

  return prefix(mask, jnp.bfloat16, None).astype(jnp.int32)


def whole_sort(length, seq_len) -> GroupSort:
  """`group_sort` of one group of seq_len real tokens followed by padding (a grid over the
  whole sequence): the identity order, so no sort (at 1M tokens the sort was 48 kernels
  and 0.28 ms of grid's plan on an H200, h200_2026-12-02f)."""
  pos = jnp.arange(length, dtype=jnp.int32)
  real = pos < seq_len
  return GroupSort(
    pos,
    jnp.where(real, 0, BIG).astype(jnp.int32),
    jnp.where(real, pos, pos - seq_len),
    jnp.where(real, seq_len, length - seq_len).astype(jnp.int32),
  )


def modality_row(mod, *, seq_len, by_modality, whole, axis_names=()) -> Modality:
  """`Modality` of one batch row's ids mod [L] (L padded, T = seq_len real), with the
  sorts asked for (static bools); axis_names: the vmapped (batch) axes."""
  pos = jnp.arange(mod.shape[0], dtype=jnp.int32)
  real = pos < seq_len
  ids = jnp.where(real, mod, -1)
  return Modality(
    mod,
    group_sort(pos, ids, real, axis_names) if by_modality else None,
    whole_sort(mod.shape[0], seq_len) if whole else None,
  )


def _group_order(pos, mod, real, grid_strides, grid_all, sort=None):
  """The permutation that groups by modality (+ an optional grid permutation inside groups).

  Returns (perm [L]: original index at each view index, rank [L], orank [L]) where rank is
  the index inside the group in view order and orank the index inside the group in
  original order, both given in view order.

  One stable sort by group (`group_sort`; `sort` if given, computed once per batch row);
  a grid group of n tokens with stride S is then ordered by (orank % S, orank): the
  tokens of residue s take the places from s * (n // S) + min(s, n % S) on, so each view
  place is inverted arithmetically to the token it holds and the outputs are gathers.
  (A three-key sort was 17 of a 1M-token grid plan's 90 ms on an H200; then three
  scatters by the computed places.)
  """
  if sort is None:
    sort = group_sort(pos, mod, real)
  by_group, g_sorted, place, size = sort
  # a group keeps its run of places: view index i holds the token of rank `place` (at
  # group-sorted index i) of i's group, in the group's view order
  orank = place
  for gmod, stride in grid_strides:  # stride is a traced scalar
    in_g = (g_sorted < BIG) & ((g_sorted == gmod) if not grid_all else True)
    st = jnp.maximum(stride, 1)
    n_each, rem = size // st, size % st  # residues below rem hold n_each + 1 tokens
    head = rem * (n_each + 1)
    past = jnp.maximum(place - head, 0)
    sub = jnp.where(place < head, place // (n_each + 1), rem + past // jnp.maximum(n_each, 1))
    t = jnp.where(place < head, place % (n_each + 1), past % jnp.maximum(n_each, 1))
    orank = jnp.where(in_g, t * st + sub, orank)
  start = jnp.arange(pos.shape[0], dtype=jnp.int32) - place
  return by_group[start + orank], place, orank


def _pool_tokens(layout):
  """The tokens per block a view's pooled means read: the most its grid patterns ask
  (`Grid.pool_tokens`; 0, every token, where one asks for all or there is no grid)."""
  asked = [g.pool_tokens for _, g in layout.grid_groups]
  return 0 if not asked or 0 in asked else max(asked)


def build_view(layout, grid_strides, q, k, mod, *, seq_len, block_q, block_k, scale):
  """Builds the HeadView of one head. q, k: [L, H] or HeadSource; mod: [L] (pads
  anything) or a `Modality` (its group sorts reused)."""
  q, k = HeadSource.of(q), HeadSource.of(k)
  sorts = mod if isinstance(mod, Modality) else Modality(mod)
  mod = sorts.ids
  length = q.length
  pos = jnp.arange(length, dtype=jnp.int32)
  real = pos < seq_len
  mod = jnp.where(real, mod, -1)
  common = dict(
    seq_len=seq_len,
    block_q=block_q,
    block_k=block_k,
    scale=scale,
    key_layout="modality" if layout.group == "both" else "positions",
    grid_mods=tuple(-1 if layout.group == "none" else g for g, _ in grid_strides),
    pool_tokens=_pool_tokens(layout),
  )
  if layout.group == "none" and not grid_strides:
    return HeadView(
      q_src=q,
      k_src=k,
      q_pos=pos,
      k_pos=pos,
      q_mod=mod,
      k_mod=mod,
      q_rank=pos,
      k_rank=pos,
      k_orank=pos,
      q_perm=None,
      k_perm=None,
      symmetric=True,
      **common,
    )
  if layout.group == "none":  # grid over the whole sequence
    whole = sorts.whole if sorts.whole is not None else whole_sort(length, seq_len)
    perm, rank, orank = _group_order(pos, jnp.zeros_like(mod), real, grid_strides, True, whole)
  else:
    perm, rank, orank = _group_order(pos, mod, real, grid_strides, False, sorts.by_modality)
  if layout.group == "q":
    # queries grouped, keys in original order: ranks are original positions.
    return HeadView(
      q_src=q,
      k_src=k,
      q_pos=perm,
      k_pos=pos,
      q_mod=mod[perm],
      k_mod=mod,
      q_rank=perm,
      k_rank=pos,
      k_orank=pos,
      q_perm=perm,
      k_perm=None,
      symmetric=False,
      **common,
    )
  return HeadView(
    q_src=q,
    k_src=k,
    q_pos=perm,
    k_pos=perm,
    q_mod=mod[perm],
    k_mod=mod[perm],
    q_rank=rank,
    k_rank=rank,
    k_orank=orank,
    q_perm=perm,
    k_perm=perm,
    symmetric=True,
    mod_row=mod,
    **common,
  )


# ----------------------------------------------------------------------------------------
# online estimates from the last queries
# ----------------------------------------------------------------------------------------
def last_query_mass(
  v: HeadView, q_mod, k_mod, last_q, use_mod, base_of, max_offset=None, window=False
):
  """Attention mass of the last `last_q` real queries of q_mod (every query where
  `use_mod` is False) against the keys of k_mod, softmaxed per query.

  base_of(rows) gives each query row's diagonal base: the offset of key j is base - j.
  Returns (col [L]: mass per key, view order; slash [L]: mass per offset o >= 0). With
  the Pallas kernel (`mass_impl`) the probabilities are never written out. max_offset W
  (static, < L): only slash[:W] is wanted, and no col (None); the kernel then computes p
  only near the rows' bases (the same sums). window=True (with max_offset): each row's
  softmax is over the keys from W - 1 before the earliest row's base on, not over all
  keys, so only those keys are read (`Grid.stride_norm="window"`), by programs launched
  for about the window's tiles (`span_tiles`), not for every tile.
  """
  rows, row_ok = _last_rows(v, q_mod, last_q, use_mod)
  base = base_of(rows).astype(jnp.int32)
  kok = v.k_ok(k_mod)
  if max_offset is not None and max_offset >= v.length:
    max_offset = None
  if window and max_offset is not None:
    first = jnp.min(jnp.where(row_ok, base, BIG)) - (max_offset - 1)
    kok &= jnp.arange(v.length, dtype=jnp.int32) >= first
  if mass_impl() == "xla":
    p = _rows_probs(v, rows, row_ok, kok)
    slash = slash_sums(p, base, v.length)
    return (p.sum(0), slash) if max_offset is None else (None, slash[:max_offset])
  n_r = rows.shape[0]
  n_pad = max(16, 1 << (n_r - 1).bit_length()) - n_r  # the kernel's rows: a power of 2
  q_rows = jnp.pad(v.q_src.rows(v.q_pos[rows]), ((0, n_pad), (0, 0)))
  q_lim = jnp.pad(jnp.where(row_ok, v.q_pos[rows], -1), (0, n_pad), constant_values=-1)
  # the view indices of the keys some row may see, [lo, hi): the kernel reads only those
  # tiles (a modality group of a grouped view: the 2D boundary's text estimate reads the
  # text keys; the window's keys, up to the last row's)
  at = jnp.arange(v.length, dtype=jnp.int32)
  seen = kok & (v.k_pos <= jnp.max(q_lim))
  lo = jnp.min(jnp.where(seen, at, v.length))
  hi = jnp.maximum(jnp.max(jnp.where(seen, at, -1)) + 1, lo)
  tile = min(MASS_TILE, v.length & -v.length)
  span = range_tiles = None
  if window and max_offset is not None:  # the window's tiles, with the rows' own spread
    span = -(-(max_offset + 2 * (n_r + n_pad)) // tile) + 2
  elif max_offset is None and v.key_layout == "modality" and v.has_key_span(k_mod):
    range_tiles = max(1, v.length // tile // _mass_range_div_setting())  # (one modality's keys)
  return attention_mass(
    q_rows,
    v.k_src.x,
    jnp.where(kok, v.k_pos, BIG),
    q_lim.astype(jnp.int32),
    jnp.pad(base, (0, n_pad), constant_values=-1),
    scale=v.scale,
    perm=v.k_perm,
    index=v.k_src.index(),
    tile=tile,
    heads_inner=bool(MASS_HEADS_INNER),
    p_dtype=MASS_P_DTYPE,
    max_offset=max_offset,
    key_range=jnp.stack([lo, hi]).astype(jnp.int32),
    span_tiles=span,
    range_tiles=range_tiles,
    tile_stats=bool(MASS_TILE_STATS),
    interpret=_interpret(),
  )


def slash_sums(p, base, length):
  """Attention mass per rank offset (diagonal): [L], out[o] = sum_r p[r, base[r] - o].

  Each row reversed and shifted by a dynamic slice, then the rows summed: a pass over p.
  Entries with a negative offset (keys after the query in rank order) fall outside the
  slice. (A scatter-add by offset was the first version; on a GPU it serialised on the
  masked entries' address and cost most of a long plan.)
  """
  rev = jnp.pad(p[:, ::-1], ((0, 0), (0, length)))  # rev[r, L - 1 - j] = p[r, j]
  first = length - 1 - jnp.clip(base, -1, length - 1)  # in [0, L]; L: an all-zero slice
  rows = jax.vmap(lambda row, s0: jax.lax.dynamic_slice(row, (s0,), (length,)))(rev, first)
  return rows.sum(0)


def _stride_range(length, min_stride, max_stride, multiples):
  """(the largest candidate stride, the number of slash offsets its score reads)."""
  hi = min(max_stride, max((length - 1) // (multiples + 1), min_stride))
  return hi, hi * multiples + hi // 2 + 1


def stride_offsets(length, min_stride, max_stride, multiples=4):
  """How many of the first slash offsets `estimate_stride` reads (static): the mass
  estimate may stop there (`last_query_mass(max_offset=...)`)."""
  return _stride_range(length, min_stride, max_stride, multiples)[1]


def estimate_stride(slash, min_stride, max_stride, multiples=4, length=None):
  """The stride whose grid lines stand out most from the diagonals between them.

  score(s) = mean over m = 1..multiples of slash[m*s] - slash[m*s + s//2]. Contrasting each
  line with the half-way diagonal cancels smooth decay (a local window makes every small
  offset heavy), divisors of the true stride lose (half their lines are off the grid) and
  multiples lose (their first lines lie farther away, where mass is lower).

  slash: [L] mass per offset, or its first `stride_offsets(L, ...)` entries with
  length=L (the same stride).
  """
  length = slash.shape[0] if length is None else length
  hi, n_read = _stride_range(length, min_stride, max_stride, multiples)
  if slash.shape[0] < min(n_read, length):
    raise ValueError(f"slash has {slash.shape[0]} offsets; the estimate reads {n_read}")
  cands = jnp.arange(min_stride, hi + 1, dtype=jnp.int32)
  m = jnp.arange(1, multiples + 1, dtype=jnp.int32)
  on = cands[:, None] * m[None, :]
  off = on + cands[:, None] // 2

  def at(o):  # (o < n_read <= len(slash) where length was given)
    return jnp.where(o < length, slash[jnp.minimum(o, slash.shape[0] - 1)], 0.0)

  return cands[jnp.argmax((at(on) - at(off)).mean(-1))]


# ----------------------------------------------------------------------------------------
# block priorities of each pattern
# ----------------------------------------------------------------------------------------
def _rank_stats(v: HeadView, q_mod, k_mod):
  qmin, qmax, qany = _block_min_max(v.q_rank, v.q_ok(q_mod), v.n_q)
  kmin, kmax, kany = _block_min_max(v.k_rank, v.k_ok(k_mod), v.n_k)
  komin, _, _ = _block_min_max(v.k_orank, v.k_ok(k_mod), v.n_k)
  return qmin, qmax, qany, kmin, kmax, kany, komin


def _sink_local(v, q_mod, k_mod, sink, local):
  """[nQ, nK] the blocks of the local window and, unless the sinks are scattered (they
  are columns then: `sink_columns`), of the first `sink` keys."""
  qmin, qmax, qany, kmin, kmax, kany, komin = _rank_stats(v, q_mod, k_mod)
  pair = qany[:, None] & kany[None, :]
  local_b = (kmax[None, :] >= qmin[:, None] - local) & (kmin[None, :] <= qmax[:, None])
  if v.sinks_scattered(k_mod):
    return pair & local_b
  return pair & ((komin < sink)[None, :] | local_b)


def sink_columns(v: HeadView, k_mod, sink):
  """The first `sink` keys of k_mod (original order) as single key columns, for a group
  that a grid permutes: (cols [sink'] view indices, valid [sink']), sink' = min(sink, L).

  A grid permutation by stride S puts the first keys at the heads of the residues' runs,
  one key block apart or more: as blocks, 64 sinks took up to 64 key blocks, more than a
  grid's whole budget at long lengths (its rows kept the sinks and lost the band and the
  pooled picks). As columns they cost one key each.
  """
  ns = min(sink, v.length)
  sel = v.k_ok(k_mod) & (v.k_orank < ns)
  cols = (
    jnp.zeros((ns,), jnp.int32)
    .at[jnp.where(sel, v.k_orank, ns)]
    .set(jnp.arange(v.length, dtype=jnp.int32), mode="drop")
  )
  _, n = v.key_span(k_mod)
  return cols, jnp.arange(ns) < n


def _scattered_sink_cols(kind, pat, v: HeadView, k_mod):
  """`sink_columns` of a grid pattern in its permuted group, else empty columns."""
  if not v.sinks_scattered(k_mod):
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
  if kind != "grid":  # (no policy builds one: a_shape has no column budget)
    raise ValueError(
      f"planner: a {kind} pattern's sinks lie in a grid-permuted group; only a grid "
      "pattern may attend to a group its stride permutes"
    )
  return sink_columns(v, k_mod, pat.sink_tokens)


def scored_matrix(v: HeadView, q_mod, k_mod, chunk=0):
  """Pooled-q . pooled-k scores of the block pairs a scored pattern may pick: query blocks
  with tokens of q_mod, key blocks with tokens of k_mod, some causal pair.

  Returns (s [nQ, nK], valid, chunk maxima, present):
    the Pallas kernel (`score_impl`): s is -inf where not allowed, valid None, and with
      `chunk` > 1 the maxima [nQ, ceil(nK / chunk)] of s's chunks of columns;
    XLA: s unmasked, valid a function giving the mask [nQ, nK] (built where it is used,
      fused into that pass), maxima None.
  present: whether any pair is allowed (scalar; some query and some key block).
  """
  qp, kp, q_lim, k_lim, present = _score_inputs(v, q_mod, k_mod)
  return (*pooled_score_matrix(qp, kp, q_lim, k_lim, v.scale, chunk), present)


def _score_inputs(v: HeadView, q_mod, k_mod):
  """(pooled q [nQ, H], pooled k [nK, H] in `score_dtype()`, q_lim [nQ], k_lim [nK],
  present) of a scored component: pair (i, j) allowed iff k_lim[j] <= q_lim[i]."""
  qp, qany = _pooled(v, "q", q_mod)
  kp, kany = _pooled(v, "k", k_mod)
  _, qmax, _ = _block_min_max(v.q_pos, v.q_ok(None), v.n_q)
  kmin, _, _ = _block_min_max(v.k_pos, v.k_ok(None), v.n_k)
  # both blocks hold tokens of their modality and key block j's first key is not after
  # query block i's last query
  q_lim = jnp.where(qany, qmax, -1).astype(jnp.int32)
  k_lim = jnp.where(kany, kmin, BIG).astype(jnp.int32)
  dt = jnp.dtype(score_dtype())
  return qp.astype(dt), kp.astype(dt), q_lim, k_lim, jnp.any(qany) & jnp.any(kany)


def scored_top_k(v: HeadView, q_mod, k_mod, k, axis_names=()):
  """The k best pooled scores of each query block's allowed pairs (`scored_matrix`'s
  pairs) by one kernel that never writes the scores (`score_topk_impl` "pallas"): (idx
  [nQ, k'], values [nQ, k'], -inf where fewer are allowed), k' = min(k, nK), as a set,
  the entries `top_k_entries` picks from `scored_matrix`'s scores (the same tile, so the
  same dot). Like `top_k_entries` it sits in a `lax.cond`, skipped when no head (over
  `axis_names`) has an allowed pair; the skip gives what the kernel would (-inf, 0)."""
  qp, kp, q_lim, k_lim, present = _score_inputs(v, q_mod, k_mod)
  block_m, block_n, warps = SCORE_TILES
  k = min(k, v.n_k)

  def run(qp, kp, q_lim, k_lim):
    return pooled_top_k(
      qp,
      kp,
      q_lim,
      k_lim,
      k=k,
      scale=v.scale,
      block_m=block_m,
      block_n=max(block_n, topk_chunk(v.n_k, k)),  # (pooled_score_matrix's tile)
      num_warps=warps,
      sort_blocks=bool(SCORE_TOPK_SORT) and bool(v.grid_mods),
      interpret=_interpret(),
    )

  def empty(qp, kp, q_lim, k_lim):
    return jnp.zeros((v.n_q, k), jnp.int32), jnp.full((v.n_q, k), NEG, qp.dtype)

  if not skip_empty_topk():
    return run(qp, kp, q_lim, k_lim)
  return jax.lax.cond(_any_over(present, axis_names), run, empty, qp, kp, q_lim, k_lim)


def pooled_score_matrix(qp, kp, q_lim, k_lim, scale, chunk=0):
  """qp [nQ, H] . kp [nK, H] * scale, pair (i, j) allowed iff k_lim[j] <= q_lim[i]:
  (s, valid, chunk maxima) as `scored_matrix` returns them, by `score_impl()`."""
  if score_impl() == "pallas":
    block_m, block_n, warps = SCORE_TILES
    s, cmax = pooled_scores(
      qp,
      kp,
      q_lim,
      k_lim,
      scale=scale,
      chunk=chunk if chunk > 1 else 0,
      fill=chunk <= 1,  # with chunks, top_k_entries reads only chunks with some pair
      block_m=block_m,
      block_n=max(block_n, chunk),
      num_warps=warps,
      interpret=_interpret(),
    )
    return s, None, cmax
  # [nQ, nK] f32 sums, rounded to the inputs' dtype (as the kernel stores them)
  s = (jnp.einsum("ih,jh->ij", qp, kp, preferred_element_type=jnp.float32) * scale).astype(qp.dtype)
  return s, lambda: k_lim[None, :] <= q_lim[:, None], None


def _pooled_dtype():
  """The pooled means' dtype: `score_dtype()` from the Pallas kernel (their one use is
  the pooled scores, in that dtype; rounding there spares a conversion), f32 from XLA."""
  return jnp.dtype(score_dtype() if pool_impl() == "pallas" else jnp.float32)


def _pooled(v: HeadView, side, sel):
  """(masked block means [nb, H] (`_pooled_dtype()`), whether each block has a token
  [nb]) of one side's tokens of selector `sel`, computed once per view (`pool_all` fills
  them up front)."""
  if (side, sel) not in v.pooled:
    pool_side(v, side, [sel])
  return v.pooled[side, sel]


def _scored_selectors(components, side):
  """The selectors of one side that the scored components (block_sparse, grid) pool."""
  sels = []
  for comp in components:
    sel = comp.q_mod if side == "q" else comp.k_mod
    if comp.pattern.name in ("block_sparse", "grid") and sel not in sels:
      sels.append(sel)
  return sels


def _pool_sels(v: HeadView, side, sels):
  for i in range(0, len(sels), MAX_SELECTIONS):
    pool_side(v, side, sels[i : i + MAX_SELECTIONS])


def _optional(comp):
  """Whether a component is for modality ids a policy never names (an `OtherThan` with
  ids on either side: a 2D boundary's fallback pairs), which inputs rarely have."""
  return any(isinstance(m, OtherThan) and m.ids for m in (comp.q_mod, comp.k_mod))


def pool_all(v: HeadView, components, axis_names=()):
  """Fills v.pooled with every (side, selector) the scored components (block_sparse,
  grid) of `components` use: one pooling per side, before any branch (a mean computed
  inside a `lax.cond` branch would stay there, out of reach of the other branches).

  The selectors that only `_optional` components use (a 2D boundary's fallback pairs, for
  modality ids inputs rarely have) are pooled with the others: block_mean skips the sum
  of a selection with no row in a block. (`POOL_OPTIONAL_APART`: in a `lax.cond` of their
  own instead, zeros where none of those components has a query and a key in any head
  over `axis_names`; nothing reads them then.)
  """
  scored = [c for c in components if c.pattern.name in ("block_sparse", "grid")]
  extra = [c for c in scored if _optional(c)]
  for side in ("q", "k"):
    todo = [s for s in _scored_selectors(components, side) if (side, s) not in v.pooled]
    if not POOL_OPTIONAL_APART:
      _pool_sels(v, side, todo)
      continue
    need = _scored_selectors([c for c in scored if not _optional(c)], side)
    _pool_sels(v, side, [s for s in todo if s in need])
    rest = [s for s in todo if s not in need]
    if not rest:
      continue
    present = functools.reduce(
      jnp.logical_or, [jnp.any(v.q_ok(c.q_mod)) & jnp.any(v.k_ok(c.k_mod)) for c in extra]
    )
    nb, h = (v.n_q, v.q_src.x.shape[-1]) if side == "q" else (v.n_k, v.k_src.x.shape[-1])

    def pool(rest=rest, side=side):
      w = dataclasses.replace(v, pooled={})
      _pool_sels(w, side, rest)
      return [w.pooled[side, s] for s in rest]

    def zeros(rest=rest, nb=nb, h=h):
      return [(jnp.zeros((nb, h), _pooled_dtype()), jnp.zeros((nb,), bool)) for _ in rest]

    if skip_empty_work():
      vals = jax.lax.cond(_any_over(present, axis_names), pool, zeros)
    else:
      vals = pool()
    v.pooled.update({(side, s): val for s, val in zip(rest, vals, strict=True)})


def shared_k_selectors(layout, components):
  """The key-side selectors whose pooled means are the same for every query head of a kv
  head (the key view does not depend on the head: no grid-permuted group), or ()."""
  return () if layout.grid_groups else tuple(_scored_selectors(components, "k"))


def shared_k_pools(layout, components, k, mod, *, seq_len, block_q, block_k, scale):
  """The pooled keys of one (batch, kv head) for `shared_k_selectors`: a tuple of (means
  [nK, H] f32, any [nK]) in their order (not a dict: selectors of different types do not
  sort as a pytree's keys), for `plan_view` to reuse in each of its query heads (pooled
  per query head, a kv head's keys were read once per head of its group)."""
  sels = list(shared_k_selectors(layout, components))
  kw = dict(seq_len=seq_len, block_q=block_q, block_k=block_k, scale=scale)
  v = build_view(layout, (), k, k, mod, **kw)  # (the query side is not read)
  _pool_sels(v, "k", sels)
  return tuple(v.pooled["k", sel] for sel in sels)


def plan_view(layout, components, q, k, mod, k_pooled=None, axis_names=(), **kw):
  """A planner's view of one (batch, head) with its pooled means filled (`pool_all`);
  `k_pooled`: the head's kv head's `shared_k_pools`, if computed; axis_names: the vmapped
  axes (`pool_all`'s skip). Returns (view, aux)."""
  v, aux = head_view(layout, q, k, mod, early=early_estimates(layout, components), **kw)
  if k_pooled is not None:
    sels = shared_k_selectors(layout, components)
    v.pooled.update({("k", sel): val for sel, val in zip(sels, k_pooled, strict=True)})
  pool_all(v, components, axis_names)
  return v, aux


def pool_side(v: HeadView, side, sels):
  """Pools the tokens of each selector of `sels` on one side (`_pooled`'s entries).

  With the Pallas kernel (`pool_impl`), x is read once for all selectors, its rows
  gathered by the view's permutation inside the kernel; with XLA, the view (a gather)
  is reduced once per selector.
  """
  if side == "q":
    x, perm, nb, oks = v.q_src, v.q_perm, v.n_q, [v.q_ok(s) for s in sels]
  else:
    x, perm, nb, oks = v.k_src, v.k_perm, v.n_k, [v.k_ok(s) for s in sels]
  # the means of every e-th token of each block (`Grid.pool_tokens`: a view with a grid)
  blk, n = v.length // nb, v.pool_tokens
  e = blk // n if 0 < n < blk else 1
  take = oks if e == 1 else [ok[::e] for ok in oks]
  if e > 1:  # the view rows read: x's row at every e-th view index
    perm = (jnp.arange(v.length, dtype=jnp.int32) if perm is None else perm)[::e]
  if pool_impl() == "pallas":
    bits = sum(ok.astype(jnp.int32) << i for i, ok in enumerate(take))
    group = _pool_group_setting()  # (blocks per program, where it fits: POOL_GROUP)
    group = group if nb % group == 0 and group * (blk // e) <= _POOL_GROUP_MAX_ROWS else 1
    means = block_mean(
      x.x,
      bits,
      block=blk // e,
      n_sel=len(sels),
      rows=perm,
      index=x.index(),
      heads_inner=bool(POOL_HEADS_INNER),
      group=group,
      out_dtype=_pooled_dtype(),
      interpret=_interpret(),
      stacked=False,  # (a buffer per selection: slices of one were copies)
    )
  else:
    # (sampled: only those rows gathered, not the whole view)
    xv = (v.q if side == "q" else v.k) if e == 1 else x.rows(perm)
    means = [_masked_mean(xv, ok, nb) for ok in take]
  for i, (sel, ok) in enumerate(zip(sels, oks, strict=True)):
    v.pooled[side, sel] = (means[i], ok.reshape(nb, -1).any(-1))


def _scored(v, q_mod, k_mod, top_k, axis_names=()):
  s, valid, _, present = scored_matrix(v, q_mod, k_mod)
  valid = s > NEG if valid is None else valid()
  keep = _topk_threshold_mask(s, valid, top_k, axis_names, present)
  return jnp.where(keep, 1.0 + jax.nn.sigmoid(s.astype(jnp.float32)), NEG)


def pattern_priority(kind, pat, v: HeadView, q_mod, k_mod, causal, axis_names=()):
  """Returns (priority [nQ, nK], column candidates [V] view indices, column valid [V])."""
  no_cols = (jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool))
  if kind == "dense":
    _, _, qany, _, _, kany, _ = _rank_stats(v, q_mod, k_mod)
    return jnp.where(qany[:, None] & kany[None, :], PRI_STRUCT, NEG), *no_cols
  if kind == "a_shape":
    hit = _sink_local(v, q_mod, k_mod, pat.sink_tokens, pat.local_tokens)
    return jnp.where(hit, PRI_STRUCT, NEG), *_scattered_sink_cols(kind, pat, v, k_mod)
  if kind == "block_sparse":
    return _scored(v, q_mod, k_mod, pat.top_k_blocks, axis_names), *no_cols
  if kind == "grid":
    hit = _sink_local(v, q_mod, k_mod, pat.sink_tokens, pat.band_tokens)
    pri = jnp.where(hit, PRI_STRUCT, NEG)
    scored = _scored(v, q_mod, k_mod, pat.top_k_blocks, axis_names)
    return jnp.maximum(pri, scored), *_scattered_sink_cols(kind, pat, v, k_mod)
  if kind == "vertical_slash":
    return _vertical_slash(pat, v, q_mod, k_mod)
  raise ValueError(f"unknown pattern kind {kind!r}")


def vs_estimate(pat, v: HeadView, q_mod, k_mod):
  """The online vertical-slash estimate: (columns [V] view indices, valid [V], slash rank
  offsets [S], valid [S]); an `early_estimates` one is taken from `v.estimates`."""
  if (pat, q_mod, k_mod) in v.estimates:
    return v.estimates[pat, q_mod, k_mod]
  length = v.length
  start, _ = v.key_span(k_mod)
  col, sl = last_query_mass(v, q_mod, k_mod, pat.last_q, True, lambda rows: v.q_rank[rows] + start)
  kok = v.k_ok(k_mod)
  # vertical: column mass; the first `keep_first` keys of the group are always kept.
  vert = jnp.where(kok, col, NEG)
  vert = jnp.where(kok & (v.k_orank < pat.keep_first), jnp.inf, vert)
  vval, cols = _top_k_1d(vert, pat.vertical_size)
  # slash: diagonal mass by rank offset; the `keep_local` nearest diagonals always kept.
  sl = jnp.where(jnp.arange(length) < pat.keep_local, jnp.inf, sl)
  sval, offs = _top_k_1d(sl, pat.slash_size)
  return cols, vval > NEG, offs, sval > 0


def _top_k_1d(x, k):
  """The entries `jax.lax.top_k(x, k)` picks from a long vector, as a set (values, int32
  indices), by `top_k_entries`: a top-k sorts its whole row on a GPU, and the vertical /
  slash picks of a 1M-token plan took 8 ms each that way."""
  idx, vals = top_k_entries(x[None, :], jnp.ones((1, x.shape[0]), bool), k, skip_empty=False)
  return vals[0], idx[0]


def _vertical_slash(pat, v: HeadView, q_mod, k_mod):
  length = v.length
  cols, cols_ok, offs, offs_ok = vs_estimate(pat, v, q_mod, k_mod)
  ind = jnp.zeros((length + 1,), jnp.int32).at[offs].add(offs_ok.astype(jnp.int32))
  csum = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(ind)])
  # a slash at offset o crosses block (i, j) iff o in [qmin_i - kmax_j, qmax_i - kmin_j].
  qmin, qmax, qany, kmin, kmax, kany, _ = _rank_stats(v, q_mod, k_mod)
  lo = jnp.clip(qmin[:, None] - kmax[None, :], 0, length)
  hi = jnp.clip(qmax[:, None] - kmin[None, :], -1, length - 1)
  hit = (hi >= lo) & (csum[hi + 1] - csum[lo] > 0) & qany[:, None] & kany[None, :]
  return jnp.where(hit, PRI_STRUCT, NEG), cols, cols_ok


# ----------------------------------------------------------------------------------------
# merging components and selecting
# ----------------------------------------------------------------------------------------
def select_blocks(pri, max_blocks, axis_names=()):
  """Top `max_blocks` finite priorities per row -> (idx [nQ, MB] ascending, count [nQ]).

  Ties go to the lower block index; slots past `count` hold the lowest-index blocks of
  priority -inf, ascending (what the top-k of `_topk_rows` leaves there).

  A sort-based top-k over [nQ, nK] took 117-240 ms of a 1M-token plan on an H200
  (benchmarks/results/h200_2026-11-30/plan_trace_1m_before.json), so the usual rows take
  a sort-free path with the same result: when every row's finite entries fit, they are
  compacted in index order (`_compact`); when some row overflows with at least MB
  structural (>= PRI_STRUCT) blocks, as a grid's scattered sink blocks do, such rows keep
  their PRI_SELF blocks then their PRI_STRUCT blocks in index order (`_select_by_class`).
  Only when some row needs the order among pooled scores does the top-k run. The choice
  is one `lax.switch`; under `vmap` its index is reduced over `axis_names` (the vmapped
  axes' names) so that it stays a branch rather than becoming a select that runs every
  side.
  """
  n_fin = (pri > NEG).sum(-1)
  n_struct = (pri >= PRI_STRUCT).sum(-1)
  all_fit = jnp.all(n_fin <= max_blocks)
  by_class = jnp.all((n_fin <= max_blocks) | (n_struct >= max_blocks))
  if axis_names:
    all_fit = jax.lax.pmin(all_fit.astype(jnp.int32), axis_names) > 0
    by_class = jax.lax.pmin(by_class.astype(jnp.int32), axis_names) > 0
  # 0: every row fits (one prefix count); 1: rows fit or overflow with structural blocks
  # (three); 2: some row needs the order among pooled scores (the top-k).
  branch = jnp.where(all_fit, 0, jnp.where(by_class, 1, 2))
  return jax.lax.switch(
    branch,
    (
      lambda p, n: _compact(p > NEG, max_blocks),
      lambda p, n: _select_by_class(p, n, max_blocks),
      lambda p, n: _topk_rows(p, max_blocks),
    ),
    pri,
    n_fin,
  )


def _topk_rows(pri, max_blocks):
  n_k = pri.shape[-1]
  vals, idx = jax.lax.top_k(pri, max_blocks)
  valid = vals > NEG
  key = sort_ints(jnp.where(valid, idx, n_k + idx))
  idx = jnp.where(key >= n_k, key - n_k, key)
  return idx.astype(jnp.int32), valid.sum(-1).astype(jnp.int32)


def _prefix_count(mask):
  """Inclusive count of True along the last axis of mask [R, n]: int32 [R, n].

  Two matmuls with triangular 0/1 matrices (inside chunks of 128, then over the chunks):
  exact (0/1 inputs, integers far below 2^24 in f32) and, on a GPU, far cheaper than a
  cumsum's log-depth scan over [nQ, nK].
  """
  n_r, n = mask.shape
  inner = _chunk_sums(mask)  # [R, C, 128]
  n_c = inner.shape[1]
  ctri = jnp.triu(jnp.ones((n_c, n_c), jnp.float32), 1)  # ctri[c, d] = c < d
  # [R, C] count in the chunks before each chunk
  before = jnp.einsum("rc,cd->rd", inner[:, :, -1], ctri, precision=jax.lax.Precision.HIGHEST)
  return (inner + before[:, :, None]).reshape(n_r, -1)[:, :n].astype(jnp.int32)


def _select_by_class(pri, n_fin, max_blocks):
  """`_topk_rows` for rows whose finite entries (n_fin [nQ] of them) fit in MB or that hold
  >= MB entries of priority >= PRI_STRUCT (priorities are PRI_SELF, PRI_STRUCT, pooled
  scores below PRI_STRUCT, or -inf); other rows are not handled (select_blocks routes them
  away)."""
  fin = pri > NEG
  is_self = pri == PRI_SELF
  is_struct = pri == PRI_STRUCT
  n_fin = n_fin[:, None]
  n_self = is_self.sum(-1, keepdims=True)
  # an overflowing row keeps its first MB self blocks, then its first struct blocks.
  keep_over = (is_self & (_prefix_count(is_self) <= max_blocks)) | (
    is_struct & (_prefix_count(is_struct) <= max_blocks - n_self)
  )
  return _compact(jnp.where(n_fin <= max_blocks, fin, keep_over), max_blocks)


def _compact(keep, max_blocks):
  """Per row, the indices where `keep` [nQ, nK] holds, ascending, then the others, first
  `max_blocks` of them: (idx [nQ, MB], count of kept, at most MB)."""
  n_q, n_k = keep.shape
  incl = _prefix_count(keep)
  count = incl[:, -1]
  j = jnp.arange(n_k, dtype=jnp.int32)
  # kept entry: slot = its rank among the kept; the others follow, in index order
  # ((j + 1) - incl of them up to j). Slots >= MB are dropped.
  slot = jnp.where(keep, incl - 1, count[:, None] + j[None, :] - incl)
  slot = jnp.where(slot < max_blocks, slot, max_blocks)
  rows = jnp.broadcast_to(jnp.arange(n_q, dtype=jnp.int32)[:, None], (n_q, n_k))
  idx = (
    jnp.zeros((n_q, max_blocks), jnp.int32)
    .at[rows, slot]
    .set(jnp.broadcast_to(j, (n_q, n_k)), mode="drop", unique_indices=True)
  )
  return idx, jnp.minimum(count, max_blocks)


def select_columns(cand, cand_ok, v: HeadView, block_idx, block_count, max_cols, runs=None):
  """Per query block, the candidate keys not inside a kept block, deduplicated.

  cand, cand_ok: [nQ, V] view indices of candidate keys. `runs`: each row is ascending
  and a value fills at most `runs` adjacent entries (then the first valid entry of each
  value is kept by comparing neighbours, without sorting [nQ, V]); None: rows in any
  order (sorted here). Returns (idx [nQ, MC] ascending, count).
  """
  n_q = v.n_q
  if max_cols == 0:
    z = jnp.zeros((n_q, 0), jnp.int32)
    return z, jnp.zeros((n_q,), jnp.int32)
  _, qmax, _ = _block_min_max(v.q_pos, v.q_ok(None), n_q)
  ok = cand_ok & ~in_block_lists(block_idx, block_count, cand // v.block_k)
  ok &= v.k_pos[cand] <= qmax[:, None]
  if runs is not None:  # ascending: keep the first valid entry of each value, in order
    first = first_of_runs(cand, ok, runs)
    srt = _compact_rows(jnp.where(first, cand, BIG), first, max_cols)
  else:
    srt = sort_ints(jnp.where(ok, cand, BIG))
    dup = jnp.concatenate([jnp.zeros((n_q, 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    srt = _compact_rows(srt, ~dup & (srt < BIG), max_cols)  # distinct ones, still ascending
  if srt.shape[1] < max_cols:  # every head of a plan has the same MC
    srt = jnp.pad(srt, ((0, 0), (0, max_cols - srt.shape[1])), constant_values=BIG)
  srt = srt[:, :max_cols]
  count = (srt < BIG).sum(-1).astype(jnp.int32)
  return jnp.where(srt < BIG, srt, 0).astype(jnp.int32), count


def _compact_rows(x, keep, width):
  """The entries of x [R, V] where keep holds, in order, then BIG: [R, min(V, width)]."""
  n_r, n = x.shape
  width = min(width, n)
  # (a cumsum of a mask is a reduce-window tree on a GPU: 0.30 ms of a 128k q_boundary
  # plan for [28 x 1024, 841]; the matmul prefix count is exact and cheaper)
  slot = _prefix_count(keep) - 1
  slot = jnp.where(keep & (slot < width), slot, width)
  rows = jnp.broadcast_to(jnp.arange(n_r)[:, None], (n_r, n))
  return jnp.full((n_r, width), BIG, x.dtype).at[rows, slot].set(x, mode="drop")


def in_block_lists(block_idx, block_count, blocks):
  """[nQ, V] whether blocks[i, v] is one of block_idx[i, :block_count[i]] (ascending)."""
  mb = block_idx.shape[-1]
  lists = jnp.where(jnp.arange(mb) < block_count[:, None], block_idx, BIG)
  pos = jax.vmap(functools.partial(jnp.searchsorted, method="scan_unrolled"))(lists, blocks)
  return jnp.take_along_axis(lists, jnp.minimum(pos, mb - 1), axis=1) == blocks


def self_priority(v: HeadView):
  """[nQ, nK] PRI_SELF on the key blocks that hold each query's own token (symmetric views)."""
  n_q, n_k = v.n_q, v.n_k
  i = jnp.arange(n_q)[:, None]
  j = jnp.arange(n_k)[None, :]
  lo = (i * v.block_q) // v.block_k
  hi = ((i + 1) * v.block_q - 1) // v.block_k
  return jnp.where((j >= lo) & (j <= hi), PRI_SELF, NEG)


def early_estimates(layout, components):
  """The (pattern, q_mod, k_mod) of the vertical-slash components whose estimate is the
  same in the view before the grid permutation (`head_view`'s pre-view) as after it: in
  a view grouped by modality on both sides (the 2D boundary, the one layout with grid
  groups and rank patterns), the pairs of one modality id that no grid permutes. Their
  rows, keys and ranks are the same view indices in both views, so the numbers are too."""
  grid = {g for g, _ in layout.grid_groups}
  if not grid or layout.group != "both":
    return ()

  def plain(m):  # one modality id, not grid-permuted
    return _single_id(m) and m not in grid

  return tuple(
    (c.pattern, c.q_mod, c.k_mod)
    for c in components
    if c.pattern.name == "vertical_slash" and plain(c.q_mod) and plain(c.k_mod)
  )


def head_view(layout, q, k, mod, *, seq_len, block_q, block_k, scale, early=()):
  """The view of one (batch, head): grid strides estimated in the grouped (not yet
  grid-permuted) view, then the permuted view. q, k: [L, H] (any float dtype) or
  HeadSource; mod: [L]. early: `early_estimates`, made in the grouped view too, so they
  do not wait for the strides (with concurrent scheduling on a GPU the two estimates'
  small kernels overlap: each alone leaves most of the GPU idle).

  Returns (HeadView, aux dict of the estimated strides)."""
  q, k = HeadSource.of(q), HeadSource.of(k)
  kw = dict(seq_len=seq_len, block_q=block_q, block_k=block_k, scale=scale)
  strides = []
  aux = {}
  made = {}
  if layout.grid_groups:
    pre = build_view(Layout(layout.group), (), q, k, mod, **kw)
    for pat, qm, km in early:
      made[pat, qm, km] = vs_estimate(pat, pre, qm, km)
    for gmod, gpat in layout.grid_groups:
      if gpat.stride > 0:
        stride = jnp.int32(gpat.stride)
      else:
        # whole-sequence grid: the last queries of `gpat.modality` (vision) if there are
        # any, against every key; a modality group: its own last queries and keys.
        if gmod >= 0:
          gm, km = gmod, gmod
        else:
          has = jnp.any(pre.q_ok(gpat.modality)) if gpat.modality >= 0 else False
          gm, km = (gpat.modality if gpat.modality >= 0 else None), None
        # offsets in ORIGINAL rank inside the group (text between frames removed): in the
        # view before the grid permutation a key's original rank is its rank.
        start, _ = pre.key_span(km)
        _, slash = last_query_mass(
          pre,
          gm,
          km,
          gpat.last_q,
          has if gmod < 0 else True,
          lambda rows, pre=pre, start=start: _orank_of(pre, rows) + start,
          max_offset=stride_offsets(pre.length, gpat.min_stride, gpat.max_stride),
          window=gpat.stride_norm == "window",
        )
        stride = estimate_stride(slash, gpat.min_stride, gpat.max_stride, length=pre.length)
      strides.append((gmod, stride))
      aux["stride" if gmod < 0 else f"stride_{gmod}"] = stride
  v = build_view(layout, tuple(strides), q, k, mod, **kw)
  v.estimates.update(made)
  return v, aux


def vertical_candidates(v: HeadView, q_mod, cols, cols_ok):
  """A component's vertical columns, the same for every query block: (cols [V], valid
  [V], query blocks they serve [nQ])."""
  _, _, qany = _block_min_max(v.q_pos, v.q_ok(q_mod), v.n_q)
  return cols, cols_ok, qany


def count_sorted(rows, x, side):
  """Per row, how many entries of rows [R, n] (each ascending) lie below x [R, m] (side
  "left") or at most x ("right"): [R, m] int32, a branchless binary search (unrolled).

  jnp.searchsorted under vmap gathers through indices that carry an iota of the batch
  axes, which XLA constant-folded into literals of [B, heads, R, m, 2] (88 MB for a 128k
  plan of 28 heads, 2 s of compile time); take_along_axis batches its gather instead.
  """
  n = rows.shape[1]
  lo = jnp.zeros(x.shape, jnp.int32)
  if n == 0:
    return lo
  step = 1 << (n.bit_length() - 1)
  first = True
  while step:
    probe = lo + step  # is rows[probe - 1] still before x?
    if first:  # the same probe everywhere: a slice (a gather by constant indices is folded)
      val = rows[:, step - 1 : step]
    else:
      val = jnp.take_along_axis(rows, jnp.minimum(probe, n) - 1, axis=1)
    before = val < x if side == "left" else val <= x
    lo = jnp.where((probe <= n) & before, probe, lo)
    step >>= 1
    first = False
  return lo


def first_of_runs(x, valid, runs):
  """[R, n] whether each entry is valid and the first valid one of its value, for rows of
  x ascending in which a value fills at most `runs` adjacent entries (so an earlier
  entry of the same value is at most runs - 1 back): neighbour comparisons, no sort."""
  first = valid
  for d in range(1, runs):
    back = (x[:, d:] == x[:, :-d]) & valid[:, :-d]  # a valid entry of the same value d back
    first = first & ~jnp.pad(back, ((0, 0), (d, 0)))
  return first


def merge_rows(a, a_val, b, b_val, val_fill):
  """Rows of a [R, nA] and b [R, nB] (each ascending) merged into one ascending row, a's
  entry first on ties, with a value carried along each entry: (x [R, nA + nB], values).
  Each entry's place is its index plus the count of the other row's entries before it
  (unrolled binary searches), instead of a sort."""
  n_r, n_a = a.shape
  n_b = b.shape[1]
  at_a = jnp.arange(n_a) + count_sorted(b, a, "left")
  at_b = jnp.arange(n_b) + count_sorted(a, b, "right")
  rows = jnp.arange(n_r)[:, None]
  out = []
  for xa, xb, fill in ((a, b, BIG), (a_val, b_val, val_fill)):
    x = jnp.full((n_r, n_a + n_b), fill, xa.dtype)
    x = x.at[rows, at_a].set(xa, unique_indices=True).at[rows, at_b].set(xb, unique_indices=True)
    out.append(x)
  return tuple(out)


def finish_plan(v: HeadView, cands, block_idx, block_count, max_cols, aux):
  """Columns (plus each query block's own tokens in a query-only view) and the plan dict.

  cands: list of (cols [V], valid [V], query blocks [nQ]) of the components' vertical
  lines (`vertical_candidates`). Their union is sorted once per head, not per query
  block. With `cols_impl()` "pallas" one kernel takes each query block's columns from
  that list (`pallas_kernels.col_select`); in XLA a query-only view's own tokens (a
  short list per query block) are merged in, each value then in at most
  `len(cands) + 1` adjacent entries of a row, and `select_columns` keeps them.
  """
  plan = dict(
    block_idx=block_idx, block_count=block_count, q_perm=v.q_perm, k_perm=v.k_perm, aux=aux
  )
  if cols_impl() == "pallas" and max_cols > 0:
    plan["col_idx"], plan["col_count"] = _columns_by_kernel(
      v, cands, block_idx, block_count, max_cols
    )
    return plan
  if cands:
    vals = jnp.concatenate([c for c, _, _ in cands])
    ok = jnp.concatenate([rows[:, None] & c_ok[None, :] for _, c_ok, rows in cands], axis=1)
    order = jnp.argsort(vals, stable=True)
    a, a_ok = vals[order].astype(jnp.int32), ok[:, order]
  else:
    a, a_ok = jnp.zeros((0,), jnp.int32), jnp.zeros((v.n_q, 0), bool)
  cand, cand_ok = jnp.broadcast_to(a, (v.n_q, a.shape[0])), a_ok
  runs = max(1, len(cands))
  if not v.symmetric:
    # query-only permutation: each query block gets its own tokens as columns.
    own, own_ok = _own_tokens(v)
    if merge_lists():
      own, own_ok = jax.lax.sort((own, own_ok), dimension=1, num_keys=1)
      cand, cand_ok = merge_rows(cand, cand_ok, own, own_ok, False)
      runs = len(cands) + 1
    else:  # one sort per row (select_columns)
      cand = jnp.concatenate([cand, own], axis=1)
      cand_ok = jnp.concatenate([cand_ok, own_ok], axis=1)
      runs = None
  plan["col_idx"], plan["col_count"] = select_columns(
    cand, cand_ok, v, block_idx, block_count, max_cols, runs=runs
  )
  return plan


def _own_tokens(v: HeadView):
  """A query-only view's own tokens per query block as key indices (keys keep the
  original order): ([nQ, block_q] int32, real [nQ, block_q]); padding is clipped."""
  qself = v.q_pos.reshape(v.n_q, v.block_q)
  return jnp.minimum(qself, v.length - 1).astype(jnp.int32), qself < v.seq_len


def _columns_by_kernel(v: HeadView, cands, block_idx, block_count, max_cols):
  """`finish_plan`'s columns by the col_select kernel: the components' columns as one
  ascending list whose entries carry their component as a bit, offered to the query
  blocks each component serves; a query-only view's own tokens per query block."""
  if len(cands) > 31:
    raise ValueError(f"at most 31 components with vertical lines per head, got {len(cands)}")
  z = jnp.zeros((0,), jnp.int32)
  vals = jnp.concatenate([z] + [c.astype(jnp.int32) for c, _, _ in cands])
  bits = jnp.concatenate(
    [z] + [jnp.where(ok, 1 << i, 0).astype(jnp.int32) for i, (_, ok, _) in enumerate(cands)]
  )
  row_bits = jnp.zeros((v.n_q,), jnp.int32)
  for i, (_, _, rows) in enumerate(cands):
    row_bits |= jnp.where(rows, 1 << i, 0).astype(jnp.int32)
  order = jnp.argsort(vals, stable=True)
  cand, bits = vals[order], bits[order]
  cand_lim = v.k_pos[jnp.clip(cand, 0, v.length - 1)].astype(jnp.int32)
  _, qmax, _ = _block_min_max(v.q_pos, v.q_ok(None), v.n_q)
  own = {}
  if not v.symmetric:  # query-only permutation: each query block gets its own tokens
    mine, mine_ok = _own_tokens(v)
    own = dict(own=mine, own_ok=mine_ok, own_lim=v.k_pos[mine].astype(jnp.int32))
  return col_select(
    cand,
    bits,
    cand_lim,
    row_bits,
    qmax.astype(jnp.int32),
    block_idx.astype(jnp.int32),
    block_count.astype(jnp.int32),
    block_k=v.block_k,
    max_cols=max_cols,
    chunk=COLS_TILES[0],
    num_warps=COLS_TILES[1],
    interpret=_interpret(),
    **own,
  )


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
  """The reference planner: plan of one (batch, head) from dense [nQ, nK] priorities.

  q, k: [L, H]; mod: [L]. Returns a dict of arrays. axis_names: the names of the axes
  this function is vmapped over, if any (see `select_blocks`). k_pooled: the kv head's
  `shared_k_pools`, or None. `planning_lists.head_plan` builds the same plan from
  per-block candidate lists.
  """
  kw = dict(seq_len=seq_len, block_q=block_q, block_k=block_k, scale=scale)
  v, aux = plan_view(layout, components, q, k, mod, k_pooled, axis_names, **kw)
  # component priorities, merged by max on the pairs each one owns.
  causal = v.causal_possible()
  pri = jnp.full((v.n_q, v.n_k), NEG)
  cands = []
  for comp in components:
    kind = comp.pattern.name
    cp, cols, cols_ok = pattern_priority(
      kind, comp.pattern, v, comp.q_mod, comp.k_mod, causal, axis_names
    )
    pri = jnp.maximum(pri, cp)
    if cols.shape[0]:
      cands.append(vertical_candidates(v, comp.q_mod, cols, cols_ok))
  if v.symmetric:
    pri = jnp.maximum(pri, self_priority(v))
  pri = jnp.where(causal, pri, NEG)
  block_idx, block_count = select_blocks(pri, max_blocks, axis_names)
  return finish_plan(v, cands, block_idx, block_count, max_cols, aux)


def _last_rows(v: HeadView, q_mod, last_q, use_mod):
  """The view rows of the last `last_q` real queries of q_mod (of any modality where
  `use_mod` is False), latest first, and whether each is one ([R] each)."""
  last_q = min(last_q, v.length)
  qok = jnp.where(use_mod, v.q_ok(q_mod), v.q_ok(None))
  pos, rows = _top_k_1d(jnp.where(qok, v.q_pos, -1).astype(jnp.float32), last_q)
  # latest first (the rows' order fixes the order of the float sums over them)
  rows = rows[jnp.argsort(-pos, stable=True)]
  return rows, qok[rows]


def _rows_probs(v: HeadView, rows, row_ok, kok):
  """Softmax p [R, L] of the query rows against the keys where kok [L] (causal by
  original positions; rows not row_ok get 0)."""
  f32 = jnp.float32
  # (the keys in view order: scores in original order gathered into view order by the
  # softmax were 10x slower, that gather's reads being scattered)
  # [last_q, H] x [L, H] -> [last_q, L]
  qr = v.q_src.rows(v.q_pos[rows]).astype(f32)
  s = jnp.einsum("qh,kh->qk", qr, v.k.astype(f32)) * v.scale
  allowed = (v.k_pos[None, :] <= v.q_pos[rows][:, None]) & row_ok[:, None]
  allowed &= kok[None, :]
  return _softmax_where(s, allowed)


def _softmax_where(s, allowed):
  s = jnp.where(allowed, s, NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


def _orank_of(v: HeadView, rows):
  """Original-order rank inside the group of view queries `rows` (symmetric or q views)."""
  if v.symmetric:
    return v.k_orank[rows]  # queries and keys share the view in symmetric layouts
  return v.q_pos[rows]


def padded_length(seq_len, block_q, block_k):
  m = block_q * block_k // math.gcd(block_q, block_k)
  return -(-seq_len // m) * m
