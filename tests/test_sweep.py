"""Sweeps: items, names, overrides, resuming, shards, summaries, the configs, the report,
local worker processes and hosts."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags

from configs import sweep_block_size, sweep_budget
from mmjax import plotting, report, runinfo, sweep

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


@pytest.mark.skipif(runinfo.memory_map_count() is None, reason="needs /proc/self/maps")
def test_compiled_programs_are_dropped_above_the_mapping_cap(tmp_path, monkeypatch):
  """Compiled programs hold memory mappings until jax's caches drop them; a long sweep
  drops them between items once the process nears the kernel's cap."""
  with pytest.raises(ValueError, match="fraction"):
    runinfo.release_compiled(fraction=0)
  runinfo.release_compiled(force=True)
  base = runinfo.memory_map_count()
  fns = [jax.jit(lambda x, i=i: jnp.cumsum(x) * i) for i in range(40)]
  for i, f in enumerate(fns):
    f(jnp.arange(8 + i, dtype=jnp.float32)).block_until_ready()
  held = runinfo.memory_map_count()
  assert held > base + 40, (base, held)
  assert not runinfo.release_compiled(fraction=1.0)  # far below the cap: kept
  assert runinfo.memory_map_count() >= held - 5
  # a sweep item that leaves the process above the cap's fraction drops them
  monkeypatch.setattr(runinfo, "max_map_count", lambda: held)
  calls = []
  sweep.run(_base(), ITEMS[:1], str(tmp_path), progress=False, runners=_fake_runners(calls))
  assert runinfo.memory_map_count() < held - 40


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


@pytest.mark.slow  # (outside CI's `-m "not slow"`: README, "Run the tests")
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


# ----------------------------------------------------------------------------------------
# spreading a sweep: local workers, hosts, shards sharing a workdir
# ----------------------------------------------------------------------------------------
FAKE_CONFIG = '''"""A fake sweep: its runner logs calls, fails on x=3 while FAIL exists."""

import json
import os

import ml_collections

from mmjax import sweep as sweep_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cfg, workdir):
  with open(os.path.join(HERE, "calls.txt"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
  if cfg.x == 3 and os.path.exists(os.path.join(HERE, "FAIL")):
    raise RuntimeError("fake runner: item x=3 fails")
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"value": cfg.x * 10 + cfg.seed}) + "\\n")


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


sweep_lib.RUNNERS["fake_file"] = sweep_lib.Runner(run=_run, read_rows=_read, columns=("value",))


def get_config(arg=None):
  return ml_collections.ConfigDict({"runner": "fake_file", "seed": 0, "x": 0})


def sweep(arg=None):
  return sweep_lib.product(x=[1, 2, 3, 4])
'''
FAKE_NAMES = ["x=1", "x=2", "x=3", "x=4"]


@pytest.fixture
def fake_config(tmp_path, monkeypatch):
  """The fake sweep's config file; its runner is registered in a copy of RUNNERS."""
  monkeypatch.setattr(sweep, "RUNNERS", dict(sweep.RUNNERS))
  path = tmp_path / "fake_sweep.py"
  path.write_text(FAKE_CONFIG)
  return str(path)


def _calls(tmp_path):
  path = tmp_path / "calls.txt"
  return sorted(path.read_text().split()) if path.exists() else []


def _cpu_env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}  # also on a GPU machine


def _items_run_per_log(logs):
  """item name -> how many times the logs say it was run."""
  counts = {}
  for log in logs:
    for line in open(log):
      m = re.match(r"item (\S+) done in ", line)
      if m:
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  return counts


