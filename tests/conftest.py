"""Shared pytest setup. Importing mmjax first sets the XLA flags it needs (see
mmjax/_xla_flags.py) before any test starts a jax backend."""

import importlib.metadata
import os
import sys


# The tests compile thousands of small programs and run most of them once or twice, so
# XLA's compile time is most of the suite's: `jax_disable_most_optimizations` (LLVM at
# level 0) takes about a quarter off it. Tests that run large programs (marked
# `xla_optimized`) compile with the optimizations. Child processes the tests start get it
# through the environment. MMJAX_TEST_XLA_OPT=1, or jax with a CUDA plugin (the GPU
# machine), keeps the defaults.
def _cuda_plugin() -> bool:
  names = (d.metadata.get("Name") or "" for d in importlib.metadata.distributions())
  return any(n.lower().replace("_", "-").startswith("jax-cuda") for n in names)


OPTIMIZE = bool(os.environ.get("MMJAX_TEST_XLA_OPT")) or "--gpu" in sys.argv or _cuda_plugin()
if not OPTIMIZE:
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


# The same programs compile again and again: in both xdist workers, in the subprocesses
# that tests start (absl mains, shards, the 8-device run), and after every module, since
# `_release_compiled_per_module` drops jax's in-memory caches. So a run shares one jax
# persistent compilation cache, a temporary folder that the first process (pytest's main
# process) makes and removes at its exit. Workers and subprocesses inherit it through the
# environment. Its key covers the program, the compile options (the optimization level
# too) and the backend, so a cached executable is the one a compile would give.
# MMJAX_TEST_JAX_CACHE=0 turns it off; a JAX_COMPILATION_CACHE_DIR already set is used as
# it is.
def _share_compilation_cache():
  if os.environ.get("MMJAX_TEST_JAX_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import atexit  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  path = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ["MMJAX_TEST_JAX_CACHE"] = path
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_compilation_cache()

import jax  # noqa: E402
import pytest  # noqa: E402

import mmjax  # noqa: E402, F401
from mmjax import runinfo  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--gpu", action="store_true", help="run tests marked gpu (needs a GPU)")


def pytest_collection_modifyitems(config, items):
  has_gpu = jax.default_backend() == "gpu"
  if config.getoption("--gpu") and not has_gpu:
    raise pytest.UsageError("--gpu given but jax sees no GPU")
  if has_gpu and config.getoption("--gpu"):
    return
  skip = pytest.mark.skip(reason="needs a GPU and --gpu")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """A test marked `xla_optimized` (its setup too: module fixtures) compiles optimized."""
  if OPTIMIZE or item.get_closest_marker("xla_optimized") is None:
    return (yield)
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    return (yield)
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_per_module():
  """A worker runs hundreds of tests; each compiled program holds memory mappings until
  jax's caches drop it, and at the kernel's cap (vm.max_map_count) the next compile aborts
  the worker. So the caches go after every module, and after any test that leaves the
  process above half the cap (see runinfo.release_compiled)."""
  yield
  runinfo.release_compiled(force=True)


@pytest.fixture(autouse=True)
def _release_compiled_when_high():
  yield
  runinfo.release_compiled()
