"""Every config in configs/ loads with each documented arg; smoke args run on the CPU."""

import importlib
import json
import pkgutil

import jax
import numpy as np
import pytest

import configs
from mmjax import ablation, bench, policies

CONFIG_ARGS = {
  "ablate_model": ("", "smoke"),
  "ablate_policies": ("", "smoke"),
  "answer": ("", "smoke"),
  "bench_attention": ("", "xla", "smoke"),
  "bench_prefill": ("", "smoke"),
  "bench_sharded": ("", "one", "smoke"),
  "niah": ("", "text", "smoke"),
  "search_patterns": ("", "model", "smoke"),
  "sweep_block_size": ("", "smoke", "hopper"),
  "sweep_budget": ("", "smoke"),
}


def test_every_config_is_listed():
  found = {m.name for m in pkgutil.iter_modules(configs.__path__)}
  assert found == set(CONFIG_ARGS), "add new configs (and their args) to CONFIG_ARGS"


@pytest.mark.parametrize("name", list(CONFIG_ARGS))
def test_config_loads_with_every_arg(name):
  mod = importlib.import_module(f"configs.{name}")
  for arg in CONFIG_ARGS[name]:
    cfg = mod.get_config(arg)
    json.dumps(ablation.config_to_dict(cfg))
    assert "`" not in str(arg)
  with pytest.raises(ValueError, match="unknown arg"):
    mod.get_config("no-such-arg")


def test_bench_smoke_runs(tmp_path):
  cfg = importlib.import_module("configs.bench_attention").get_config("smoke")
  # the config's smoke run has two lengths (a line per policy in its plot); the first here
  assert len(cfg.lengths) == 2
  cfg.lengths = cfg.lengths[:1]
  rows = bench.run(cfg, str(tmp_path), progress=False)
  assert len(rows) == len(cfg.lengths) * len(cfg.policies)
  for r in rows:
    assert 0 < r["density"] <= 1 and r["baseline_ms"] > 0 and r["total_ms"] > 0
    assert r["plan_share"] == r["plan_ms"] / (r["plan_ms"] + r["kernel_ms"])
    assert "scheduling_mode=CONCURRENT" in r["plan_options"]  # smoke lengths are short
  assert (tmp_path / "bench.json").exists() and (tmp_path / "table.md").exists()
  # rows.jsonl: each row written as it was timed, the same rows as bench.json's
  lines = (tmp_path / "rows.jsonl").read_text().splitlines()
  saved = json.loads((tmp_path / "bench.json").read_text())
  assert [json.loads(line) for line in lines] == saved["rows"]
  recorded = saved["planner_settings"]
  assert recorded["score_topk_impl"] == "xla" and recorded["mass_p_dtype"] == "float32"
  assert (tmp_path / "speedup.png").exists() and (tmp_path / "plan_share.png").exists()
  # past concurrent_plan_max_len the plan programs compile with XLA's defaults
  assert bench.plan_compiler_options(cfg, cfg.concurrent_plan_max_len + 1) is None
  cfg.plan_no_command_buffers_from = cfg.concurrent_plan_max_len + 1
  assert bench.plan_compiler_options(cfg, cfg.concurrent_plan_max_len + 1) == {
    "xla_gpu_enable_command_buffer": ""
  }
  assert bench.plan_compiler_options(cfg, cfg.concurrent_plan_max_len) is not None
  # the command-buffer types of the named policies' plans only (mminference's row above
  # compiled with them: XLA parsed them)
  n = cfg.concurrent_plan_max_len
  assert (
    "CONDITIONAL"
    in bench.plan_compiler_options(cfg, n, "mminference")["xla_gpu_enable_command_buffer"]
  )
  assert "xla_gpu_enable_command_buffer" not in bench.plan_compiler_options(cfg, n, "grid")
  # and their plan_command_buffer_options, parsed (a bool here)
  assert (
    bench.plan_compiler_options(cfg, n, "mminference")["xla_gpu_enable_cub_radix_sort"] is False
  )
  assert "xla_gpu_enable_cub_radix_sort" not in bench.plan_compiler_options(cfg, n, "grid")
  assert bench.parse_compiler_options("a=1;b=true;c=x;") == {"a": 1, "b": True, "c": "x"}
  with pytest.raises(ValueError, match=r"plan_command_buffer_options: 'name=value"):
    cfg.plan_command_buffer_options = "xla_gpu_enable_cub_radix_sort"
    bench.plan_compiler_options(cfg, n, "mminference")
  cfg.plan_command_buffer_options = ""
  assert "CONDITIONAL" in rows[-1]["plan_options"] and rows[-1]["policy"] == "mminference"
  cfg.plan_command_buffers_policies = ("grids",)
  with pytest.raises(ValueError, match=r"unknown policies \['grids'\]"):
    bench.plan_compiler_options(cfg, n, "grid")
  with pytest.raises(ValueError, match=r"unknown policies \['grids'\]"):
    bench.check_policies(cfg)
  # (XLA parses the option: an unknown value would raise here)
  jax.jit(lambda x: x + 1, compiler_options=bench.NO_COMMAND_BUFFERS)(np.ones(2))
  cfg.plan_no_command_buffers_from = cfg.concurrent_plan_max_len
  with pytest.raises(ValueError, match="make the ranges disjoint"):
    bench.plan_compiler_options(cfg, cfg.concurrent_plan_max_len)