def test_plan_workers_pins_devices_and_splits_shards(fake_config, tmp_path, monkeypatch):
  wd = str(tmp_path / "wd")
  plan = sweep.plan_workers(
    fake_config,
    wd,
    workers=-1,
    devices_per_worker=2,
    platform="gpu",
    devices=["4", "5", "6", "7", "1"],
    extra_flags=["--config.seed=1"],
    shard_index=1,
    num_shards=2,
  )
  assert [w.devices for w in plan] == [("4", "5"), ("6", "7")]
  assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan] == ["4,5", "6,7"]
  assert [(w.shard_index, w.num_shards) for w in plan] == [(1, 4), (3, 4)]
  assert plan[1].log == os.path.join(wd, "workers", "worker_1.log")
  assert plan[0].command[2:] == (
    f"--config={fake_config}",
    f"--workdir={wd}",
    "--config.seed=1",
    "--shard_index=1",
    "--num_shards=4",
    "--workers=0",
    "--noshard_by_process",
  )
  # H hosts x W workers each: every item exactly once
  for hosts, workers, n in ((3, 2, 11), (2, 3, 5), (1, 4, 9)):
    got = []
    for h in range(hosts):
      plan = sweep.plan_workers(
        fake_config, wd, workers=workers, platform="cpu", devices=8, shard_index=h, num_shards=hosts
      )
      got += [i for w in plan for i in sweep.shard(n, w.shard_index, w.num_shards)]
    assert sorted(got) == list(range(n))
  # the CPU: not pinned, jax kept off the GPUs, XLA host devices per worker
  monkeypatch.setenv("XLA_FLAGS", "--a=1 --xla_force_host_platform_device_count=8")
  plan = sweep.plan_workers(
    fake_config, wd, workers=2, devices_per_worker=2, platform="cpu", devices=4
  )
  for w in plan:
    assert "CUDA_VISIBLE_DEVICES" not in w.env and w.env["JAX_PLATFORMS"] == "cpu"
    assert w.env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=2"
  plan = sweep.plan_workers(fake_config, wd, workers=2, platform="cpu", devices=2)
  assert "XLA_FLAGS" not in plan[0].env


def test_launch_refuses_bad_arguments(fake_config, tmp_path):
  wd = tmp_path / "wd"

  def launch(**kw):
    kw = {"workers": 2, "platform": "cpu", "devices": 2, **kw}
    return sweep.launch(kw.pop("config", fake_config), str(wd), **kw)

  bad = [
    ({"workers": 0}, "workers must be an int >= 1"),
    ({"workers": -2}, "workers must be an int >= 1"),
    ({"workers": True}, "workers must be an int >= 1"),
    ({"devices_per_worker": 0}, "devices_per_worker must be"),
    ({"workers": 3}, r"3 worker\(s\) x 1 device\(s\) each need 3 devices; there are 2 CPU"),
    (
      {"workers": 2, "platform": "gpu", "devices": ["0", "1", "2"], "devices_per_worker": 2},
      "need 4 devices; there are 3 GPU",
    ),
    ({"workers": -1, "devices_per_worker": 3}, "cannot give one worker 3"),
    ({"platform": "gpu", "devices": []}, "no local GPU"),
    ({"platform": "tpu"}, "platform must be one of"),
    ({"devices": ["0", "0"]}, "twice"),
    ({"devices": "01"}, "devices must be a count"),
    ({"shard_index": 2, "num_shards": 2}, "shard_index"),
    ({"extra_flags": "--config.seed=1"}, "extra_flags"),
    ({"config": str(tmp_path / "none.py")}, "does not exist"),
    ({"script": str(tmp_path / "none.py")}, "worker script"),
  ]
  for kw, match in bad:
    with pytest.raises(ValueError, match=match):
      launch(**kw)
  assert not wd.exists()  # refused before anything started


