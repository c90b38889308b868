"""The README's main job: the ablation config loads, runs its smoke arg, and reproduces."""

import json
import os
import subprocess
import sys

import pytest

from configs import ablate_policies
from mmjax import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_load():
  for arg in ("", "smoke"):
    cfg = ablate_policies.get_config(arg)
    assert cfg.policies[0] == "dense"
  with pytest.raises(ValueError, match="unknown arg"):
    ablate_policies.get_config("huge")


def test_smoke_run_is_reproducible(tmp_path):
  cfg = ablate_policies.get_config("smoke")
  rows = ablation.run(cfg, str(tmp_path / "a"), progress=False)
  assert tuple(r["policy"] for r in rows) == tuple(cfg.policies)
  dense = rows[0]
  assert dense["density"] == 1.0 and dense["rel_error"] == 0.0
  for r in rows:
    assert 0 < r["density"] <= 1 and 0 < r["recall"] <= 1.0 + 1e-6
  ablation.run(cfg, str(tmp_path / "b"), progress=False)
  a = (tmp_path / "a" / "metrics.jsonl").read_bytes()
  b = (tmp_path / "b" / "metrics.jsonl").read_bytes()
  assert a == b
  # the plots (matplotlib comes with the test extra)
  for name in ("recall_vs_density", "attention_grid", "attention_2d_boundary"):
    assert (tmp_path / "a" / f"{name}.png").stat().st_size > 1000, name


def test_attention_map_rejects_bad_heads(tmp_path):
  from mmjax import policies, synthetic

  batch = synthetic.make_batch(
    seed=0, layout=synthetic.VideoLayout(frames=2, height=8, width=8), head_kinds=("grid",)
  )
  with pytest.raises(ValueError, match="heads"):
    ablation.attention_maps(batch, policies.get("grid"), (3,), str(tmp_path / "x.png"))


def test_unknown_policy_kwargs_rejected():
  cfg = ablate_policies.get_config("smoke")
  cfg.policy_kwargs.a_shape = {"window": 3}
  with pytest.raises(ValueError, match="no option"):
    ablation.run(cfg, None, progress=False)


def test_main_writes_its_workdir(tmp_path):
  wd = tmp_path / "run"
  cmd = [
    sys.executable,
    "experiments/ablate.py",
    "--config=configs/ablate_policies.py:smoke",
    f"--workdir={wd}",
    "--config.policies=('dense','a_shape','grid')",
  ]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "| a_shape |" in res.stdout
  for f in ("metrics.jsonl", "config.json", "manifest.json", "table.md"):
    assert (wd / f).exists(), f
  manifest = json.loads((wd / "manifest.json").read_text())
  assert manifest["versions"]["jax"] and manifest["seed"] == 0 and manifest["devices"]
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["policies"] == ["dense", "a_shape", "grid"]
  bad = subprocess.run(
    cmd[:-1] + ["--config.no_such_key=1"], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert bad.returncode != 0 and "no_such_key" in bad.stderr
