"""The candidate-list planner (the default) against the dense reference planner, and its
pieces against plain numpy."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import planning, planning_lists
from mmjax import policies as P
from tests import helpers
from tests.test_policies import CASES, NAMES, _policy

# a grid whose 32 sink tokens scatter over the permuted keys (rows overflow the bound)
GRID_1K = (1, 1024, 2, 1, 32, jnp.float32, "vision", 16, 16)


def assert_same_plan(a, b):
  """Plans equal; block lists compared up to their counts (later slots are unspecified)."""
  np.testing.assert_array_equal(np.asarray(a.block_count), np.asarray(b.block_count))
  used = np.arange(a.block_idx.shape[-1]) < np.asarray(a.block_count)[..., None]
  np.testing.assert_array_equal(
    np.where(used, np.asarray(a.block_idx), -1), np.where(used, np.asarray(b.block_idx), -1)
  )
  for f in ("col_idx", "col_count", "q_perm", "k_perm"):
    x, y = getattr(a, f), getattr(b, f)
    assert (x is None) == (y is None), f
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f)
  assert sorted(a.aux) == sorted(b.aux)
  for key in a.aux:
    np.testing.assert_array_equal(np.asarray(a.aux[key]), np.asarray(b.aux[key]))


def _plans(pol, q, k, mod):
  return pol.plan(q, k, mod, planner="lists"), pol.plan(q, k, mod, planner="dense")


@pytest.mark.parametrize("name", NAMES)
def test_lists_planner_equals_dense(name):
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(21, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  a, d = _plans(pol, q, k, mod)
  assert int(np.asarray(a.block_count).sum()) > 0
  assert_same_plan(a, d)


@pytest.mark.parametrize("name", ["a_shape", "vertical_slash", "q_boundary", "2d_boundary"])
def test_lists_planner_equals_dense_bf16_and_full_budget(name):
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["vision_bf16_bq32"]
  q, k, _, mod = helpers.random_inputs(22, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  assert_same_plan(*_plans(pol, q, k, mod))
  assert_same_plan(*_plans(pol.full_budget(t), q, k, mod))


@pytest.mark.parametrize("name", ["grid", "2d_boundary"])
def test_lists_planner_equals_dense_scattered_sinks(name):
  b, t, n, kh, h, dtype, modk, bq, bk = GRID_1K
  q, k, _, mod = helpers.random_inputs(23, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  if name == "grid":
    pol = dataclasses.replace(pol, stride=32, sink_tokens=32)
  a, d = _plans(pol, q, k, mod)
  assert_same_plan(a, d)
  if name == "grid":  # the scattered sinks are columns, and each row has every one it sees
    bq, bk = a.block_q, a.block_k
    kp, qp = np.asarray(a.k_perm), np.asarray(a.q_perm)
    bi, bc = np.asarray(a.block_idx), np.asarray(a.block_count)
    ci, cc = np.asarray(a.col_idx), np.asarray(a.col_count)
    assert a.max_cols == pol.sink_tokens and cc.max() > 0
    for h in range(n):
      sinks = np.flatnonzero(kp[0, h] < pol.sink_tokens)
      for i in range(t // bq):
        keys = {int(x) for x in ci[0, h, i, : cc[0, h, i]]}
        keys |= {j for blk in bi[0, h, i, : bc[0, h, i]] for j in range(blk * bk, blk * bk + bk)}
        qmax = qp[0, h, i * bq : (i + 1) * bq].max()
        assert {int(j) for j in sinks if kp[0, h, j] <= qmax} <= keys


@pytest.mark.parametrize("name", ["grid", "2d_boundary"])
def test_sampled_pooled_means_in_both_planners(name):
  """Grid.pool_tokens=16 with blocks 64 x 32 (every 4th query and 2nd key of a block
  pooled): both planners give the same plan, and it is not the plan of full means."""
  b, t, n, kh, h, dtype, modk, _, _ = GRID_1K
  q, k, _, mod = helpers.random_inputs(25, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, 64, 32)

  def with_pool(n_tokens):
    if name == "grid":
      return dataclasses.replace(pol, pool_tokens=n_tokens, top_k_blocks=4)
    pats = tuple(
      (
        pair,
        dataclasses.replace(p, pool_tokens=n_tokens, top_k_blocks=4) if p.name == "grid" else p,
      )
      for pair, p in pol.patterns
    )
    return dataclasses.replace(pol, patterns=pats)

  a, d = _plans(with_pool(16), q, k, mod)
  assert_same_plan(a, d)
  full, _ = _plans(with_pool(0), q, k, mod)
  assert not np.array_equal(np.asarray(a.block_idx), np.asarray(full.block_idx))


def test_lists_planner_equals_dense_q_view_overflow():
  """Q boundary over long text runs between vision runs: a vision query block spans many
  original positions, its local window overflows the static bound, and the union is cut
  at max_blocks (the reference keeps its structural blocks in index order)."""
  t, bq, bk = 1024, 16, 16
  q, k, _, _ = helpers.random_inputs(24, 1, t, 2, 1, 32, jnp.float32, "text")
  mod = jnp.asarray((np.arange(t) % 40 == 0).astype(np.int32))[None]  # 1 vision in 40
  ash = P.get("a_shape", sink_tokens=16, local_tokens=64, block_q=bq, block_k=bk)
  pol = P.get("q_boundary", patterns={1: ash}, default=ash, block_q=bq, block_k=bk)
  a, d = _plans(pol, q, k, mod)
  assert int(np.asarray(a.block_count).max()) == a.block_idx.shape[-1]
  assert_same_plan(a, d)


def test_planner_argument_is_checked():
  q, k, _, mod = helpers.random_inputs(1, 1, 64, 2, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="planner must be one of"):
    P.get("a_shape").plan(q, k, mod, planner="sorted")


@pytest.mark.parametrize("n,k", [(1, 1), (37, 5), (300, 7), (1000, 32), (64, 64)])
def test_top_k_entries_equals_top_k(n, k):
  """Same entries and order as lax.top_k (the CPU's default top-k), with ties (values
  from a small set), invalid entries and rows with fewer than k valid ones."""
  rng = np.random.default_rng(n * 100 + k)
  s = jnp.asarray(rng.integers(0, 6, (9, n)).astype(np.float32))
  valid = jnp.asarray(rng.random((9, n)) < np.linspace(0.0, 1.0, 9)[:, None])
  idx, vals = planning.top_k_entries(s, valid, k)
  want_vals, want_idx = jax.lax.top_k(jnp.where(valid, s, -jnp.inf), min(k, n))
  np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))


@pytest.fixture
def pallas_topk(monkeypatch):
  """The planner's top-k through the Pallas kernel (interpret mode on the CPU)."""
  monkeypatch.setattr(planning, "TOPK_IMPL", "pallas")
  monkeypatch.setattr(planning, "_KERNEL_MIN_ROWS", 1)  # small tests have few rows


@pytest.mark.parametrize("kernel_row", [4096, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 5), (300, 7), (1000, 32), (64, 64)])
def test_top_k_entries_kernel_picks_the_same_set(n, k, kernel_row, pallas_topk, monkeypatch):
  """With the Pallas top-k (whole rows, or chunked rows: kernel_row 64) the entries are
  lax.top_k's, in index order."""
  monkeypatch.setattr(planning, "_KERNEL_ROW", kernel_row)
  rng = np.random.default_rng(n * 100 + k)
  s = jnp.asarray(rng.integers(0, 6, (9, n)).astype(np.float32))
  valid = jnp.asarray(rng.random((9, n)) < np.linspace(0.0, 1.0, 9)[:, None])
  idx, vals = planning.top_k_entries(s, valid, k)
  want_vals, want_idx = jax.lax.top_k(jnp.where(valid, s, -jnp.inf), min(k, n))
  order = np.argsort(np.asarray(want_idx), axis=1)
  np.testing.assert_array_equal(np.asarray(idx), np.take_along_axis(np.asarray(want_idx), order, 1))
  np.testing.assert_array_equal(
    np.asarray(vals), np.take_along_axis(np.asarray(want_vals), order, 1)
  )


