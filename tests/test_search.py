"""The offline pattern search: its selection rule, its table, and the planted suite."""

import json

import numpy as np
import pytest

from mmjax import policies, search, synthetic


def _cands(patterns=("a_shape", "grid"), scales=(0.5, 1.0)):
  return search.candidates(patterns, scales)


def test_scale_budget_scales_every_part():
  p = search.scale_budget(policies.get("2d_boundary"), 0.5)
  base = policies.get("2d_boundary")
  assert p.cross.top_k_blocks == base.cross.top_k_blocks // 2
  assert p.default.local_tokens == base.default.local_tokens // 2
  for (m, a), (_, b) in zip(p.patterns, base.patterns, strict=True):
    for f in search.BUDGET_FIELDS[a.name]:
      assert getattr(a, f) == max(1, round(getattr(b, f) * 0.5)), (m, f)
  with pytest.raises(ValueError, match="scale must be"):
    search.scale_budget(base, 0)


def test_recall_at_budget_interpolates():
  rec, den = np.array([0.5, 0.9]), np.array([0.1, 0.5])
  assert search.recall_at_budget(rec, den, 0.3) == pytest.approx(0.7)
  assert search.recall_at_budget(rec, den, 0.8) == pytest.approx(0.9)
  assert search.recall_at_budget(rec, den, 0.05) == -np.inf


def test_choose_prefers_the_simpler_pattern_within_tie():
  cands = _cands()  # a_shape@0.5, a_shape@1, grid@0.5, grid@1
  den = np.array([[0.2], [0.4], [0.2], [0.4]])
  rec = np.array([[0.90], [0.95], [0.91], [0.96]])
  (i,) = search.choose(rec, den, cands, max_density=0.4, tie=0.02)
  assert cands[i].label() == "a_shape@1"  # grid is better by 0.01 < tie
  (i,) = search.choose(rec, den, cands, max_density=0.4, tie=0.005)
  assert cands[i].label() == "grid@1"
  # a tight budget: the recall at density 0.2 decides, and the budget at 0.2 is taken
  rec2 = np.array([[0.80], [0.99], [0.90], [0.91]])
  (i,) = search.choose(rec2, den, cands, max_density=0.2, tie=0.01)
  assert cands[i].label() == "grid@0.5"
  # nothing fits: the cheapest candidate
  (i,) = search.choose(rec, den + 0.5, cands, max_density=0.3, tie=0.01)
  assert den[i, 0] == den.min()


def test_bad_search_configs_raise():
  with pytest.raises(ValueError, match="cannot be a search candidate"):
    search.candidates(("dense",), (1.0,))
  with pytest.raises(ValueError, match="not searched"):
    search.candidates(("a_shape",), (1.0,), {"grid": {}})
  with pytest.raises(ValueError, match="max_density"):
    search.SearchConfig(max_density=0)


def test_table_loads_as_mminference_and_plans(tmp_path):
  layout = synthetic.VideoLayout(
    frames=4, height=8, width=8, text_prefix=32, text_between=8, text_suffix=32
  )
  kinds = ("a_shape", "grid")
  layers = search.synthetic_layers(layout, kinds, 2, seed=0, head_dim=128)
  cfg = search.SearchConfig(
    patterns=("a_shape", "block_sparse", "grid"),
    scales=(0.25, 1.0),
    max_density=0.5,
    sample_blocks=2,
    block=16,
    overrides={p: {"block_q": 16, "block_k": 16} for p in ("a_shape", "block_sparse", "grid")},
  )
  table = search.search(layers, 2, cfg, progress=False, meta={"model": "test"})
  assert len(table["layers"]) == 2 and all(len(r) == 2 for r in table["layers"])
  for row in table["heads"]:
    for h in row:
      assert 0 < h["recall"] <= 1.0 + 1e-6 and 0 < h["density"] <= 1
  path = tmp_path / "t.json"
  search.save_table(table, str(path))
  pol = policies.get("mminference", table_path=str(path), layer=1, block_q=16, block_k=16)
  q, k, mod = layers(1)
  plan = pol.plan(q, k, mod)
  # the plan's per-head density is the one the search recorded for the chosen candidates
  got = np.asarray(plan.head_density().mean(0))
  want = [h["density"] for h in table["heads"][1]]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert json.loads(path.read_text())["model"] == "test"


@pytest.mark.slow
@pytest.mark.xla_optimized  # T = 6656: the programs' run time dominates
def test_search_recovers_planted_patterns():
  """Two seeds x six planted heads at the default layout: >= 90% get their own pattern.
  (Scale 4: a grid reaches the 0.4 budget only there since its sinks are columns.)"""
  layout = synthetic.VideoLayout()
  layers = search.synthetic_layers(layout, synthetic.HEAD_KINDS, 2, seed=0)
  cfg = search.SearchConfig(scales=(0.5, 1.0, 2.0, 4.0))
  table = search.search(layers, 2, cfg, progress=False)
  got = [h["pattern"] for row in table["heads"] for h in row]
  want = list(synthetic.HEAD_KINDS) * 2
  acc = np.mean([g == w for g, w in zip(got, want, strict=True)])
  assert acc >= 0.9, list(zip(got, want, strict=True))
  assert search.mean_density(table) < 0.5


def test_eval_suite_sizes():
  from mmjax.eval import suite

  for name, want in (("4k", 4096), ("16k", 16384), ("64k", 65536), ("128k", 131072)):
    t = suite.layout(name).seq_len
    assert 0.9 * want <= t <= want, (name, t)
  b = suite.batch("4k", head_kinds=("grid",))
  assert b.q.shape[1] == suite.layout("4k").seq_len and int(b.modality.sum()) == 14 * 256
  with pytest.raises(ValueError, match="size"):
    suite.layout("1m")
