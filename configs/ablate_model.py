"""Every policy on a Qwen2.5-VL checkpoint: per decoder layer and on the end task.

Hypothesis: a policy's attention error on a real model's layers predicts whether its
answer differs from the dense one; the searched `mminference` table keeps both low.

  python experiments/ablate.py --config=configs/ablate_model.py \
      --config.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.video=frames.npy \
      --workdir=workdirs/ablate_model
  python experiments/ablate.py --config=configs/ablate_model.py:smoke --config.checkpoint=<dir>

Args: "" (f32 on the xla backend, 16 random 448x448 frames unless a video is given), "smoke"
(4 small frames, 2 answer tokens: for the tiny test checkpoint).
"""

import ml_collections

from configs import ablate_policies
from mmjax import search, sweep

# the synthetic ablation's policies; mminference needs a searched table of the checkpoint
POLICIES = tuple(p for p in ablate_policies.POLICIES if p != "mminference")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/ablate_model.py: unknown arg {arg!r}; use '' or 'smoke'")
  c = ml_collections.ConfigDict()
  c.runner = "ablate_model"
  c.seed = 0
  c.checkpoint = ""
  c.video = ""  # .npy [F, H, W, 3] uint8 or a frame dir; "" = seeded random frames
  c.frames = 16
  c.frame_size = (448, 448)
  c.fps = 2.0
  c.question = "Describe the video."
  c.dtype = "float32"
  c.backend = "xla"
  c.block_q = 64
  c.block_k = 64
  c.max_new_tokens = 16
  c.policies = POLICIES
  c.policy_kwargs = ml_collections.ConfigDict({n: ml_collections.ConfigDict({}) for n in POLICIES})
  for name, fields in search.BUDGET_FIELDS.items():
    sweep.add_policy_defaults(c, name, *fields)
  if arg == "smoke":
    c.frames, c.frame_size = 8, (112, 168)
    c.block_q = c.block_k = 16
    c.max_new_tokens = 2
    c.policies = ("dense", "a_shape", "2d_boundary")
    c.policy_kwargs.a_shape.local_tokens = 32
    c.policy_kwargs.a_shape.sink_tokens = 16
  return c
