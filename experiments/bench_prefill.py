r"""Times the model prefill per sparse policy against the dense path in the same run.

  python experiments/bench_prefill.py --config=configs/bench_prefill.py \
      --workdir=benchmarks/results/h100_prefill
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import runinfo
from mmjax.ablation import config_to_dict  # noqa: E402
from mmjax.models import bench  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "bench_prefill.py"),
  "Benchmark config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/bench_prefill", "Where results are written.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runinfo.write_run_files(_WORKDIR.value, config_to_dict(cfg), cfg.seed)
  bench.run(cfg, _WORKDIR.value)
  with open(os.path.join(_WORKDIR.value, "table.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
