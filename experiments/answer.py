r"""Answers a question about a video with a Qwen2.5-VL checkpoint.

  python experiments/answer.py --config=configs/answer.py \
      --config.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.video=frames.npy \
      --config.question="What happens in the video?" --workdir=workdirs/answer
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import runinfo  # noqa: E402
from mmjax.ablation import config_to_dict  # noqa: E402
from mmjax.models import answer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "..", "configs", "answer.py"),
  "Config file (`path.py:arg`).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/answer", "Where results are written.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  runinfo.write_run_files(_WORKDIR.value, config_to_dict(cfg), cfg.seed)
  result = answer.run(cfg, _WORKDIR.value)
  print(f"Q: {result['question']}\nA: {result['answer']}")


if __name__ == "__main__":
  app.run(main)
