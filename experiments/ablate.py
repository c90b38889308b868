r"""Ablation of sparsity policies vs dense attention; writes metrics, config, manifest.

python experiments/ablate.py --config=configs/ablate_policies.py --workdir=/tmp/mmjax_ablate
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import ablation, runinfo  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "ablate_policies.py"),
  "Ablation config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/ablate", "Where results are written.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runinfo.write_run_files(_WORKDIR.value, ablation.config_to_dict(cfg), cfg.seed)
  if cfg.get("runner") == "ablate_model":  # configs/ablate_model.py: a real checkpoint
    ablation.run_model(cfg, _WORKDIR.value)
  else:
    ablation.run(cfg, _WORKDIR.value)
  with open(f"{_WORKDIR.value}/table.md") as f:
    print(f.read())
  print(
    f"results in {_WORKDIR.value}/ (metrics.jsonl, table.md, config.json, manifest.json, plots)"
  )


if __name__ == "__main__":
  app.run(main)
