"""Shared pytest setup. Importing mmjax first sets the XLA flags it needs (see
mmjax/_xla_flags.py) before any test starts a jax backend."""

import jax
import pytest

import mmjax  # noqa: F401


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
