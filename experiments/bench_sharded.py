r"""Times the sharded model prefill on meshes of devices against one device, per length.

  python experiments/bench_sharded.py --config=configs/bench_sharded.py \
      --workdir=benchmarks/results/h200x2_sharded
  python experiments/bench_sharded.py --config=configs/bench_sharded.py:smoke --workdir=/tmp/s
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.models import bench_sharded  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "bench_sharded.py"),
  "Benchmark config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/bench_sharded", "Where results are written.")


def main(argv):
  del argv
  bench_sharded.run(_CONFIG.value, _WORKDIR.value)
  with open(os.path.join(_WORKDIR.value, "table.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