@pytest.mark.parametrize("whole_row", [4096, 64])
@pytest.mark.parametrize("n,k", [(37, 5), (300, 7), (1000, 32)])
def test_top_k_entries_few_rows_picks_the_same_set(n, k, whole_row, monkeypatch):
  """Calls of fewer than _KERNEL_MIN_ROWS rows with the Pallas top-k: rows up to
  _KERNEL_WHOLE_ROW go to the kernel whole (one program per row), longer ones are chunked
  until they fit or left to lax.top_k (whole_row 64); the entries are lax.top_k's, in
  index order where the last top-k is the kernel's."""
  monkeypatch.setattr(planning, "TOPK_IMPL", "pallas")
  monkeypatch.setattr(planning, "_KERNEL_MIN_ROWS", 10)  # (9 rows: fewer)
  monkeypatch.setattr(planning, "_KERNEL_WHOLE_ROW", whole_row)
  monkeypatch.setattr(planning, "_KERNEL_ROW", 64)
  rng = np.random.default_rng(n * 10 + k)
  s = jnp.asarray(rng.integers(0, 6, (9, n)).astype(np.float32))
  valid = jnp.asarray(rng.random((9, n)) < np.linspace(0.0, 1.0, 9)[:, None])
  idx, vals, in_order = planning._top_k_entries(s, valid, k)
  want_vals, want_idx = jax.lax.top_k(jnp.where(valid, s, -jnp.inf), min(k, n))
  got_order, order = np.argsort(np.asarray(idx), 1), np.argsort(np.asarray(want_idx), 1)
  for g, w in ((idx, want_idx), (vals, want_vals)):
    np.testing.assert_array_equal(
      np.take_along_axis(np.asarray(g), got_order, 1), np.take_along_axis(np.asarray(w), order, 1)
    )
  c = planning.topk_chunk(n, k)
  last = planning._row_top_k_mode(9, n if c == 1 else min(k, -(-n // c)) * c)
  assert in_order == (last != "xla")  # (what `_chunks_top_k` reads)
  if in_order:
    assert (np.diff(np.asarray(idx), axis=1) > 0).all()  # index order
  jaxpr = str(jax.make_jaxpr(lambda s, v: planning.top_k_entries(s, v, k))(s, valid))
  assert ("mmjax_topk_select" in jaxpr) == (n <= whole_row or c > 1)


@pytest.mark.parametrize("kernel_topk", [False, True])
def test_top_k_entries_reads_only_written_chunks(kernel_topk, monkeypatch):
  """Pooled scores from the kernel with tiles skipped (fill=False: their scores unwritten,
  their chunk maxima -inf): the same top-k as from the whole masked matrix, for rows with
  fewer allowed pairs than k (unwritten chunks are picked there) and a band of query
  blocks without any."""
  from pallas_kernels.pooled_scores import pooled_scores

  if kernel_topk:
    monkeypatch.setattr(planning, "TOPK_IMPL", "pallas")
    monkeypatch.setattr(planning, "_KERNEL_MIN_ROWS", 1)
  rng = np.random.default_rng(8)
  monkeypatch.setattr(planning, "_KERNEL_ROW", 64)  # the kernel takes chunked rows
  n_q, n_k, k = 64, 256, 40
  chunk = planning.topk_chunk(n_k, k)
  assert chunk > 1
  qp = jnp.asarray(rng.standard_normal((n_q, 16)), jnp.float32)
  kp = jnp.asarray(rng.standard_normal((n_k, 16)), jnp.float32)
  q_lim = jnp.asarray(np.where((np.arange(n_q) // 8) == 3, -1, np.arange(n_q) * 4 + 3), jnp.int32)
  k_lim = jnp.arange(n_k, dtype=jnp.int32)
  kw = dict(scale=0.3, chunk=chunk, block_m=16, block_n=32, interpret=True)
  s, cmax = pooled_scores(qp, kp, q_lim, k_lim, fill=False, **kw)
  s_full, _ = pooled_scores(qp, kp, q_lim, k_lim, **kw)
  present = jnp.asarray(True)
  got = planning.top_k_entries(s, None, k, present=present, chunk_max=cmax)
  want = planning.top_k_entries(s_full, None, k, present=present)
  order_g, order_w = np.argsort(np.asarray(got[0]), 1), np.argsort(np.asarray(want[0]), 1)
  for g, w in zip(got, want, strict=True):  # the same (index, value) sets
    g = np.take_along_axis(np.asarray(g), order_g, 1)
    np.testing.assert_array_equal(g, np.take_along_axis(np.asarray(w), order_w, 1))


SCORED = ("block_sparse", "grid", "q_boundary", "2d_boundary", "mminference")
ESTIMATED = ("vertical_slash", "grid", "q_boundary", "2d_boundary", "mminference")
# The tests of a setting that must leave the plan alone run each policy alone, not the
# mminference table of these tests: its heads (a_shape, grid, dense, block_sparse) are
# policies run alone, and `test_plans_with_the_planner_kernels_are_the_same` runs the
# table with every GPU setting at once (2026-12-03: about 100 s of CI time saved).
SCORED_ALONE = tuple(n for n in SCORED if n != "mminference")
# each planner kernel: (its setting, the pallas_call's name, the policies that use it)
PLANNER_KERNELS = (
  ("TOPK_IMPL", "mmjax_topk_select", tuple(n for n in NAMES if n not in ("a_shape", "dense"))),
  ("POOL_IMPL", "mmjax_block_mean", SCORED),
  ("MASS_IMPL", "mmjax_attn_mass", ESTIMATED),
  ("SCORE_IMPL", "mmjax_pooled_scores", SCORED),
  # (q_boundary's query blocks take their own tokens as columns, a grid's its scattered
  # sinks; the mminference table of these tests has a grid head)
  ("COLS_IMPL", "mmjax_col_select", ESTIMATED),
)


@pytest.mark.parametrize("name", NAMES)
def test_plans_with_the_planner_kernels_are_the_same(name, monkeypatch):
  """The planner as on a GPU (its Pallas kernels in interpret mode, candidate lists merged
  rather than sorted) gives the CPU's plan (XLA, sorts): the
  top-k (index order; every row chunked, nK = 13 > 8), the block means (every selector
  of a side at once, rows gathered by the permutation), the last-query masses (no [R, L]
  probabilities written), the pooled scores (masked in the kernel, chunk maxima from the
  tile), the columns (one kernel per query block over the shared column list). Random
  inputs: no near-ties that the order of the f32 sums could break
  differently. Each kernel is traced exactly by the policies that use it."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(25, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  for setting, _, _ in PLANNER_KERNELS:
    monkeypatch.setattr(planning, setting, "xla")
  # (the pooled scores and their top-k as two kernels, also on a GPU, where pooled_topk
  # would replace both: its own test below)
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "xla")
  monkeypatch.setattr(planning, "MERGE_LISTS", False)
  want = pol.plan(q, k, mod)
  for setting, _, _ in PLANNER_KERNELS:
    monkeypatch.setattr(planning, setting, "pallas")
  monkeypatch.setattr(planning, "MERGE_LISTS", True)  # the GPU's merges instead of sorts
  monkeypatch.setattr(planning, "_KERNEL_ROW", 8)
  monkeypatch.setattr(planning, "_KERNEL_MIN_ROWS", 1)
  got = pol.plan(q, k, mod)  # a new trace: the settings are part of plan's jit key
  jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  for _, kernel, users in PLANNER_KERNELS:
    assert (kernel in jaxpr) == (name in users), kernel
  assert_same_plan(got, want)
  if name in SCORED:  # the reference planner reads the same kernel scores
    assert_same_plan(pol.plan(q, k, mod, planner="dense"), got)


def _two_d_case(seed):
  """(2d_boundary policy, q, k, mod) on the b2_gqa_interleaved_f32 case's random inputs."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(seed, b, t, n, kh, h, dtype, modk)
  return _policy("2d_boundary", n, bq, bk), q, k, mod


def test_plans_with_whole_row_top_k_are_the_same(monkeypatch):
  """The vertical-slash estimates' top-k (one row per head: fewer than _KERNEL_MIN_ROWS
  rows per call) through the Pallas top-k, rows held whole (`_row_top_k_mode`), give the
  plan of lax.top_k: a 2D boundary's (its text pair is a vertical-slash; its pooled-score
  picks take the kernel whole too)."""
  pol, q, k, mod = _two_d_case(26)
  monkeypatch.setattr(planning, "TOPK_IMPL", "xla")
  want = pol.plan(q, k, mod)
  monkeypatch.setattr(planning, "TOPK_IMPL", "pallas")
  monkeypatch.setattr(planning, "_KERNEL_MIN_ROWS", 10**6)  # every call: few rows
  got = pol.plan(q, k, mod)
  jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_topk_select" in jaxpr
  assert_same_plan(got, want)


def test_2d_boundary_with_one_pair_listed():
  """A 2D boundary naming one modality: the vision tokens' id is never named, so its
  queries and keys take `cross` (OtherThan selectors beside None in the shared pooled
  keys, which as a dict's keys did not sort as a pytree's and raised)."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(42, b, t, n, kh, h, dtype, modk)
  pols = helpers.small_policies(bq, bk)
  pol = P.get(
    "2d_boundary", patterns={(0, 0): pols["vertical_slash"]}, cross=pols["block_sparse"],
    block_q=bq, block_k=bk,
  )  # fmt: skip
  a, d = _plans(pol, q, k, mod)
  assert int(np.asarray(a.block_count).sum()) > 0
  assert_same_plan(a, d)


def _count_conds(pol, q, k, mod):
  """The lax.cond / lax.switch equations in the plan's jaxpr (nested ones included)."""
  return str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod)).count(" cond[")


def test_fallback_pairs_pooled_with_the_others_or_apart(monkeypatch):
  """A 2D boundary's pairs for ids it never names (`planning._optional`) have their
  selectors pooled with the others (block_mean skips a selection's sum where a block has
  none of its rows), or with `POOL_OPTIONAL_APART` in a lax.cond of their own, zeros where
  no head has such a pair: the same plans either way, as the optional components taken
  for required ones, on input without such ids and with id 2 tokens (where the pairs pick
  blocks), and the dense planner's; only the apart form has the conds."""
  pol, q, k, mod = _two_d_case(43)
  assert sum(planning._optional(c) for c in pol.components()) == 2
  with_2 = jnp.where((jnp.arange(mod.shape[1]) % 37 < 5)[None] & (mod == 1), 2, mod)
  for m in (mod, with_2):
    got = pol.plan(q, k, m)
    assert_same_plan(got, pol.plan(q, k, m, planner="dense"))
    conds_with = _count_conds(pol, q, k, m)
    with monkeypatch.context() as mp:
      mp.setattr(planning, "_optional", lambda c: False)
      jax.clear_caches()  # (a new trace)
      assert_same_plan(got, pol.plan(q, k, m))
    with monkeypatch.context() as mp:
      mp.setattr(planning, "POOL_OPTIONAL_APART", True)
      jax.clear_caches()
      assert_same_plan(got, pol.plan(q, k, m))
      assert _count_conds(pol, q, k, m) == conds_with + 2  # (one per side)
    jax.clear_caches()  # (the patched traces are cached under the same settings)


def test_early_vertical_slash_estimate_is_the_same(monkeypatch):
  """A 2D boundary's text pair (vertical-slash) is estimated in the view before the grid
  permutation (`planning.early_estimates`: it need not wait for the vision stride): the
  same numbers as in the permuted view, with XLA and with the attn_mass kernel over the
  text keys' range, and the same plan as estimating it late."""
  pol, q, k, mod = _two_d_case(44)
  layout, comps = pol.layout(), pol.components()
  early = planning.early_estimates(layout, comps)
  assert [(qm, km) for _, qm, km in early] == [(P.TEXT, P.TEXT)]
  assert planning.early_estimates(planning.Layout("both"), comps) == ()  # (no grid)
  t, h = q.shape[1], q.shape[3]
  kw = dict(seq_len=t, block_q=pol.block_q, block_k=pol.block_k, scale=h**-0.5)
  pad = planning.padded_length(t, pol.block_q, pol.block_k) - t
  qh, kh = (jnp.pad(x[0, :, 0], ((0, pad), (0, 0))) for x in (q, k))
  mh = jnp.pad(mod[0], (0, pad), constant_values=-1)
  for impl in ("xla", "pallas"):
    with planning.settings(mass_impl=impl):
      v, _ = planning.head_view(layout, qh, kh, mh, early=early, **kw)
      late, _ = planning.head_view(layout, qh, kh, mh, **kw)
      assert not late.estimates and len(v.estimates) == 1
      for pat, qm, km in early:
        got, want = v.estimates[pat, qm, km], planning.vs_estimate(pat, late, qm, km)
        for a, b in zip(got, want, strict=True):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=impl)
  got = pol.plan(q, k, mod)
  monkeypatch.setattr(planning, "early_estimates", lambda layout, components: ())
  jax.clear_caches()  # (a new trace)
  assert_same_plan(got, pol.plan(q, k, mod))
  jax.clear_caches()


@pytest.mark.parametrize("row_loop", [0, 3])
def test_wide_rows_window_gives_the_same_plan(row_loop, monkeypatch):
  """SPLIT_ROWS (on a GPU): a 2D boundary whose text pair's slashes (24 key blocks a row)
  are wider than the vision pair's A-shape (7) plans every row from the narrow intervals
  and a window of rows from all (`_wide_rows`). The same plans as the dense planner's for
  text rows in a window of 8 of the 32 query blocks (interleaved), in all of them (text
  only), in none (vision only), at the end (a question after the video) and in 3 (a
  window of 3: `ROW_WINDOWS`); one trace. row_loop 3 (`ROW_LOOP`): a loop over windows
  of 3 rows instead (0, 1, 3 and 11 trips here), the same plans."""
  t, bq, bk = 512, 16, 16
  pols = helpers.small_policies(bq, bk)
  pol = P.get(
    "2d_boundary", patterns={(0, 0): pols["vertical_slash"], (1, 1): pols["a_shape"]},
    cross=pols["block_sparse"], block_q=bq, block_k=bk,
  )  # fmt: skip
  q, k, _, inter = helpers.random_inputs(41, 1, t, 2, 1, 32, jnp.float32)
  mods = {
    "interleaved": inter,
    "text": jnp.zeros((1, t), jnp.int32),
    "vision": jnp.ones((1, t), jnp.int32),
    "question": jnp.asarray(np.arange(t)[None] < t - 40, jnp.int32),
    # (48 text tokens: 3 query blocks, a window of 3, not a power of two)
    "three_rows": jnp.asarray((np.arange(t)[None] < 192) | (np.arange(t)[None] >= 240), jnp.int32),
  }
  calls = []
  wide_rows = planning_lists._wide_rows

  def spy(*a, **kw):
    calls.append(1)
    return wide_rows(*a, **kw)

  monkeypatch.setattr(planning_lists, "_wide_rows", spy)
  monkeypatch.setattr(planning, "SPLIT_ROWS", True)
  monkeypatch.setattr(planning, "MERGE_LISTS", True)
  monkeypatch.setattr(planning_lists, "ROW_LOOP", row_loop)
  jax.clear_caches()  # (ROW_LOOP is not in the plan's jit key)
  for name, mod in mods.items():
    got, want = _plans(pol, q, k, mod)
    assert int(np.asarray(got.block_count).sum()) > 0, name
    assert_same_plan(got, want)
  assert len(calls) == 1  # (traced once, for every input)
  monkeypatch.setattr(planning, "SPLIT_ROWS", "yes")
  with pytest.raises(ValueError, match="SPLIT_ROWS must be None, True or False"):
    planning.kernel_settings()


@pytest.mark.parametrize("name", ("grid", "2d_boundary", "block_sparse"))
def test_pooled_means_in_groups_give_the_same_plan(name, monkeypatch):
  """POOL_GROUP 16 (the default): the pooled means of a side with a multiple of 16 blocks
  of at most 32 rows (here the keys: 16 blocks of 16) come 16 blocks per block_pool
  program, summed by a dot; the same plan as a block per program (random inputs: no
  near-ties for the order of the f32 sums to break). A bad value raises."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["vision_bf16_bq32"]
  q, k, _, mod = helpers.random_inputs(31, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, "POOL_IMPL", "pallas")
  monkeypatch.setattr(planning, "POOL_GROUP", 1)
  want = pol.plan(q, k, mod)
  groups = []
  block_mean = planning.block_mean

  def spy(*a, group=1, **kw):
    groups.append(group)
    return block_mean(*a, group=group, **kw)

  monkeypatch.setattr(planning, "block_mean", spy)
  monkeypatch.setattr(planning, "POOL_GROUP", 16)
  got = pol.plan(q, k, mod)
  assert 16 in groups and 1 in groups  # (the query side's 8 blocks: one per program)
  assert_same_plan(got, want)
  monkeypatch.setattr(planning, "POOL_GROUP", 8)
  with pytest.raises(ValueError, match="POOL_GROUP must be 1 or a power of two >= 16"):
    planning.kernel_settings()


@pytest.mark.parametrize("name", SCORED_ALONE)
def test_scores_and_picks_in_one_kernel_give_the_same_plan(name, monkeypatch):
  """SCORE_TOPK_IMPL "pallas": each component's pooled-score picks by pooled_topk (the
  scores never written) give the plan of the score kernel + top_k_entries, and the
  dense planner's; the kernel is traced exactly for the scored policies."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(28, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, "SCORE_IMPL", "pallas")
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "xla")
  want = pol.plan(q, k, mod)
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "pallas")
  got = pol.plan(q, k, mod)
  jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_pooled_topk" in jaxpr and "mmjax_pooled_scores" not in jaxpr
  assert_same_plan(got, want)
  assert_same_plan(pol.plan(q, k, mod, planner="dense"), got)
  if name in ("q_boundary", "2d_boundary"):  # (components without a pair: the skip)
    # the other way: with the kernel for every one, or with the skip (a GPU's default is
    # no skip)
    monkeypatch.setattr(planning, "SKIP_EMPTY_TOPK", not planning.skip_empty_topk())
    assert_same_plan(pol.plan(q, k, mod), got)