@pytest.mark.parametrize(
  "policies, match",
  [
    (("(block_sparse,q_boundary)",), "unknown policies"),  # an unquoted flag tuple
    ((), "non-empty tuple"),
    (("mminference",), "cycles the other names"),
  ],
)
def test_bench_checks_policies_before_timing(policies, match, tmp_path):
  cfg = importlib.import_module("configs.bench_attention").get_config("smoke")
  cfg.policies = policies
  with pytest.raises(ValueError, match=match):
    bench.run(cfg, str(tmp_path), progress=False)
  assert not (tmp_path / "bench.json").exists()


def test_bench_applies_the_planner_settings(monkeypatch):
  """cfg.planner's non-empty entries hold during the run (planning.settings) and are
  restored after; unknown names and bad values raise before anything runs."""
  from mmjax import planning

  cfg = importlib.import_module("configs.bench_attention").get_config("smoke")
  cfg.planner.score_impl, cfg.planner.score_topk_impl = "pallas", "pallas"
  cfg.planner.mass_p_dtype = "float16"
  monkeypatch.setattr(bench, "_run", lambda *a: planning.kernel_settings_dict())
  during = bench.run(cfg, None, progress=False)
  assert (during["score_topk_impl"], during["mass_p_dtype"]) == ("pallas", "float16")
  assert during["score_topk_sort"] == planning.SCORE_TOPK_SORT  # (None: as planning has it)
  assert planning.SCORE_TOPK_IMPL is None and planning.MASS_P_DTYPE == "float32"
  cfg.planner.score_topk_sort = not planning.SCORE_TOPK_SORT
  assert bench.run(cfg, None, progress=False)["score_topk_sort"] == cfg.planner.score_topk_sort
  with pytest.raises(ValueError, match="takes True or False"):
    with planning.settings(score_topk_sort="0"):
      pass
  cfg.planner.mass_p_dtype = "bfloat16"
  with pytest.raises(ValueError, match="MASS_P_DTYPE must be one of"):
    bench.run(cfg, None, progress=False)
  assert planning.MASS_P_DTYPE == "float32" and planning.SCORE_IMPL is None
  with pytest.raises(ValueError, match="unknown"):
    with planning.settings(fast=True):
      pass


