r"""Offline per-head pattern search; writes the mminference table.

python experiments/search_patterns.py --config=configs/search_patterns.py --workdir=workdirs/search
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import runinfo, search  # noqa: E402
from mmjax.ablation import config_to_dict  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "search_patterns.py"),
  "Search config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/search", "Where results are written.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runinfo.write_run_files(_WORKDIR.value, config_to_dict(cfg), cfg.seed)
  table = search.run(cfg, _WORKDIR.value)
  print(search.format_table(table).split("\n\n")[0])
  print(f"\ntable: {os.path.join(_WORKDIR.value, 'pattern_table.json')}")


if __name__ == "__main__":
  app.run(main)