@pytest.mark.parametrize("name", ["grid", "2d_boundary"])
def test_picks_with_sorted_blocks_give_the_same_plan(name, monkeypatch):
  """SCORE_TOPK_SORT: in grid-permuted views pooled_topk visits each program's allowed
  keys only (blocks sorted by their limits), with the plan of the unsorted kernel."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(31, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, "SCORE_IMPL", "pallas")
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "pallas")
  calls = []  # each pooled_topk call's sort_blocks, as traced
  kernel = planning.pooled_top_k
  monkeypatch.setattr(
    planning, "pooled_top_k", lambda *a, **kw: calls.append(kw["sort_blocks"]) or kernel(*a, **kw)
  )
  jax.clear_caches()  # (another test may have traced this plan: the spy must see a trace)
  want = pol.plan(q, k, mod)
  assert calls and not any(calls)
  monkeypatch.setattr(planning, "SCORE_TOPK_SORT", True)
  calls.clear()
  got = pol.plan(q, k, mod)  # (a new trace: the setting is part of plan's jit key)
  assert any(calls)  # (the grid views' components; an mminference table's others not)
  assert_same_plan(got, want)


def test_one_kernel_only_up_to_a_top_k(monkeypatch):
  """SCORE_TOPK_MAX_K: with 2 the 2D boundary's grid pair (top 2) takes pooled_topk and
  its block_sparse pairs (top 3) the scores + top_k_entries, with the same plan; a bad
  value raises."""
  pol, q, k, mod = _two_d_case(29)
  monkeypatch.setattr(planning, "SCORE_IMPL", "pallas")
  want = pol.plan(q, k, mod)
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "pallas")
  monkeypatch.setattr(planning, "SCORE_TOPK_MAX_K", 2)
  got = pol.plan(q, k, mod)
  jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_pooled_topk" in jaxpr and "mmjax_pooled_scores" in jaxpr
  assert_same_plan(got, want)
  monkeypatch.setattr(planning, "SCORE_TOPK_MAX_K", 1)  # (no component's k)
  jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_pooled_topk" not in jaxpr
  monkeypatch.setattr(planning, "SCORE_TOPK_MAX_K", -1)
  with pytest.raises(ValueError, match="SCORE_TOPK_MAX_K must be an int >= 0"):
    planning.kernel_settings()


def test_score_topk_default_on_a_gpu(monkeypatch):
  """SCORE_TOPK_IMPL None on a GPU: pooled_topk for top k <= SCORE_TOPK_MAX_K, the scores +
  top-k beyond it, and the scores + top-k wherever the score kernel is off."""
  monkeypatch.setattr(planning, "_on_gpu", lambda: True)
  assert planning.score_topk_impl() == "pallas"
  assert planning.score_topk_impl(8) == "pallas" and planning.score_topk_impl(9) == "xla"
  monkeypatch.setattr(planning, "SCORE_TOPK_MAX_K", 0)
  assert planning.score_topk_impl(32) == "pallas"
  monkeypatch.setattr(planning, "SCORE_IMPL", "xla")
  assert planning.score_topk_impl(8) == "xla"


@pytest.mark.parametrize("name", ("block_sparse", "grid", "q_boundary", "2d_boundary"))
def test_bfloat16_pooled_scores_give_the_same_plan_in_both_planners(name, monkeypatch):
  """SCORE_DTYPE "bfloat16": the pooled means enter the score dot in bf16 and the scores
  come out in bf16 (more bf16 arrays in the trace), in the lists and the dense planner
  alike, by XLA's dot and by the kernels (scores + top-k, and picks in one kernel); then,
  for the boundaries, with the means from the block_pool kernel, which writes them in
  bf16: their fallback pairs' means are pooled in a cond whose other branch must match."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(30, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  trace = lambda: str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))  # noqa: E731
  n_bf16 = trace().count("bf16[")
  monkeypatch.setattr(planning, "SCORE_DTYPE", "bfloat16")
  assert trace().count("bf16[") > n_bf16
  want = pol.plan(q, k, mod)
  assert int(np.asarray(want.block_count).sum()) > 0
  assert_same_plan(pol.plan(q, k, mod, planner="dense"), want)
  monkeypatch.setattr(planning, "SCORE_IMPL", "pallas")
  assert_same_plan(pol.plan(q, k, mod), want)
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "pallas")
  assert_same_plan(pol.plan(q, k, mod), want)
  if name in ("q_boundary", "2d_boundary"):  # (those with a pool_all cond)
    monkeypatch.setattr(planning, "POOL_IMPL", "pallas")
    assert_same_plan(pol.plan(q, k, mod), want)
  monkeypatch.setattr(planning, "SCORE_DTYPE", "float16")
  with pytest.raises(ValueError, match="SCORE_DTYPE must be None or one of"):
    planning.kernel_settings()


