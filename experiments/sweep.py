r"""Runs a sweep (a base config + override items, one workdir per item) and its summary.

python experiments/sweep.py --config=configs/sweep_budget.py --workdir=workdirs/sweep_budget
python experiments/sweep.py --config=configs/sweep_budget.py:smoke --workdir=/tmp/sweep_smoke \
    --config.layout.height=4 --shard_index=0 --num_shards=2

Started again on the same workdir it skips the finished items (see mmjax/sweep.py).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config file (`configs/<file>.py:<arg>`).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (items/, summaries).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard of the items.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Processes sharing the items (every n-th).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  items = sweep.load_items(config_flags.get_config_filename(flags.FLAGS["config"]))
  res = sweep.run(_CONFIG.value, items, _WORKDIR.value, _SHARD_INDEX.value, _NUM_SHARDS.value)
  print(f"{len(res.ran)} item(s) run, {len(res.skipped)} already done, of {len(res.names)}")
  if res.summary:
    with open(os.path.join(_WORKDIR.value, "summary.md")) as f:
      print(f.read())
    print(f"summary in {res.summary} and summary.md")
  else:
    print(f"{len(res.missing)} item(s) not done yet (other shards?): no summary written")


if __name__ == "__main__":
  app.run(main)
