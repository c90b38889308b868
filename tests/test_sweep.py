"""Sweeps: items, names, overrides, resuming, shards, summaries, the configs, the report."""

import csv
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import sweep_block_size, sweep_budget
from mmjax import plotting, report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_CONFIGS = {"sweep_budget": sweep_budget, "sweep_block_size": sweep_block_size}


# ----------------------------------------------------------------------------------------
# a fake runner: fast, counts its calls, can fail at a given call
# ----------------------------------------------------------------------------------------
def _base():
  c = ml_collections.ConfigDict()
  c.runner = "fake"
  c.seed = 0
  c.x = 1
  c.scale = 1.0
  c.name = "a"
  c.sub = ml_collections.ConfigDict({"y": 2, "flag": False})
  return c


def _fake_runners(calls, fail_at=None):
  def run(cfg, workdir):
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.path.exists(os.path.join(workdir, "manifest.json"))
    assert not os.path.exists(os.path.join(workdir, sweep.DONE))
    calls.append(os.path.basename(workdir))
    if fail_at is not None and len(calls) == fail_at:
      open(os.path.join(workdir, "stale"), "w").close()  # half-written output
      raise RuntimeError("killed mid-item")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for p in ("p", "q"):
        f.write(json.dumps({"policy": p, "value": cfg.x * cfg.sub.y + cfg.seed / 3}) + "\n")

  def read(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  return {"fake": sweep.Runner(run=run, read_rows=read, columns=("policy", "value"))}


ITEMS = sweep.product(x=[1, 2, 3], **{"sub.y": [5, 7]}, seed=[0, 1])  # 12 items


# ----------------------------------------------------------------------------------------
# items, names, overrides
# ----------------------------------------------------------------------------------------
def test_product_order_zip_and_errors():
  items = sweep.product(
    budget=[{"a.k": 1, "a.j": 2}, {"a.k": 3, "a.j": 4}], **{"layout.frames": [8, 16]}
  )
  assert items == [
    {"a.k": 1, "a.j": 2, "layout.frames": 8},
    {"a.k": 1, "a.j": 2, "layout.frames": 16},
    {"a.k": 3, "a.j": 4, "layout.frames": 8},
    {"a.k": 3, "a.j": 4, "layout.frames": 16},
  ]
  assert sweep.product(seed=[0, 1]) == [{"seed": 0}, {"seed": 1}]
  with pytest.raises(ValueError, match="empty"):
    sweep.product(seed=[])
  with pytest.raises(ValueError, match="mixes"):
    sweep.product(seed=[0, {"x": 1}])
  with pytest.raises(ValueError, match="more than one axis"):
    sweep.product(a=[{"seed": 1}], seed=[0])
  with pytest.raises(ValueError, match="list of values"):
    sweep.product(seed=3)


def test_check_items_errors():
  with pytest.raises(ValueError, match="same overrides"):
    sweep.check_items([{"a": 1, "b": 2}, {"b": 2, "a": 1}])
  with pytest.raises(ValueError, match="runner"):
    sweep.check_items([{"runner": "ablate"}])
  with pytest.raises(ValueError, match="bad override key"):
    sweep.check_items([{"a..b": 1}])
  with pytest.raises(ValueError, match="must be None"):
    sweep.check_items([{"a": object()}])
  with pytest.raises(ValueError, match="non-empty list"):
    sweep.check_items([])


def test_item_names_short_safe_unique_deterministic():
  items = [
    {"policies": ("a_shape",), "policy_kwargs.a_shape.local_tokens": 512, "layout.frames": 8},
    {"policies": ("grid",), "policy_kwargs.grid.top_k_blocks": 4, "layout.frames": 8},
    {"policies": ("block_sparse",), "policy_kwargs.block_sparse.top_k_blocks": 4},
    {"x.name": "a/b c"},
    {"x.name": "a_b_c"},  # the same once made safe: both get a hash
    {"long": "v" * 300},
    {},
  ]
  names = sweep.item_names(items)
  assert names[0] == "policies=a_shape,local_tokens=512,frames=8"
  assert names[1] == "policies=grid,top_k_blocks=4,frames=8"
  assert names[-1] == "base"
  assert len({n.lower() for n in names}) == len(names)
  assert names[3] != names[4] and names[3].startswith("name=a_b_c-")
  for n in names:
    assert len(n) <= sweep.MAX_NAME and "/" not in n and " " not in n and n not in (".", "..")
  assert sweep.item_names(items) == names
  # keys clashing inside an item keep a longer suffix
  assert sweep.item_names([{"a.block_q": 1, "b.block_q": 2}]) == ["a.block_q=1,b.block_q=2"]


def test_apply_overrides_lock_like():
  base = _base()
  cfg = sweep.apply_overrides(base, {"x": 5, "sub.y": 9, "scale": 2})
  assert (cfg.x, cfg.sub.y, cfg.scale) == (5, 9, 2.0) and (base.x, base.sub.y) == (1, 2)
  for key in ("nope", "sub.nope", "x.y", "sub.y.z"):
    with pytest.raises(ValueError, match=f"override '{key}'"):
      sweep.apply_overrides(base, {key: 1})
  with pytest.raises(ValueError, match="does not fit"):
    sweep.apply_overrides(base, {"name": 3})
  with pytest.raises(ValueError, match="does not fit"):
    sweep.apply_overrides(base, {"x": 1.5})
  with pytest.raises(ValueError, match="does not fit"):
    sweep.apply_overrides(base, {"sub.flag": 1})
  with pytest.raises(ValueError, match="sub-config"):
    sweep.apply_overrides(base, {"sub": {"y": 1}})


def test_bad_override_fails_before_any_item_runs(tmp_path):
  calls = []
  with pytest.raises(ValueError, match="'sub.nope'"):
    sweep.run(
      _base(),
      [{"x": 1}, {"sub.nope": 1}],
      str(tmp_path),
      progress=False,
      runners=_fake_runners(calls),
    )
  assert calls == []
  with pytest.raises(ValueError, match="unknown runner"):
    sweep.run(_base(), ITEMS, str(tmp_path / "b"), progress=False)
  base = _base()
  del base["runner"]
  with pytest.raises(ValueError, match="runner"):
    sweep.run(base, ITEMS, str(tmp_path / "c"), progress=False, runners=_fake_runners(calls))


# ----------------------------------------------------------------------------------------
# running: resume, shards, summaries
# ----------------------------------------------------------------------------------------
def _done(workdir):
  return sorted(
    n
    for n in os.listdir(os.path.join(workdir, sweep.ITEMS_DIR))
    if os.path.exists(os.path.join(workdir, sweep.ITEMS_DIR, n, sweep.DONE))
  )


def test_interrupted_sweep_resumes_and_runs_each_item_once(tmp_path):
  wd = str(tmp_path)
  names = sweep.item_names(ITEMS)
  calls = []
  with pytest.raises(RuntimeError, match="killed"):
    sweep.run(_base(), ITEMS, wd, progress=False, runners=_fake_runners(calls, fail_at=5))
  assert calls == names[:5]
  assert _done(wd) == sorted(names[:4])
  assert not os.path.exists(os.path.join(wd, "summary.csv"))
  res = sweep.run(_base(), ITEMS, wd, progress=False, runners=_fake_runners(calls))
  completed = calls[:4] + calls[5:]  # the 5th call died
  assert sorted(completed) == sorted(names) and len(set(completed)) == len(names)
  assert res.ran == names[4:] and res.skipped == names[:4] and res.missing == []
  for n in names:
    item = os.path.join(wd, sweep.ITEMS_DIR, n)
    assert not os.path.exists(os.path.join(item, "stale"))  # cleared before the re-run
    assert json.load(open(os.path.join(item, sweep.DONE)))["name"] == n
  summary = open(res.summary).read()
  assert summary.splitlines()[0] == "item,x,sub.y,seed,policy,value"
  assert len(summary.splitlines()) == 1 + 2 * len(names)
  # a third start runs nothing and rewrites the same summary
  res = sweep.run(_base(), ITEMS, wd, progress=False, runners=_fake_runners(calls))
  assert res.ran == [] and len(calls) == len(names) + 1
  assert open(res.summary).read() == summary


def test_shards_partition_the_items(tmp_path):
  wd = str(tmp_path)
  names = sweep.item_names(ITEMS)
  calls, ran = [], []
  for i in range(3):
    res = sweep.run(
      _base(), ITEMS, wd, shard_index=i, num_shards=3, progress=False, runners=_fake_runners(calls)
    )
    assert res.ran == names[i::3]
    ran += res.ran
    assert (res.summary is None) == (i < 2)
    assert len(res.missing) == len(names) - len(ran)
  assert sorted(ran) == sorted(names) and sorted(calls) == sorted(names)
  assert sweep.shard(7, 1, 3) == [1, 4]
  for idx, num in ((3, 3), (-1, 2), (0, 0)):
    with pytest.raises(ValueError, match="shard_index|num_shards"):
      sweep.shard(12, idx, num)


def test_workdir_of_another_sweep_is_refused(tmp_path):
  calls = []
  sweep.run(_base(), ITEMS[:2], str(tmp_path), progress=False, runners=_fake_runners(calls))
  base = _base()
  base.scale = 3.0
  with pytest.raises(ValueError, match="different sweep"):
    sweep.run(base, ITEMS[:2], str(tmp_path), progress=False, runners=_fake_runners(calls))
  with pytest.raises(ValueError, match="different sweep"):
    sweep.run(_base(), ITEMS[:3], str(tmp_path), progress=False, runners=_fake_runners(calls))
  assert len(calls) == 2


def test_summary_of_unfinished_sweep_raises(tmp_path):
  calls = []
  sweep.run(_base(), ITEMS, str(tmp_path), 0, 2, progress=False, runners=_fake_runners(calls))
  with pytest.raises(ValueError, match="not done"):
    sweep.write_summary(str(tmp_path), _fake_runners(calls))
  _, _, rows = sweep.collect(str(tmp_path), _fake_runners(calls), allow_missing=True)
  assert len(rows) == 2 * len(calls)


# ----------------------------------------------------------------------------------------
# the configs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SWEEP_CONFIGS))
def test_sweep_configs_load_and_their_items_apply(name):
  mod = SWEEP_CONFIGS[name]
  for arg in ("", "smoke"):
    cfg = mod.get_config(arg)
    assert cfg.runner in sweep.RUNNERS
    items = sweep.check_items(mod.sweep(arg))
    names = sweep.item_names(items)
    assert len(set(names)) == len(items)
    if arg == "smoke":
      assert 2 <= len(items) <= 4
    for item in items:
      sweep.apply_overrides(cfg, item)
  assert sweep.load_items(f"configs/{name}.py:smoke") == mod.sweep("smoke")
  for fn in (mod.get_config, mod.sweep):
    with pytest.raises(ValueError, match="unknown arg"):
      fn("no-such-arg")


def test_load_items_needs_a_sweep_function(tmp_path):
  with pytest.raises(ValueError, match="no sweep"):
    sweep.load_items("configs/ablate_policies.py:smoke")
  with pytest.raises(ValueError, match="does not exist"):
    sweep.load_items(str(tmp_path / "none.py"))


# ----------------------------------------------------------------------------------------
# end to end on the CPU with the ablate runner
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_smoke(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("sweep_budget_smoke"))
  res = sweep.run(sweep_budget.get_config("smoke"), sweep_budget.sweep("smoke"), wd, progress=False)
  return wd, res


def test_budget_smoke_runs_and_reproduces(budget_smoke, tmp_path):
  wd, res = budget_smoke
  assert len(res.ran) == 4 and res.missing == []
  lines = open(res.summary).read().splitlines()
  assert lines[0] == (
    "item,policies,policy_kwargs.a_shape.local_tokens,layout.frames,"
    "policy,seq_len,density,recall,min_head_recall,rel_error"
  )
  assert len(lines) == 5
  for n in res.names:
    for f in ("config.json", "manifest.json", "metrics.jsonl", sweep.DONE):
      assert os.path.exists(os.path.join(wd, sweep.ITEMS_DIR, n, f)), (n, f)
  item_cfg = json.load(open(os.path.join(wd, sweep.ITEMS_DIR, res.names[1], "config.json")))
  assert item_cfg["layout"]["frames"] == 4 and item_cfg["policy_kwargs"]["a_shape"]["local_tokens"]
  again = sweep.run(
    sweep_budget.get_config("smoke"), sweep_budget.sweep("smoke"), str(tmp_path), progress=False
  )
  for f in ("summary.csv", "summary.md"):
    assert open(os.path.join(wd, f), "rb").read() == open(os.path.join(tmp_path, f), "rb").read()
  assert again.names == res.names


def test_report_from_smoke_sweep(budget_smoke, tmp_path, monkeypatch):
  wd, _ = budget_smoke
  path = report.write_report(wd, str(tmp_path / "with"))
  text = open(path).read()
  for png in (report.RECALL_PNG, report.ERROR_PNG):
    assert f"]({png})" in text
    assert os.path.getsize(tmp_path / "with" / png) > 1000
  assert "| 208 | a_shape | local_tokens=64 |" in text and "| a_shape | local_tokens=128 |" in text
  assert "T=208" in text and "T=352" in text
  monkeypatch.setattr(plotting, "pyplot", lambda path: None)
  text = open(report.write_report(wd, str(tmp_path / "without"))).read()
  assert "No plots" in text and ".png" not in text
  assert not os.path.exists(tmp_path / "without" / report.RECALL_PNG)


def test_report_main(budget_smoke, tmp_path):
  wd, _ = budget_smoke
  res = subprocess.run(
    [sys.executable, "experiments/report.py", f"--workdir={wd}", f"--out={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert "## Recall vs density" in res.stdout and (tmp_path / "report.md").exists()


def test_block_size_smoke_main_in_two_shards(tmp_path):
  wd = tmp_path / "blocks"
  cmd = [
    sys.executable,
    "experiments/sweep.py",
    "--config=configs/sweep_block_size.py:smoke",
    f"--workdir={wd}",
    "--config.seed=3",
    "--num_shards=2",
  ]
  outs = []
  for i in range(2):
    res = subprocess.run(
      cmd + [f"--shard_index={i}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    outs.append(res.stdout)
  assert "2 item(s) not done" in outs[0] and "summary in" in outs[1]
  with open(wd / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["policy"] for r in rows] == ["a_shape", "a_shape", "block_sparse", "block_sparse"]
  assert [r["policy_kwargs.block_sparse.block_q"] for r in rows] == ["", "", "16", "32"]
  names = sweep.item_names(sweep_block_size.sweep("smoke"))
  for n in names:
    item = wd / sweep.ITEMS_DIR / n
    assert json.loads((item / "config.json").read_text())["seed"] == 3
    assert json.loads((item / "manifest.json").read_text())["seed"] == 3
  bad = subprocess.run(
    cmd[:-2] + ["--config.no_such_key=1"], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert bad.returncode != 0 and "no_such_key" in bad.stderr