def test_bench_mminference_cycle_table():
  """The benchmark's mminference (no kwargs) gives head i policies[i % 6] at its default
  budget; with no other policy to cycle through it says so."""
  mod = importlib.import_module("configs.bench_attention")
  cfg = mod.get_config("")
  pol = bench.cycle_table_policy(cfg, 28)
  row = pol.table[0]
  assert len(row) == 28
  for i, p in enumerate(row):
    want = policies.get(mod.POLICIES[i % 6], block_q=cfg.block_q, block_k=cfg.block_k)
    assert p == want, (i, p, want)
  cfg.policies = ("mminference",)
  with pytest.raises(ValueError, match="needs other names"):
    bench.cycle_table_policy(cfg, 28)
  # timed alone, with the usual table: the names to cycle given
  cfg.mminference_cycle = mod.POLICIES
  bench.check_policies(cfg)
  assert bench.cycle_table_policy(cfg, 28).table == pol.table
  cfg.mminference_cycle = ("grid", "mminference")
  with pytest.raises(ValueError, match="mminference_cycle names"):
    bench.check_policies(cfg)


def test_bench_heads_per_step_follows_the_length():
  """plan_step_tokens // T heads per plan step (0 = all heads once they fit); without it,
  heads_per_step; the mminference table policy gets the same."""
  cfg = importlib.import_module("configs.bench_attention").get_config("")
  assert cfg.plan_step_tokens == 28 * 1048576
  lengths = (131072, 524288, 1048576, 2097152, 32 * 1048576)
  got = {t: bench.heads_per_step(cfg, t, 28) for t in lengths}
  assert got == {131072: 0, 524288: 0, 1048576: 0, 2097152: 14, 32 * 1048576: 1}
  assert bench.cycle_table_policy(cfg, 28, 2097152).heads_per_step == 14
  cfg.plan_step_tokens, cfg.heads_per_step = 0, 3
  assert bench.heads_per_step(cfg, 131072, 28) == 3


@pytest.mark.slow  # (outside CI's `-m "not slow"`: README, "Run the tests")
def test_bench_prefill_smoke_runs(tmp_path):
  from mmjax.models import bench as model_bench

  cfg = importlib.import_module("configs.bench_prefill").get_config("smoke")
  cfg.policies = ("a_shape", "2d_boundary")  # two are enough to run every code path here
  rows = model_bench.run(cfg, str(tmp_path), progress=False)
  assert [r["policy"] for r in rows] == ["dense", "a_shape", "2d_boundary"]
  for r in rows:
    assert "error" not in r, r
    assert r["ms"] > 0 and r["speedup"] > 0
  saved = json.loads((tmp_path / "bench.json").read_text())
  assert saved["complete"] and len(saved["rows"]) == 3


@pytest.mark.slow  # (outside CI's `-m "not slow"`: README, "Run the tests")
def test_bench_sharded_smoke_runs(tmp_path):
  """Each item in its own process with as many CPU devices as its mesh."""
  from mmjax.models import bench_sharded

  cfg = importlib.import_module("configs.bench_sharded").get_config("smoke")
  cfg.meshes = (cfg.meshes[0], cfg.meshes[-1])  # 1 device and 1 x 2 x 2
  rows = bench_sharded.run(cfg, str(tmp_path), progress=False)
  assert [r.get("error") for r in rows] == [None, None], rows
  one, four = rows
  assert (one["devices"], four["devices"]) == (1, 4)
  assert four["speedup_vs_one"] > 0 and one["speedup_vs_one"] == 1.0
  # sequence + tensor parallel: less memory per device than one device needs
  assert four["compiled_total_gb"] < one["compiled_total_gb"]
  saved = json.loads((tmp_path / "bench.json").read_text())
  assert saved["complete"] and (tmp_path / "manifest.json").exists()


def test_search_smoke_runs(tmp_path):
  from mmjax import search

  cfg = importlib.import_module("configs.search_patterns").get_config("smoke")
  table = search.run(cfg, str(tmp_path), progress=False)
  assert len(table["layers"]) == 1 and len(table["heads"][0]) == len(cfg.head_kinds)
  assert (tmp_path / "pattern_table.json").exists() and (tmp_path / "table.md").exists()