def test_score_dtype_default_is_bfloat16_on_a_gpu_only(monkeypatch):
  assert planning.score_dtype() == "float32"  # (here: the CPU)
  monkeypatch.setattr(planning, "_on_gpu", lambda: True)
  assert planning.score_dtype() == "bfloat16"
  monkeypatch.setattr(planning, "SCORE_DTYPE", "float32")
  assert planning.score_dtype() == "float32"


def test_scores_and_picks_in_one_kernel_need_the_score_kernel(monkeypatch):
  monkeypatch.setattr(planning, "SCORE_TOPK_IMPL", "pallas")
  monkeypatch.setattr(planning, "SCORE_IMPL", "xla")
  with pytest.raises(ValueError, match="SCORE_TOPK_IMPL='pallas' needs SCORE_IMPL"):
    planning.kernel_settings()


@pytest.mark.parametrize("name", SCORED_ALONE)
def test_keys_pooled_once_per_kv_head_give_the_same_plan(name, monkeypatch):
  """With GQA (4 query heads per kv head here) the keys are pooled once per kv head where
  the key view is the same for each head of a group (no grid-permuted group): the same
  plan as pooled per query head."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  assert n // kh > 1
  # (a length no other test plans: the jitted planner is traced anew, so the calls count)
  q, k, _, mod = helpers.random_inputs(26, b, t - 3, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  calls = []
  shared = planning.shared_k_pools
  monkeypatch.setattr(
    planning, "shared_k_pools", lambda *a, **kw: calls.append(1) or shared(*a, **kw)
  )
  got = pol.plan(q, k, mod)
  specs = pol.head_policies(n) if name == "mminference" else (pol,)
  uses = any(planning.shared_k_selectors(p.layout(), p.components()) for p in specs)
  assert bool(calls) == uses
  # (grid's key view, and a 2D boundary with a grid-permuted group, depend on the head)
  assert uses or name in ("grid", "2d_boundary")
  monkeypatch.setattr(P, "SHARE_K_POOLS", False)
  assert_same_plan(got, pol.plan(q, k, mod))


@pytest.mark.parametrize("name", ["grid", "q_boundary", "2d_boundary"])
def test_group_sorts_once_per_row_give_the_same_plan(name, monkeypatch):
  """The views' group sorts computed once per batch row (`planning.modality_row`, passed
  to every head and step of heads) give the plan of each view sorting for itself."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(27, b, t, n, kh, h, dtype, modk)
  pol = dataclasses.replace(_policy(name, n, bq, bk), heads_per_step=1)  # steps of heads
  mod = jnp.asarray(mod, jnp.int32)

  def plan():  # a new jit each time: traced with the current planning.modality_row
    return jax.jit(lambda q, k, m: P._plan_impl(pol, q, k, m))(q, k, mod)

  sorted_once = plan()
  rows = []
  full = planning.modality_row
  monkeypatch.setattr(
    planning, "modality_row", lambda m, **kw: rows.append(full(m, **kw)) or planning.Modality(m)
  )
  per_view = plan()
  assert rows and any(x is not None for r in rows for x in (r.by_modality, r.whole))
  assert_same_plan(sorted_once, per_view)


