"""What every run writes beside its results: config, git commit, versions, device."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "numpy",
  "ml-collections",
  "absl-py",
  "orbax-checkpoint",
  "mmjax",
)


def _git(*args) -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(
      ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def manifest(seed: int | None = None) -> dict:
  """Git commit (and dirty flag), package versions, device, XLA flags, seed, command."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return {
    "git_commit": _git("rev-parse", "HEAD") or None,
    "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    "versions": versions,
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in devices],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "seed": seed,
    "command": " ".join(sys.argv),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def write_run_files(workdir: str, config_dict: dict, seed: int | None = None) -> None:
  """Writes config.json and manifest.json into workdir (created if needed)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, "manifest.json"), "w") as f:
    json.dump(manifest(seed), f, indent=2, sort_keys=True)
