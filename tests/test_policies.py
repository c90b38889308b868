"""Every policy on random inputs: reference is the masked softmax, xla matches reference,
causality, self, full budget = dense, plan invariants, jit without retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import policies as P
from tests import helpers

# (B, T, N, K, H, dtype, modality, block_q, block_k): T not a multiple of the blocks in the
# first and third; GQA in the first; batch 2; all-text, all-vision and interleaved inputs.
CASES = {
  "b2_gqa_interleaved_f32": (2, 200, 4, 2, 32, jnp.float32, "interleaved", 16, 16),
  "vision_bf16_bq32": (1, 256, 4, 4, 64, jnp.bfloat16, "vision", 32, 16),
  "text_f32_bk32": (1, 150, 2, 1, 32, jnp.float32, "text", 16, 32),
}
NAMES = [*helpers.small_policies().keys(), "mminference"]


def _policy(name, n, bq, bk):
  if name == "mminference":
    return helpers.mixed_table_policy(n, bq, bk)
  return helpers.small_policies(bq, bk)[name]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_policy_on_random_inputs(name, case):
  b, t, n, kh, h, dtype, modk, bq, bk = CASES[case]
  q, k, v, mod = helpers.random_inputs(hash(case) % 1000, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  plan = pol.plan(q, k, mod)
  helpers.check_plan_invariants(plan)
  mask = np.asarray(plan.to_dense_mask())
  assert mask.shape == (b, n, t, t)
  # the view-order mask, put back in original positions, is the same mask
  vm, qp, kp = (np.asarray(x) for x in (plan.view_mask(), plan.q_positions(), plan.k_positions()))
  back = np.zeros_like(vm)
  for i in np.ndindex(b, n):
    back[i][qp[i][:, None], kp[i][None, :]] = vm[i]
  np.testing.assert_array_equal(back[:, :, :t, :t], mask)
  # some rows' masks alone (the search's recall rows), in no order
  rows = np.random.default_rng(t).choice(t, size=min(t, 37), replace=False)
  np.testing.assert_array_equal(np.asarray(plan.mask_rows(rows)), mask[:, :, rows])
  for bad in ([t], [-1], [[0]], [0.5]):
    with pytest.raises(ValueError, match="mask_rows: rows must be 1-D ints"):
      plan.mask_rows(np.asarray(bad))
  causal = np.tril(np.ones((t, t), bool))
  assert not (mask & ~causal).any(), "a mask admits a future key"
  assert np.diagonal(mask, axis1=2, axis2=3).all(), "a query does not see itself"
  # density is the mask's share of causal pairs.
  np.testing.assert_allclose(
    float(plan.density()), mask.sum() / (b * n * t * (t + 1) / 2), rtol=1e-6
  )
  ref = mmjax.sparse_attention(q, k, v, plan=plan, backend="reference")
  want = helpers.numpy_attention(q, k, v, mask)
  tol = helpers.TOL[dtype]
  np.testing.assert_allclose(
    np.asarray(ref, np.float64), want, atol=max(tol, 4e-3 if dtype == jnp.bfloat16 else 0), rtol=tol
  )
  out = mmjax.sparse_attention(q, k, v, plan=plan, backend="xla")
  assert out.dtype == q.dtype and out.shape == q.shape
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol * 2, rtol=tol * 2
  )
  if name != "dense":
    assert float(plan.density()) < 1.0 or modk == "text" and t < 160, "policy was not sparse"


@pytest.mark.parametrize("name", NAMES)
def test_full_budget_is_dense(name):
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, v, mod = helpers.random_inputs(7, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk).full_budget(t)
  plan = pol.plan(q, k, mod)
  mask = np.asarray(plan.to_dense_mask())
  np.testing.assert_array_equal(mask, np.broadcast_to(np.tril(np.ones((t, t), bool)), mask.shape))
  dense = mmjax.sparse_attention(q, k, v, P.get("dense"), mod, backend="xla")
  out = mmjax.sparse_attention(q, k, v, plan=plan, backend="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5, rtol=2e-5)


def test_plan_does_not_retrace():
  pol = helpers.small_policies()["2d_boundary"]
  q, k, _, mod = helpers.random_inputs(1, 1, 128, 2, 2, 32, jnp.float32)
  pol.plan(q, k, mod)
  size = P._plan_jit._cache_size()
  q2, k2, _, mod2 = helpers.random_inputs(2, 1, 128, 2, 2, 32, jnp.float32)
  p2 = pol.plan(q2, k2, mod2)
  assert P._plan_jit._cache_size() == size
  p1 = pol.plan(q, k, mod)
  assert not np.array_equal(np.asarray(p1.to_dense_mask()), np.asarray(p2.to_dense_mask()))


def test_plan_under_user_jit_and_deterministic():
  pol = helpers.small_policies()["grid"]
  q, k, v, mod = helpers.random_inputs(3, 1, 192, 2, 1, 32, jnp.float32)
  f = jax.jit(lambda q, k, v, m: mmjax.sparse_attention(q, k, v, pol, m))
  np.testing.assert_array_equal(np.asarray(f(q, k, v, mod)), np.asarray(f(q, k, v, mod)))
  np.testing.assert_allclose(
    np.asarray(f(q, k, v, mod)), np.asarray(mmjax.sparse_attention(q, k, v, pol, mod)), atol=1e-6
  )


def test_policies_are_hashable_and_static():
  for name, pol in helpers.small_policies().items():
    assert hash(pol) == hash(helpers.small_policies()[name])
    assert pol == helpers.small_policies()[name]
  assert set(P.names()) == {
    "dense",
    "a_shape",
    "vertical_slash",
    "block_sparse",
    "grid",
    "q_boundary",
    "2d_boundary",
    "mminference",
  }


def test_table_json_roundtrip(tmp_path):
  pol = helpers.mixed_table_policy(4)
  path = tmp_path / "table.json"
  import json

  path.write_text(json.dumps(P.table_to_json(pol.table, model="test")))
  loaded = P.get("mminference", table_path=str(path), block_q=16, block_k=16)
  assert loaded.table == pol.table


@pytest.mark.parametrize(
  "name, per_step",
  [("2d_boundary", 3), ("mminference", 3), ("mminference_pairs", 1), ("mminference_3_1", 2)],
)
def test_heads_per_step_gives_the_same_plan(name, per_step):
  """Heads planned a few at a time (lax.scan, each step writing its heads into the whole
  plan) give the plan of all heads at once: 4 heads in steps of 3 (a padded second
  step); mminference_pairs: two policies on alternate heads, a step per head, each group
  writing into the plan the other one left; mminference_3_1: a group of three heads in
  steps of 2 and a group of one."""
  b, t, n, kh, h, dtype, modk, bq, bk = CASES["b2_gqa_interleaved_f32"]
  q, k, _, mod = helpers.random_inputs(11, b, t, n, kh, h, dtype, modk)
  small = helpers.small_policies(bq, bk)
  if name == "mminference_pairs":
    row = (small["grid"], small["q_boundary"]) * (n // 2)
    pol = P.get("mminference", table=(row,), block_q=bq, block_k=bk)
  elif name == "mminference_3_1":
    assert n == 4
    row = (small["grid"], small["grid"], small["q_boundary"], small["grid"])
    pol = P.get("mminference", table=(row,), block_q=bq, block_k=bk)
  else:
    pol = _policy(name, n, bq, bk)
  import dataclasses

  chunked = dataclasses.replace(pol, heads_per_step=per_step)
  a, c = pol.plan(q, k, mod), chunked.plan(q, k, mod)
  assert (a.q_perm is None, a.k_perm is None) == (c.q_perm is None, c.k_perm is None)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(c), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _random_priorities(rng, nq, nk, density, struct_share):
  """[nQ, nK] priorities as the planner makes them: PRI_SELF, PRI_STRUCT, pooled scores in
  (1, 2), -inf; `struct_share` of the finite ones are self/struct."""
  from mmjax import planning

  cls = rng.choice([planning.PRI_SELF, planning.PRI_STRUCT, planning.PRI_STRUCT], (nq, nk))
  val = np.where(rng.random((nq, nk)) < struct_share, cls, 1.0 + rng.random((nq, nk)))
  return jnp.asarray(np.where(rng.random((nq, nk)) < density, val, -np.inf), jnp.float32)


@pytest.mark.parametrize("mb", [3, 24, 300])
def test_select_blocks_equals_top_k(mb):
  """The sort-free selection equals the top-k one on every row it takes (rows that fit,
  rows that overflow with enough structural blocks), and select_blocks equals top-k on
  every input, including rows that need the order among pooled scores."""
  from mmjax import planning

  rng = np.random.default_rng(mb)
  taken = 0
  for density, struct_share in [(0.01, 0.5), (0.05, 1.0), (0.3, 0.9), (0.6, 0.1), (1.0, 0.5)]:
    pri = _random_priorities(rng, 8, 300, density, struct_share)
    want = planning._topk_rows(pri, mb)
    n_fin = np.asarray((pri > planning.NEG).sum(-1))
    n_struct = np.asarray((pri >= planning.PRI_STRUCT).sum(-1))
    eligible = (n_fin <= mb) | (n_struct >= mb)
    fast = planning._select_by_class(pri, jnp.asarray(n_fin), mb)
    for x, y in zip(fast, want, strict=True):
      np.testing.assert_array_equal(np.asarray(x)[eligible], np.asarray(y)[eligible])
    taken += int(eligible.all())
    for x, y in zip(planning.select_blocks(pri, mb), want, strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert taken >= 2, "the inputs did not exercise the sort-free branch"


def test_group_sort_is_a_stable_sort_by_group():
  """group_sort's one-key sort (ids as uint32) orders tokens as numpy's stable lexsort
  by (group, position): negative and large ids, padding last, groups of one token."""
  from mmjax import planning

  rng = np.random.default_rng(7)
  for n, lo, hi in [(1, 0, 2), (37, -5, 5), (4096, 0, 3), (3000, -(2**31), 2**31 - 1)]:
    mod = rng.integers(lo, hi, n, dtype=np.int64).astype(np.int32)
    real = np.arange(n) < n - rng.integers(0, min(n, 9))
    pos = np.arange(n, dtype=np.int32)
    got = planning.group_sort(jnp.asarray(pos), jnp.asarray(mod), jnp.asarray(real))
    grp = np.where(real, mod, int(planning.BIG)).astype(np.int64)
    want = np.lexsort((pos, grp))
    np.testing.assert_array_equal(np.asarray(got.by_group), want)
    np.testing.assert_array_equal(np.asarray(got.g_sorted), grp[want])


@pytest.mark.parametrize("n", [1, 37, 129, 4096, 40000])
def test_counting_group_sort_is_the_sort(n, monkeypatch):
  """group_sort of ids in [0, GROUP_COUNT_IDS) (prefix counts over one-hot rows, chunked
  in up to three levels at 40000 tokens, and one scatter) gives the sort's four arrays,
  with padding and with ids the count does not take (then the sort)."""
  from mmjax import planning

  rng = np.random.default_rng(n)
  pos = jnp.arange(n, dtype=jnp.int32)
  for hi in (1, 3, 16, 17):
    mod = jnp.asarray(rng.integers(0, hi, n), jnp.int32)
    real = jnp.asarray(np.arange(n) < n - rng.integers(0, min(n, 9)))
    want = planning._sorted_groups(jnp.where(real, mod, planning.BIG), pos)
    got = planning.group_sort(pos, mod, real)
    for name, g, w in zip(want._fields, got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{name} hi={hi}")
  grp = jnp.where(real, jnp.minimum(mod, 15), planning.BIG)
  counted = planning._count_sort(grp, pos, n_ids=16)
  for g, w in zip(counted, planning._sorted_groups(grp, pos), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  monkeypatch.setattr(planning, "GROUP_COUNT_IDS", -1)
  with pytest.raises(ValueError, match="GROUP_COUNT_IDS must be an int >= 0"):
    planning.kernel_settings()


@pytest.mark.parametrize("case", ["b2_gqa_interleaved_f32", "vision_bf16_bq32", "grid_1k"])
@pytest.mark.parametrize("name", ["a_shape", "vertical_slash", "grid", "2d_boundary"])
def test_plan_takes_the_sort_free_selection(name, case, monkeypatch):
  """With the top-k branch poisoned the plans are unchanged: the planner's own priorities
  take the sort-free branch and give the plan the top-k gives. A grid's rows need the
  pooled scores' order, so they run the top-k (the test then checks only equality); in
  "grid_1k" its 32 sink tokens scatter over the permuted keys (they are columns, not
  blocks). The dense reference planner's selection (the default planner has its own)."""
  import dataclasses

  from mmjax import planning

  if case == "grid_1k":
    b, t, n, kh, h, dtype, modk, bq, bk = (1, 1024, 2, 1, 32, jnp.float32, "vision", 16, 16)
  else:
    b, t, n, kh, h, dtype, modk, bq, bk = CASES[case]
  q, k, _, mod = helpers.random_inputs(5, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  if case == "grid_1k" and name == "grid":
    pol = dataclasses.replace(pol, stride=32, sink_tokens=32)
  jax.clear_caches()
  fast = pol.plan(q, k, mod, planner="dense")
  select = planning.select_blocks
  monkeypatch.setattr(planning, "select_blocks", lambda p, mb, axes=(): planning._topk_rows(p, mb))
  jax.clear_caches()
  topk = pol.plan(q, k, mod, planner="dense")
  topk_rows = planning._topk_rows
  monkeypatch.setattr(
    planning, "_topk_rows", lambda p, mb: (topk_rows(p, mb)[0] + 1, topk_rows(p, mb)[1])
  )
  monkeypatch.setattr(planning, "select_blocks", select)
  jax.clear_caches()
  poisoned = pol.plan(q, k, mod, planner="dense")
  jax.clear_caches()
  for x, y, z in zip(*(jax.tree_util.tree_leaves(p) for p in (fast, topk, poisoned)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if name != "grid":
      np.testing.assert_array_equal(np.asarray(x), np.asarray(z))


def _count_prims(jaxpr, name):
  """Occurrences of primitive `name` in a (closed) jaxpr and every jaxpr nested in it."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for val in eqn.params.values():
      for sub in val if isinstance(val, tuple | list) else (val,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          n += _count_prims(sub, name)
  return n


@pytest.mark.parametrize("case", ["b2_gqa_interleaved_f32", "text_f32_bk32"])
@pytest.mark.parametrize("name", ["2d_boundary", "q_boundary"])
def test_empty_top_k_is_skipped_with_the_same_plan(name, case, monkeypatch):
  """The pooled-score top-k of a component without a real query or key (2d_boundary's ids
  never named; vision pairs on text-only input) sits in a cond that stays a branch under
  the plan's vmap, and the plans equal the ones computed with every top-k run."""
  from mmjax import planning

  b, t, n, kh, h, dtype, modk, bq, bk = CASES[case]
  q, k, _, mod = helpers.random_inputs(11, b, t, n, kh, h, dtype, modk)
  pol = _policy(name, n, bq, bk)
  monkeypatch.setattr(planning, "SKIP_EMPTY_TOPK", True)  # (off by default on a GPU)
  jax.clear_caches()
  skipped = pol.plan(q, k, mod)
  mod = jnp.zeros((b, t), jnp.int32) if mod is None else mod
  trace = jax.make_jaxpr(lambda q, k: P._plan_impl(pol, q, k, mod))
  jaxpr = trace(q, k)
  n_cond = _count_prims(jaxpr, "cond")
  monkeypatch.setattr(planning, "SKIP_EMPTY_TOPK", False)
  jax.clear_caches()
  every = pol.plan(q, k, mod)
  n_cond_every = _count_prims(trace(q, k), "cond")
  jax.clear_caches()
  # a cond per scored component (a vmapped cond with a batched predicate becomes a select)
  assert n_cond > n_cond_every
  for x, y in zip(*(jax.tree_util.tree_leaves(p) for p in (skipped, every)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