def _planned_heads_outer(monkeypatch, name, seed, kernel):
  """A policy's plan with planning's `kernel` ("MASS" / "POOL") in Pallas and its heads
  under vmap's usual batching (`<kernel>_HEADS_INNER` False): (policy, (q, k, mod), plan)."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(seed, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, f"{kernel}_IMPL", "pallas")
  monkeypatch.setattr(planning, f"{kernel}_HEADS_INNER", False)
  return pol, (q, k, mod), pol.plan(q, k, mod)


def test_estimates_with_the_heads_innermost_give_the_same_plan(monkeypatch):
  """planning.MASS_HEADS_INNER: the last-query estimates of the vmapped query heads as one
  attn_mass call (heads first in its grid) give the plan of vmap's usual batching. The 2D
  boundary has both kinds: its grid stride estimate (keys in a shared order) and its
  text pair's vertical-slash estimate (keys in the head's grid-permuted order)."""
  pol, (q, k, mod), want = _planned_heads_outer(monkeypatch, "2d_boundary", 27, "MASS")
  heads_index = f"{{i32[{q.shape[2]},2]}}"  # a kernel reading all the heads' (b, kv) indices
  assert heads_index not in str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  monkeypatch.setattr(planning, "MASS_HEADS_INNER", True)
  got = pol.plan(q, k, mod)
  assert heads_index in str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert_same_plan(got, want)


@pytest.mark.parametrize("name", ["block_sparse", "2d_boundary"])
def test_pooled_means_with_the_heads_innermost_give_the_same_plan(name, monkeypatch):
  """planning.POOL_HEADS_INNER: the pooled means of the vmapped heads as one block_mean
  call (heads first in its grid) give the plan of vmap's usual batching: block_sparse's
  shared identity view (its kv heads' keys pooled together too) and the 2D boundary's
  per-head grid-permuted view."""
  pol, (q, k, mod), want = _planned_heads_outer(monkeypatch, name, 29, "POOL")

  def pool_grids():  # (grid, vmapped dims) of each block_mean call in the plan's jaxpr
    found = []

    def walk(jaxpr):
      for e in jaxpr.eqns:
        if e.params.get("name") == "mmjax_block_mean" and "grid_mapping" in e.params:
          found.append(e.params["grid_mapping"].vmapped_dims)
        for v in e.params.values():
          for sub in v if isinstance(v, (tuple, list)) else (v,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
              walk(inner)

    walk(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod).jaxpr)
    return found

  assert pool_grids() and all(len(d) == 2 for d in pool_grids())  # (batch, head) vmapped
  monkeypatch.setattr(planning, "POOL_HEADS_INNER", True)
  got = pol.plan(q, k, mod)
  assert pool_grids() and all(len(d) == 1 for d in pool_grids())  # the heads in the grid
  assert_same_plan(got, want)


@pytest.mark.parametrize("pool_tokens", [0, 16])
def test_pooled_means_of_the_kernel_match_xla(pool_tokens, monkeypatch):
  """The kernel's pooled means of a grid-permuted, modality-grouped view (both sides,
  two selectors each) against the XLA path's, and both against numpy's means of each
  block's tokens: every token, or (`Grid.pool_tokens` 16, blocks 64 x 32) every 4th
  query and every 2nd key of a block, in view order."""
  rng = np.random.default_rng(5)
  length, h = 512, 32
  q = jnp.asarray(rng.standard_normal((length, h)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((length, h)), jnp.bfloat16)
  mod = jnp.asarray(rng.integers(0, 2, length), jnp.int32)
  kw = dict(seq_len=500, block_q=64, block_k=32, scale=0.1)
  grid = P.get("grid", pool_tokens=pool_tokens, block_q=64, block_k=32)
  layout = planning.Layout("both", ((1, grid),))
  comps = [planning.Component(a, b_, P.BlockSparse()) for a in (0, 1) for b_ in (0, 1)]
  means = {}
  for impl in ("xla", "pallas"):
    monkeypatch.setattr(planning, "POOL_IMPL", impl)
    v = planning.build_view(layout, ((1, jnp.int32(7)),), q, k, mod, **kw)
    assert v.pool_tokens == pool_tokens
    planning.pool_all(v, comps)
    means[impl] = v.pooled
  assert sorted(means["xla"], key=str) == sorted(means["pallas"], key=str)
  assert len(means["xla"]) == 4
  for key, (m, anyb) in means["xla"].items():
    np.testing.assert_allclose(
      np.asarray(means["pallas"][key][0]), np.asarray(m), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(means["pallas"][key][1]), np.asarray(anyb))
    side, sel = key
    x, perm, ok = (
      (v.q_src.dense(), v.q_perm, v.q_ok(sel))
      if side == "q"
      else (v.k_src.dense(), v.k_perm, v.k_ok(sel))
    )
    blk = kw["block_q" if side == "q" else "block_k"]
    e = blk // pool_tokens if pool_tokens else 1
    xv = np.asarray(x, np.float64)[np.asarray(perm)].reshape(-1, blk // e, e, h)[:, :, 0]
    w = np.asarray(ok).reshape(-1, blk // e, e)[:, :, 0]
    want = (xv * w[..., None]).sum(1) / np.maximum(w.sum(1), 1)[:, None]
    np.testing.assert_allclose(np.asarray(m), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(anyb), np.asarray(ok).reshape(-1, blk).any(1))


@pytest.mark.parametrize(
  "layout, p_dtype, max_offset",
  [
    ("none", "float32", None),
    ("both", "float32", None),
    ("q", "float32", None),
    ("both", "float16", None),
    ("both", "float32", 100),
    ("both", "window", 100),
  ],
)
def test_last_query_mass_of_the_kernel_matches_xla(layout, p_dtype, max_offset, monkeypatch):
  """Column and diagonal masses of the kernel against the XLA path's, in an identity, a
  grouped + grid-permuted (keys gathered) and a query-only view; with p stored in f16
  (`MASS_P_DTYPE`) the slash sums within 1e-3 relative (and the columns, which the
  two-pass form, `MASS_TILE_STATS`, sums from p); with max_offset (the stride
  estimate's) only the first slash sums, and no columns; "window": each row softmaxed
  over the keys of the window only (`Grid.stride_norm`)."""
  window = p_dtype == "window"
  p_dtype = "float32" if window else p_dtype
  monkeypatch.setattr(planning, "MASS_P_DTYPE", p_dtype)
  rng = np.random.default_rng(6)
  length, h = 512, 32
  q = jnp.asarray(rng.standard_normal((length, h)) * 2, jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((length, h)), jnp.bfloat16)
  mod = jnp.asarray(rng.integers(0, 2, length), jnp.int32)
  kw = dict(seq_len=500, block_q=64, block_k=32, scale=0.2)
  grid = ((1, jnp.int32(7)),) if layout == "both" else ()
  v = planning.build_view(planning.Layout(layout), grid, q, k, mod, **kw)
  k_mod = 1 if layout == "both" else None
  start, _ = v.key_span(k_mod)
  out = {}
  for impl in ("xla", "pallas"):
    monkeypatch.setattr(planning, "MASS_IMPL", impl)
    out[impl] = planning.last_query_mass(
      v, 1, k_mod, 40, True, lambda rows: v.q_rank[rows] + start, max_offset, window
    )
  # (columns, slashes; the two-pass form's columns are summed from p too)
  f16 = p_dtype == "float16"
  rtols = (1e-3 if f16 and planning.MASS_TILE_STATS else 1e-4, 1e-3 if f16 else 1e-4)
  if max_offset:
    assert out["xla"][0] is None and out["pallas"][0] is None
    assert out["pallas"][1].shape == (max_offset,)
    out = {key: val[1:] for key, val in out.items()}
    rtols = rtols[1:]
  for got, want, rtol in zip(out["pallas"], out["xla"], rtols, strict=True):
    assert float(jnp.abs(want).sum()) > 1.0  # (some mass: the check is not vacuous)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("name", ["vertical_slash", "grid", "2d_boundary"])
def test_plans_with_two_pass_estimates_are_the_same(name, monkeypatch):
  """MASS_TILE_STATS: the last-query estimates by attn_mass's two passes (each key tile's
  exp with its own row max, rescaled as the diagonals and columns are read) give the
  three passes' plan: a whole-sequence estimate, a grid's stride estimate (a window of
  offsets) and a 2D boundary's (its text pair over a key range, its stride estimate)."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(28, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, "MASS_IMPL", "pallas")
  with planning.settings(mass_tile_stats=False):
    want = pol.plan(q, k, mod)  # (a new trace: the setting is part of plan's jit key)
    jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_attn_mass_stats" in jaxpr and "mmjax_attn_mass_tiles" not in jaxpr
  with planning.settings(mass_tile_stats=True):
    got = pol.plan(q, k, mod)
    jaxpr = str(jax.make_jaxpr(lambda q, k, m: pol.plan(q, k, m))(q, k, mod))
  assert "mmjax_attn_mass_tiles" in jaxpr and "mmjax_attn_mass_stats" not in jaxpr
  assert_same_plan(got, want)
  with pytest.raises(ValueError, match="mass_tile_stats takes True or False"):
    with planning.settings(mass_tile_stats="yes"):
      pass