def test_local_devices_and_default_platform(monkeypatch):
  smi = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-d1e)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-a2b)\n"
    "  MIG 1g.10gb     Device  0: (UUID: MIG-c3d)\n"
  )
  assert sweep.parse_nvidia_smi(smi) == ["0", "1"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
  assert sweep.local_devices("gpu") == ["2", "3"]
  for hidden in ("", "-1"):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert sweep.local_devices("gpu") == []
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  monkeypatch.setenv("PATH", "")  # no nvidia-smi: no GPU
  assert sweep.local_devices("gpu") == []
  assert len(sweep.local_devices("cpu")) >= 1
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert sweep.default_platform() == "cpu"
  for env, want in (("cpu", "cpu"), ("cuda,cpu", "gpu"), ("gpu", "gpu")):
    monkeypatch.setenv("JAX_PLATFORMS", env)
    assert sweep.default_platform() == want
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  with pytest.raises(ValueError, match="--shard_by_process"):
    sweep.default_platform()
  with pytest.raises(ValueError, match="platform"):
    sweep.local_devices("tpu")


def test_worker_flags_pass_overrides_and_drop_the_launchers():
  fv = flags.FlagValues()
  for name in ("config", "workdir", "coordinator_address", "config.name"):
    flags.DEFINE_string(name, None, "", flag_values=fv)
  for name in ("workers", "devices_per_worker", "shard_index", "num_shards", "config.seed"):
    flags.DEFINE_integer(name, 0, "", flag_values=fv)
  for name in ("shard_by_process", "config.sub.flag"):
    flags.DEFINE_bool(name, False, "", flag_values=fv)
  argv = [
    "--config=c.py:smoke",
    "--config.seed",
    "3",
    "--workers=2",
    "--noconfig.sub.flag",
    "--workdir",
    "/tmp/w",
    "--shard_by_process",
    "--flagfile",
    "more.txt",
    "--config.name=a b",
    "--devices_per_worker",
    "2",
    "--config.sub.flag",
    "--unknown",
    "--",
    "--config.seed=9",
  ]
  assert sweep.worker_flags(argv, fv) == [
    "--config.seed",
    "3",
    "--noconfig.sub.flag",
    "--flagfile",
    "more.txt",
    "--config.name=a b",
    "--config.sub.flag",
    "--unknown",
  ]


def test_process_shard_from_jax_process_index(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 2)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  assert sweep.process_shard() == (2, 3)
  assert sweep.shard(8, *sweep.process_shard()) == [2, 5]
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("init", kw)))
  monkeypatch.setattr(jax.distributed, "shutdown", lambda: calls.append(("shutdown",)))
  assert sweep.distributed_shard("host0:1234", 3, 2) == (2, 3)
  kw = {"coordinator_address": "host0:1234", "num_processes": 3, "process_id": 2}
  assert calls == [("init", kw), ("shutdown",)]  # the hosts run on alone
  monkeypatch.setattr(jax, "process_index", lambda: 3)
  with pytest.raises(ValueError, match="shard_index"):
    sweep.process_shard()
  assert calls[-1] == ("shutdown",)
  with pytest.raises(ValueError, match="shard_index"):
    sweep.distributed_shard()
  assert calls[-1] == ("shutdown",)


def test_concurrent_shards_share_one_workdir(tmp_path):
  """Shards started together write sweep.json, the run files and the summary at once."""
  wd, n = str(tmp_path / "wd"), 6
  calls, errors, results = [], [], [None] * n
  runners = _fake_runners(calls)
  barrier = threading.Barrier(n)

  def one(i):
    barrier.wait()
    try:
      results[i] = sweep.run(_base(), ITEMS, wd, i, n, progress=False, runners=runners)
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  names = sweep.item_names(ITEMS)
  assert sorted(calls) == sorted(names) and _done(wd) == sorted(names)
  assert any(r.summary for r in results)
  one_process = sweep.run(
    _base(), ITEMS, str(tmp_path / "one"), progress=False, runners=_fake_runners([])
  )
  for f in ("summary.csv", "summary.md", sweep.SWEEP_FILE, "config.json"):
    assert open(os.path.join(wd, f)).read() == open(tmp_path / "one" / f).read(), f
  json.load(open(os.path.join(wd, "manifest.json")))
  leftovers = [f for _, _, files in os.walk(wd) for f in files if ".tmp" in f]
  assert leftovers == [] and one_process.summary


