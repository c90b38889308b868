"""XLA flags mmjax needs for correct results, set before jax starts a backend.

jaxlib 0.10.2's CPU backend has an experimental "YNN" fusion that gives nondeterministic,
wrong values in some programs (seen here: the pooled block scores of a plan differed by up
to 1e3 between two runs of the same jitted function when its output also fed a sort).
Turning that fusion off (`--xla_cpu_experimental_ynn_fusion_type=`) makes every plan
reproducible. Set MMJAX_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS alone.
"""

import importlib.metadata
import os
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib versions known to accept the flag (an unknown flag aborts XLA at start-up).
_VERSIONS = ("0.10.",)


def apply() -> None:
  if os.environ.get("MMJAX_KEEP_XLA_FLAGS"):
    return
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if not version.startswith(_VERSIONS):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  try:
    from jax._src import xla_bridge  # noqa: PLC0415

    started = bool(getattr(xla_bridge, "_backends", {}))
  except ImportError:  # pragma: no cover
    started = False
  if started:
    warnings.warn(
      "mmjax: jax's backend started before mmjax was imported, so XLA_FLAGS could not get "
      f"{_FLAG} (jaxlib {version}'s CPU YNN fusion gives nondeterministic results); "
      "import mmjax first or set the flag yourself",
      stacklevel=3,
    )
    return
  os.environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()