@pytest.mark.parametrize(
  "name",
  [
    "TOPK_IMPL",
    "POOL_IMPL",
    "MASS_IMPL",
    "SCORE_IMPL",
    "SCORE_TOPK_IMPL",
    "COLS_IMPL",
    "MERGE_LISTS",
  ],
)
def test_kernel_impls_are_checked(name, monkeypatch):
  monkeypatch.setattr(planning, name, "sort")
  with pytest.raises(ValueError, match=name):
    planning.kernel_settings()


@pytest.mark.parametrize("n_blocks", [None, 60])
@pytest.mark.parametrize("valid_heads", [(), (1,), (0, 1)])
def test_merge_candidates_skips_only_empty_short_lists(valid_heads, n_blocks):
  """merge_candidates under vmap over 2 heads (axis name "h", as the planner runs it):
  the short lists' sort merged into the long ascending lists, or, when no head has a
  valid short entry, the long lists followed by the short ones' BIG entries; either way
  the arrays of merging everything (merge_rows). With n_blocks the short lists' sort is
  of one packed key (`sort_by_block`): the same arrays."""
  rng = np.random.default_rng(len(valid_heads))
  n_q, n_long, w = 5, 20, 4
  assert n_long > planning_lists._SORT_WIDTH  # (a long list)
  longs, shorts, pris = [], [], []
  for hd in range(2):
    idx = np.sort(rng.choice(40, (n_q, n_long)), axis=1) + np.arange(n_long)
    pri = np.where(
      np.arange(n_long) < rng.integers(3, n_long, (n_q, 1)), planning.PRI_STRUCT, -np.inf
    )
    longs.append((idx.astype(np.int32), pri.astype(np.float32)))
    short_idx = rng.integers(0, 60, (n_q, w)).astype(np.int32)
    short_pri = 1.0 + rng.random((n_q, w)).astype(np.float32)
    short_pri[rng.random((n_q, w)) < 0.3] = -np.inf
    if hd not in valid_heads:
      short_pri[:] = -np.inf
    shorts.append(short_idx)
    pris.append(short_pri)
  li, lp = (jnp.asarray(np.stack(x)) for x in zip(*longs, strict=True))
  si, sp = jnp.asarray(np.stack(shorts)), jnp.asarray(np.stack(pris))

  def one(li, lp, si, sp):
    return planning_lists.merge_candidates([(si, sp, False), (li, lp, True)], ("h",), n_blocks)

  def reference(li, lp, si, sp):  # every list merged
    key, pri = jax.lax.sort((jnp.where(sp > -jnp.inf, si, planning.BIG), sp), num_keys=1)
    return planning.merge_rows(key, pri, li, lp, -jnp.inf)

  got = jax.vmap(one, axis_name="h")(li, lp, si, sp)
  want = jax.vmap(reference)(li, lp, si, sp)
  for g, w_ in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w_))
  jaxpr = str(jax.make_jaxpr(jax.vmap(one, axis_name="h"))(li, lp, si, sp))
  assert "cond[" in jaxpr  # (a real branch: the predicate is reduced over the heads)
  with planning.settings(skip_empty_work=False):  # (the merge always: no cond)
    got = jax.vmap(one, axis_name="h")(li, lp, si, sp)
    jaxpr = str(jax.make_jaxpr(jax.vmap(one, axis_name="h"))(li, lp, si, sp))
  for g, w_ in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w_))
  assert "cond[" not in jaxpr


def test_count_below_is_searchsorted():
  """`_wide_rows`' window index: a sum of compares (no while loop), jnp.searchsorted's."""
  sizes = [1, 2, 4, 8, 16, 32]
  x = jnp.arange(-1, 40, dtype=jnp.int32)
  got = jax.vmap(lambda v: planning_lists._count_below(sizes, v))(x)
  want = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  jaxpr = str(jax.make_jaxpr(lambda v: planning_lists._count_below(sizes, v))(x[0]))
  assert "while[" not in jaxpr and "scan[" not in jaxpr


