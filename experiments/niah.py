r"""Needle in a video haystack per sparse policy (any Qwen2.5-VL checkpoint).

python experiments/niah.py --config=configs/niah.py --workdir=workdirs/niah
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import runinfo  # noqa: E402
from mmjax.ablation import config_to_dict  # noqa: E402
from mmjax.eval import niah  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "niah.py"),
  "NIAH config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/niah", "Where results are written.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runinfo.write_run_files(_WORKDIR.value, config_to_dict(cfg), cfg.seed)
  rows = niah.run_config(cfg, _WORKDIR.value)
  print(niah.format_table(rows))
  print(f"\nresults in {_WORKDIR.value}/ (niah.jsonl, table.md, niah.png)")


if __name__ == "__main__":
  app.run(main)
