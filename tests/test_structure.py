"""Planted structure: each policy keeps >= 90% of the attention mass of the head kind it
is made for at its default budget; grid finds the planted stride; boundary policies group
modalities and invert exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

import mmjax
from mmjax import ablation, synthetic
from mmjax import policies as P
from tests import helpers

pytestmark = pytest.mark.xla_optimized  # T = 6656: the programs' run time dominates


@pytest.fixture(scope="module")
def batch():
  return synthetic.make_batch(seed=0)  # T = 6656: 24 frames of 16x16 patches + text


@pytest.fixture(scope="module")
def dense(batch):
  return mmjax.sparse_attention(
    batch.q, batch.k, batch.v, P.get("dense"), batch.modality, return_lse=True
  )


@pytest.mark.parametrize("kind", synthetic.HEAD_KINDS)
def test_policy_keeps_its_structure(batch, dense, kind):
  head = batch.head_kinds.index(kind)
  m = ablation.evaluate(P.get(kind), batch, dense=dense)
  assert m["head_recall"][head] >= 0.9, (kind, m["head_recall"], m["head_density"])
  assert m["head_density"][head] < 0.8, (kind, m["head_density"])


def test_mminference_oracle_table_keeps_every_head(batch, dense):
  m = ablation.evaluate(
    ablation.build_policy("mminference", {"table": "oracle"}, batch.head_kinds), batch, dense=dense
  )
  assert min(m["head_recall"]) >= 0.9, m["head_recall"]
  assert m["density"] < 0.6


def test_a_policy_misses_structure_it_is_not_made_for(batch, dense):
  # the metric can fail: local windows lose the grid head's frame-to-frame lines.
  m = ablation.evaluate(P.get("a_shape"), batch, dense=dense)
  assert m["head_recall"][batch.head_kinds.index("grid")] < 0.8


def test_grid_recovers_planted_stride(batch):
  plan = P.get("grid").plan(batch.q, batch.k, batch.modality)
  head = batch.head_kinds.index("grid")
  assert int(plan.aux["stride"][0, head]) == batch.layout.frame_stride  # 16*16 + 16 text
  plan2d = P.get("2d_boundary").plan(batch.q, batch.k, batch.modality)
  for kind in ("grid", "2d_boundary"):
    h = batch.head_kinds.index(kind)
    # inside the vision group the text is gone: the stride is the frame's patch count.
    assert int(plan2d.aux["stride_1"][0, h]) == batch.layout.frame_tokens


@pytest.mark.parametrize(
  "layout",
  [
    synthetic.VideoLayout(
      frames=6, height=6, width=8, text_prefix=10, text_between=5, text_suffix=20
    ),
    synthetic.VideoLayout(
      frames=5, height=10, width=10, text_prefix=40, text_between=0, text_suffix=30
    ),
  ],
)
def test_grid_stride_on_other_layouts(layout):
  b = synthetic.make_batch(seed=1, layout=layout, head_kinds=("grid",))
  plan = P.get("grid", min_stride=8).plan(b.q, b.k, b.modality)
  assert int(plan.aux["stride"][0, 0]) == layout.frame_stride


def _check_grouping(perm, mod, t):
  perm = np.asarray(perm)
  mod = np.asarray(mod)
  real = perm[perm < t]
  assert sorted(perm.tolist()) == list(range(len(perm))), "not a permutation"
  assert (perm[:t] < t).all(), "padding must come after every real token"
  mods = mod[real]
  assert (np.diff(mods) >= 0).all(), "modalities are not contiguous"
  for m in np.unique(mods):
    assert (np.diff(real[mods == m]) > 0).all(), "order inside a modality is not kept"


def test_boundary_policies_group_and_invert(batch):
  t = batch.layout.seq_len
  mod = batch.modality[0]
  qb = P.get("q_boundary").plan(batch.q, batch.k, batch.modality)
  assert qb.k_perm is None
  for n in range(qb.num_heads):
    _check_grouping(qb.q_perm[0, n], mod, t)
  tb = P.get("2d_boundary", patterns={(0, 0): "a_shape", (1, 1): "a_shape"}).plan(
    batch.q, batch.k, batch.modality
  )
  np.testing.assert_array_equal(np.asarray(tb.q_perm), np.asarray(tb.k_perm))
  for n in range(tb.num_heads):
    _check_grouping(tb.q_perm[0, n], mod, t)


def test_permuted_plans_invert_exactly():
  # outputs come back in original order: the xla backend's output equals the reference's
  # (which works in original positions) on a small planted input.
  layout = synthetic.VideoLayout(
    frames=4, height=6, width=6, text_prefix=12, text_between=6, text_suffix=12
  )
  b = synthetic.make_batch(seed=2, layout=layout, head_kinds=("grid", "2d_boundary"))
  for pol in (
    P.get("grid", block_q=16, block_k=16, min_stride=8, band_tokens=16, top_k_blocks=1),
    helpers.small_policies()["2d_boundary"],
    helpers.small_policies()["q_boundary"],
  ):
    plan = pol.plan(b.q, b.k, b.modality)
    assert plan.q_perm is not None
    ref = mmjax.sparse_attention(b.q, b.k, b.v, plan=plan, backend="reference")
    out = mmjax.sparse_attention(b.q, b.k, b.v, plan=plan, backend="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    assert float(plan.density()) < 1.0
    inv = np.argsort(np.asarray(plan.q_perm), axis=-1)
    np.testing.assert_array_equal(
      np.take_along_axis(np.asarray(plan.q_perm), inv, -1),
      np.broadcast_to(np.arange(plan.padded_len), inv.shape),
    )


def test_synthetic_is_deterministic():
  a = synthetic.make_batch(seed=3, layout=synthetic.VideoLayout(frames=2, height=4, width=4))
  b = synthetic.make_batch(seed=3, layout=synthetic.VideoLayout(frames=2, height=4, width=4))
  assert jnp.array_equal(a.q, b.q) and jnp.array_equal(a.k, b.k)
