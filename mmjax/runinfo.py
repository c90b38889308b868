"""What every run writes beside its results: config, git commit, versions, device."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import uuid

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


def write_atomic(path: str, text: str) -> None:
  """Writes path whole or not at all, also with several writers at once.

  The temporary name is unique across processes, threads and hosts sharing a filesystem
  (a pid alone is not), and os.replace is atomic: readers see the old or the new file.
  """
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  try:
    with open(tmp, "x") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_run_files(workdir: str, config_dict: dict, seed: int | None = None) -> None:
  """Writes config.json and manifest.json into workdir (created if needed), each
  atomically (the shards of a sweep write the same workdir's)."""
  # the manifest first: a workdir inside the checkout would otherwise count its own new
  # config.json as a change to the code (git_dirty)
  man = json.dumps(manifest(seed), indent=2, sort_keys=True)
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps(config_dict, indent=2, sort_keys=True)
  write_atomic(os.path.join(workdir, "config.json"), text)
  write_atomic(os.path.join(workdir, "manifest.json"), man)


def xla_flags_with_device_count(flags: str, count: int) -> str:
  """XLA_FLAGS `flags` with --xla_force_host_platform_device_count set to `count` (for a
  child process that needs `count` CPU devices)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags)
  return " ".join([*flags.split(), f"--xla_force_host_platform_device_count={count}"])


# ----------------------------------------------------------------------------------------
# compiled programs held by a long-lived process
# ----------------------------------------------------------------------------------------
# Every executable XLA's CPU backend compiles keeps its code in memory mappings of its own
# (a few per small program, hundreds for a model's prefill), and jax's caches keep every
# executable alive. Linux caps a process's mappings (vm.max_map_count, 65530 by default);
# at the cap the next compile aborts the process (SIGABRT, no message). A process that
# compiles many programs (a sweep's items, a test session) drops jax's caches now and then.
MAX_MAP_FRACTION = 0.5


def memory_map_count() -> int | None:
  """How many memory mappings this process holds (None where /proc is missing)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def max_map_count() -> int:
  """The kernel's cap on a process's mappings (65530 where it cannot be read)."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 65530


def release_compiled(fraction: float = MAX_MAP_FRACTION, force: bool = False) -> bool:
  """Drops jax's compiled programs when this process's mappings pass `fraction` of the cap.

  Args:
    fraction: the share of `max_map_count()` above which the caches are dropped.
    force: drop them whatever the count.

  Returns:
    Whether the caches were dropped. Results do not change: a program dropped here is
    compiled again, to the same code, when next called.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  if not force:
    n = memory_map_count()
    if n is None or n < fraction * max_map_count():
      return False
  jax.clear_caches()
  gc.collect()
  return True