@pytest.mark.parametrize("n_blocks", [None, 50, 2**25])
def test_sort_by_block_is_a_stable_sort_of_the_pair(n_blocks):
  """sort_by_block against lax.sort's stable sort of (idx, pri) by idx: repeated blocks
  keep their column order, BIG entries go last; packed (n_blocks 50) or not (None, and
  2^25 blocks, whose key would not fit in an int32)."""
  rng = np.random.default_rng(3)
  idx = rng.integers(0, 50, (7, 13)).astype(np.int32)
  idx[rng.random(idx.shape) < 0.25] = planning.BIG
  pri = rng.standard_normal(idx.shape).astype(np.float32)
  got = jax.jit(planning_lists.sort_by_block, static_argnums=2)(idx, pri, n_blocks)
  want = jax.lax.sort((jnp.asarray(idx), jnp.asarray(pri)), dimension=1, num_keys=1)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_union_blocks_matches_sets():
  """The union's blocks against python sets, with the two-operand sort and with the packed
  key (n_blocks given); both give the same output, the slots past the union included
  (they continue it: merge_rows needs the rows ascending). Many intervals share a start."""
  rng = np.random.default_rng(0)
  n_q, m, bk, length = 6, 9, 4, 200
  lo = rng.integers(0, length, (n_q, m))
  lo[:, :3] = lo[:, 3:4]  # (same starts)
  hi = lo + rng.integers(-3, 30, (n_q, m))
  hi = np.minimum(hi, length - 1)
  for cap in (1, 7, length // bk):
    idx, ok = planning_lists.union_blocks(jnp.asarray(lo), jnp.asarray(hi), bk, cap)
    for i in range(n_q):
      want = sorted({j // bk for a, b in zip(lo[i], hi[i], strict=True) for j in range(a, b + 1)})
      got = np.asarray(idx[i])[np.asarray(ok[i])]
      np.testing.assert_array_equal(got, want[:cap])
    packed = planning_lists.union_blocks(jnp.asarray(lo), jnp.asarray(hi), bk, cap, length // bk)
    for g, w in zip(packed, (idx, ok), strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("mb", [2, 5, 40])
def test_select_candidates_is_top_by_priority(mb):
  """Distinct blocks, highest priority per block, top mb by priority (ties to the lower
  block), ascending; against a numpy version."""
  rng = np.random.default_rng(mb)
  n_q, w, n_k = 7, 30, 12
  idx = rng.integers(0, n_k, (n_q, w))
  pri = rng.choice([planning.PRI_SELF, planning.PRI_STRUCT, 1.5, 1.25, -np.inf], (n_q, w))
  got, count = planning_lists.select_candidates(jnp.asarray(idx), jnp.asarray(pri, jnp.float32), mb)
  for i in range(n_q):
    best = {}
    for j, p in zip(idx[i], pri[i], strict=True):
      if p > -np.inf:
        best[j] = max(best.get(j, -np.inf), p)
    order = sorted(best, key=lambda j: (-best[j], j))[:mb]
    assert int(count[i]) == len(order)
    np.testing.assert_array_equal(np.asarray(got[i, : len(order)]), sorted(order))


@pytest.mark.parametrize(
  "grid_all, strides",
  [
    (False, ((1, 7), (3, 4))),
    (True, ((-1, 7),)),
    (False, ((1, 1), (3, 200))),  # stride 1; a stride above the group's size
    (False, ((1, 37), (3, 67))),  # a few tokens per residue, group 3's size / stride = 1
    (True, ((-1, 283),)),
  ],
)
def test_group_order_is_the_three_key_sort(grid_all, strides):
  """The grouped (+ grid) permutation equals a stable sort by (group, orank % stride,
  orank), numpy's lexsort, with padding last."""
  rng = np.random.default_rng(int(grid_all))
  length, seq_len = 300, 283
  pos = np.arange(length)
  real = pos < seq_len
  mod = np.where(real, rng.choice([0, 1, 1, 3], length), -1)
  perm, rank, orank = planning._group_order(
    jnp.asarray(pos, jnp.int32),
    jnp.asarray(mod, jnp.int32),
    jnp.asarray(real),
    tuple((g, jnp.int32(s)) for g, s in strides),
    grid_all,
  )
  grp = np.where(real, mod, 2**30)
  want_orank = np.zeros(length, int)
  for g in np.unique(grp):
    want_orank[grp == g] = np.arange((grp == g).sum())
  sub = np.zeros(length, int)
  for g, s in strides:
    in_g = real & ((mod == g) | grid_all)
    sub[in_g] = want_orank[in_g] % s
  want = np.lexsort((want_orank, sub, grp))
  np.testing.assert_array_equal(np.asarray(perm), want)
  np.testing.assert_array_equal(np.asarray(orank), want_orank[want])
  starts = {g: np.flatnonzero(grp[want] == g)[0] for g in np.unique(grp)}
  np.testing.assert_array_equal(
    np.asarray(rank), np.arange(length) - np.array([starts[g] for g in grp[want]])
  )


def test_select_columns_presorted_path():
  """Columns shared by every query block, sorted once, give the per-row sort's result."""
  rng = np.random.default_rng(3)
  n_q, n_k, bq, bk = 12, 24, 16, 8
  length = n_k * bk
  pos = jnp.arange(length, dtype=jnp.int32)
  v = planning.build_view(
    planning.Layout("none"),
    (),
    jnp.zeros((length, 4)),
    jnp.zeros((length, 4)),
    jnp.zeros((length,), jnp.int32),
    seq_len=length - 5,
    block_q=bq,
    block_k=bk,
    scale=1.0,
  )
  assert v.n_q == n_q and bool(jnp.all(v.k_pos == pos))
  cols = jnp.asarray(rng.permutation(length)[:40], jnp.int32)
  ok = jnp.asarray(rng.random((n_q, 40)) < 0.7)
  blocks = jnp.sort(jnp.asarray(rng.integers(0, n_k, (n_q, 6)), jnp.int32), axis=1)
  count = jnp.asarray(rng.integers(0, 7, n_q), jnp.int32)
  cand = jnp.broadcast_to(cols, (n_q, 40))
  order = jnp.argsort(cols)
  for mc in (5, 40, 50):
    want = planning.select_columns(cand, ok, v, blocks, count, mc)
    got = planning.select_columns(cand[:, order], ok[:, order], v, blocks, count, mc, runs=1)
    assert int(want[1].sum()) > 0
    for x, y in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_merged_column_lists_give_the_sorted_result():
  """Two shared column lists with common values, sorted once, merged with per-row lists
  (a query-only view's own tokens): select_columns' neighbour dedup (runs = 3) gives the
  per-row sort's result."""
  rng = np.random.default_rng(4)
  n_q, n_k, bq, bk = 12, 24, 16, 8
  length = n_k * bk
  v = planning.build_view(
    planning.Layout("q"),
    (),
    jnp.zeros((length, 4)),
    jnp.zeros((length, 4)),
    jnp.asarray(rng.integers(0, 2, length), jnp.int32),
    seq_len=length - 5,
    block_q=bq,
    block_k=bk,
    scale=1.0,
  )
  c1 = rng.permutation(length)[:30]
  c2 = np.concatenate([c1[:10], rng.permutation(length)[:20]])  # 10 shared with c1
  a = jnp.asarray(np.sort(np.concatenate([c1, c2])), jnp.int32)
  a_ok = jnp.asarray(rng.random((n_q, a.shape[0])) < 0.7)
  # each row: 8 distinct tokens, one of them a value of the shared lists too
  others = np.setdiff1d(np.arange(length), [int(a[3])])
  own = np.stack([np.append(rng.choice(others, 7, replace=False), int(a[3])) for _ in range(n_q)])
  own = jnp.sort(jnp.asarray(own, jnp.int32), axis=1)
  own_ok = jnp.asarray(rng.random((n_q, 8)) < 0.8)
  x, ok = planning.merge_rows(jnp.broadcast_to(a, (n_q, a.shape[0])), a_ok, own, own_ok, False)
  assert bool(jnp.all(x[:, 1:] >= x[:, :-1]))
  blocks = jnp.sort(jnp.asarray(rng.integers(0, n_k, (n_q, 6)), jnp.int32), axis=1)
  count = jnp.asarray(rng.integers(0, 7, n_q), jnp.int32)
  unsorted = jnp.concatenate([jnp.broadcast_to(a, (n_q, a.shape[0])), own], axis=1)
  unsorted_ok = jnp.concatenate([a_ok, own_ok], axis=1)
  for mc in (5, 60, 80):
    want = planning.select_columns(unsorted, unsorted_ok, v, blocks, count, mc)
    got = planning.select_columns(x, ok, v, blocks, count, mc, runs=3)
    assert int(want[1].sum()) > 0
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("side", ["left", "right"])
def test_count_sorted_matches_searchsorted(side):
  rng = np.random.default_rng(7)
  for n in (0, 1, 5, 16, 37):
    rows = np.sort(rng.integers(0, 20, (6, n)), axis=1).astype(np.int32)
    x = rng.integers(-2, 23, (6, 9)).astype(np.int32)
    got = planning.count_sorted(jnp.asarray(rows), jnp.asarray(x), side)
    want = np.stack([np.searchsorted(r, xi, side=side) for r, xi in zip(rows, x, strict=True)])
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("name", ["vertical_slash", "q_boundary", "2d_boundary"])
def test_compiled_plan_holds_no_large_constants(name, monkeypatch):
  """Batched binary searches must not leave XLA an index array to constant-fold (a vmapped
  jnp.searchsorted did: [B, heads, rows, m, 2] literals, 88 MB and 2 s of compile time
  in a 128k plan)."""
  monkeypatch.setattr(planning, "MERGE_LISTS", True)  # (the GPU's merges)
  t = 4096
  q = jnp.ones((1, t, 4, 32), jnp.bfloat16)
  k = jnp.ones((1, t, 2, 32), jnp.bfloat16)
  mod = jnp.asarray(np.repeat(np.arange(8) % 2, t // 8)[None], jnp.int32)
  pol = P.get(name, block_q=128, block_k=64)
  hlo = jax.jit(lambda q, k, m: pol.plan(q, k, m)).lower(q, k, mod).compile().as_text()
  sizes = [
    int(np.prod([int(d) for d in m.group(1).split(",")]))
    for m in re.finditer(r"= \w+\[([\d,]+)\]\{[\d,]*\} constant\(", hlo)
  ]
  assert max(sizes, default=0) < 10000, sorted(sizes)[-3:]


def test_lists_planner_equals_dense_with_ids_never_named():
  """2d_boundary with cross='dense' on input with a modality id the policy never names:
  the 'other ids' components own keys of several groups, so their dense candidates are
  every block holding one (not a rank interval)."""
  t, bq, bk = 256, 16, 16
  q, k, _, _ = helpers.random_inputs(25, 1, t, 2, 1, 32, jnp.float32, "text")
  mod = jnp.asarray(np.random.default_rng(0).choice([0, 1, 1, 2], t), jnp.int32)[None]
  base = helpers.small_policies(bq, bk)["2d_boundary"]
  pol = dataclasses.replace(base, cross=P.get("dense", block_q=bq, block_k=bk))
  a, d = _plans(pol, q, k, mod)
  assert_same_plan(a, d)


def test_key_span_needs_one_run_of_ranks():
  """Rank patterns need the keys as one run of view indices; other selectors raise."""
  length = 64
  x = jnp.zeros((length, 4))
  mod = jnp.zeros((length,), jnp.int32)
  kw = dict(seq_len=length, block_q=16, block_k=16, scale=1.0)
  both = planning.build_view(planning.Layout("both"), (), x, x, mod, **kw)
  start, n = both.key_span(0)
  assert (int(start), int(n)) == (0, length)
  with pytest.raises(ValueError, match="not one contiguous run"):
    both.key_span(planning.OtherThan((0,)))
  ident = planning.build_view(planning.Layout("none"), (), x, x, mod, **kw)
  with pytest.raises(ValueError, match="not one contiguous run"):
    ident.key_span(1)


@pytest.mark.parametrize("length", [64, 200, 512, 4096])
def test_stride_from_the_first_offsets_only(length):
  """estimate_stride reads the first `stride_offsets` slash sums only: given just those
  (and the length), the same stride as from all of them; fewer raise."""
  rng = np.random.default_rng(length)
  for trial in range(3):
    slash = jnp.asarray(rng.random(length) + (np.arange(length) % (11 + trial) == 0), jnp.float32)
    want = planning.estimate_stride(slash, 8, 1024)
    n = planning.stride_offsets(length, 8, 1024)
    got = planning.estimate_stride(slash[:n], 8, 1024, length=length)
    assert int(got) == int(want)
    # the offsets it reads decide it: changing every later one changes nothing
    later = slash.at[n:].set(100.0) if n < length else slash
    assert int(planning.estimate_stride(later, 8, 1024)) == int(want)
  if n < length:
    with pytest.raises(ValueError, match="the estimate reads"):
      planning.estimate_stride(slash[: n - 1], 8, 1024, length=length)


@pytest.mark.parametrize("window", [False, True])
def test_last_query_mass_window(window, monkeypatch):
  """The stride estimate's slash sums against numpy, in an identity view: each of the
  last 24 queries softmaxed over the keys it sees (causal), or over those from W - 1
  before the earliest of them (`Grid.stride_norm="window"`); then summed along each of
  the first W diagonals. Both planner paths."""
  rng = np.random.default_rng(8)
  length, h, w, n_rows = 256, 32, 40, 24
  q = rng.standard_normal((length, h)).astype(np.float32)
  k = rng.standard_normal((length, h)).astype(np.float32)
  mod = jnp.zeros(length, jnp.int32)
  v = planning.build_view(
    planning.Layout("none"), (), q, k, mod, seq_len=250, block_q=16, block_k=16, scale=0.3
  )
  rows = np.arange(250 - n_rows, 250)
  first = rows.min() - (w - 1) if window else 0
  s = np.where(
    (np.arange(length)[None, :] <= rows[:, None]) & (np.arange(length)[None, :] >= first),
    (q[rows].astype(np.float64) @ k.T.astype(np.float64)) * 0.3,
    -np.inf,
  )
  p = np.exp(s - s.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.asarray([sum(p[i, r - o] for i, r in enumerate(rows) if r >= o) for o in range(w)])
  for impl in ("xla", "pallas"):
    monkeypatch.setattr(planning, "MASS_IMPL", impl)
    _, got = planning.last_query_mass(v, None, None, n_rows, False, lambda r: r, w, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("length, seq_len", [(64, 64), (256, 250), (512, 300)])
def test_whole_sort_is_the_group_sort_of_one_group(length, seq_len):
  """whole_sort (a grid over the whole sequence) gives what group_sort's stable sort of
  one group of real tokens, padding after, gives."""
  pos = jnp.arange(length, dtype=jnp.int32)
  real = pos < seq_len
  want = planning.group_sort(pos, jnp.zeros(length, jnp.int32), real)
  got = planning.whole_sort(length, seq_len)
  for name, g, w in zip(want._fields, got, want, strict=True):
    assert g.dtype == w.dtype, name
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def test_sinks_in_a_grid_permuted_group_need_a_grid():
  """Only a grid's sinks may be scattered by its permutation (they become columns, and
  only a grid has a column budget for them): an a_shape there is refused by both
  planners. (No policy builds one: 2d_boundary lists grid groups per modality pair.)"""
  t, bq, bk = 256, 16, 16
  q, k, _, mod = helpers.random_inputs(3, 1, t, 1, 1, 32, jnp.float32, "vision")
  grid = P.get("grid", block_q=bq, block_k=bk, stride=16)
  layout = planning.Layout("none", ((-1, grid),))
  kw = dict(seq_len=t, block_q=bq, block_k=bk, scale=0.2, max_blocks=8, max_cols=16)
  args = (q[0, :, 0], k[0, :, 0], mod[0])
  for planner in (planning.head_plan, planning_lists.head_plan):
    out = planner(layout, (planning.Component(None, None, grid),), *args, **kw)
    assert int(out["col_count"].max()) > 0  # the grid itself: its sinks as columns
    ash = P.get("a_shape", block_q=bq, block_k=bk)
    with pytest.raises(ValueError, match="only a grid pattern"):
      planner(layout, (planning.Component(None, None, ash),), *args, **kw)