def test_launch_smoke_sweep_in_two_workers_matches_one_process(tmp_path):
  config = os.path.join(ROOT, "configs", "sweep_budget.py") + ":smoke"
  items = sweep_budget.sweep("smoke")
  names = sweep.item_names(items)
  base = sweep_budget.get_config("smoke")
  base.attention_maps = ()  # the plan figures cost most of an item's time
  one = sweep.run(base, items, str(tmp_path / "one"), progress=False)
  wd, lines = tmp_path / "two", []
  res = sweep.launch(
    config,
    str(wd),
    workers=2,
    platform="cpu",
    devices=2,
    extra_flags=["--config.attention_maps=()"],
    log=lines.append,
  )
  assert res.summary == str(wd / "summary.csv") and res.missing == [] and res.names == names
  for f in ("summary.csv", "summary.md"):
    assert (wd / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
  assert open(one.summary).read() == open(res.summary).read()
  logs = [str(wd / "workers" / f"worker_{i}.log") for i in range(2)]
  assert [w.log for w in res.workers] == logs
  assert _items_run_per_log(logs) == {n: 1 for n in names}  # each item exactly once
  assert _done(str(wd)) == sorted(names)
  for i, n in enumerate(names):  # by the worker of its shard
    manifest = json.loads((wd / sweep.ITEMS_DIR / n / "manifest.json").read_text())
    assert f"--shard_index={i % 2} --num_shards=2" in manifest["command"]
  assert sum("finished" in line for line in lines) == 2, lines


def test_launch_names_the_failed_worker_and_a_relaunch_finishes(fake_config, tmp_path):
  wd = tmp_path / "wd"
  (tmp_path / "FAIL").touch()
  kw = {"workers": 2, "platform": "cpu", "devices": 2, "log": lambda line: None}
  with pytest.raises(sweep.WorkerError) as err:  # x=3 is worker 0's (shard 0: x=1, x=3)
    sweep.launch(fake_config, str(wd), **kw)
  log0 = str(wd / "workers" / "worker_0.log")
  msg = str(err.value)
  assert msg.startswith(f"1 of 2 sweep worker(s) failed: worker 0 (exit code 1, log {log0})")
  assert "fake runner: item x=3 fails" in msg and "worker_1.log" not in msg
  assert [(w.index, code) for w, code in err.value.failed] == [(0, 1)]
  assert "x=3 fails" in open(log0).read()
  assert _done(str(wd)) == ["x=1", "x=2", "x=4"] and not (wd / "summary.csv").exists()
  (tmp_path / "FAIL").unlink()
  res = sweep.launch(fake_config, str(wd), **kw)
  assert _calls(tmp_path) == sorted(FAKE_NAMES + ["x=3"])  # only the failed item re-ran
  assert "0 item(s) run, 2 already done" in open(res.workers[1].log).read()
  with open(res.summary) as f:
    assert [r["value"] for r in csv.DictReader(f)] == ["10", "20", "30", "40"]


@pytest.mark.slow  # (outside CI's `-m "not slow"`: README, "Run the tests")
def test_main_workers_and_shard_by_process(fake_config, tmp_path):
  # --workers: overrides reach every worker, the launcher prints the summary
  wd = tmp_path / "local"
  cmd = [sys.executable, "experiments/sweep.py", f"--config={fake_config}", f"--workdir={wd}"]
  res = subprocess.run(
    cmd + ["--config.seed", "5", "--workers=2"],
    cwd=ROOT,
    env=_cpu_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert "worker 1 finished" in res.stdout and "summary in" in res.stdout
  with open(wd / "summary.csv") as f:
    assert [r["value"] for r in csv.DictReader(f)] == ["15", "25", "35", "45"]
  assert _items_run_per_log(wd / "workers" / f"worker_{i}.log" for i in range(2)) == {
    n: 1 for n in FAKE_NAMES
  }
  # two processes of one jax.distributed cluster: process i runs shard i of 2
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  wd = tmp_path / "hosts"
  dist = ["--shard_by_process", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [
    subprocess.Popen(
      [*cmd[:3], f"--workdir={wd}", *dist, f"--process_id={i}"],
      cwd=ROOT,
      env=_cpu_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  for i, (out, _) in enumerate(outs):
    assert f"process {i} of 2: shard {i}/2" in out
  assert _calls(tmp_path) == sorted(FAKE_NAMES * 2)  # each item once per sweep
  assert (wd / "summary.csv").exists()
  bad = subprocess.run(
    cmd + ["--shard_by_process", "--workers=2"], cwd=ROOT, capture_output=True, text=True
  )
  assert bad.returncode != 0 and "--shard_by_process takes neither" in bad.stderr


def test_manifest_describes_the_code_before_the_run_files(tmp_path, monkeypatch):
  """write_run_files takes the manifest before it writes config.json: a workdir inside
  the checkout must not count its own new config.json as a change (git_dirty)."""
  cfg_file = tmp_path / "config.json"

  def fake_git(*args):
    if args[0] == "rev-parse":
      return "0" * 40
    return " M results/config.json" if cfg_file.exists() else ""  # (git status)

  monkeypatch.setattr(runinfo, "_git", fake_git)
  runinfo.write_run_files(str(tmp_path), {"seed": 0}, 0)
  man = json.loads((tmp_path / "manifest.json").read_text())
  assert man["git_dirty"] is False and man["git_commit"] == "0" * 40
  assert json.loads(cfg_file.read_text()) == {"seed": 0}
  runinfo.write_run_files(str(tmp_path), {"seed": 1}, 1)  # (a dirty tree says so)
  assert json.loads((tmp_path / "manifest.json").read_text())["git_dirty"] is True
