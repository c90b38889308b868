"""Needle in a video haystack with a Qwen2.5-VL checkpoint, per sparse policy.

Hypothesis: policies that keep the attention mass of the needle's tokens (vertical
columns, modality boundaries) answer as often as dense at every depth and length, while
a local window (a_shape) loses needles far from the question.

  python experiments/niah.py --config=configs/niah.py \
      --config.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.haystack=frames.npy \
      --workdir=workdirs/niah
  python experiments/niah.py --config=configs/niah.py:smoke --config.checkpoint=<tiny ckpt>

Args: "" (bf16, pallas backend, 5 depths x 3 lengths, frame needle), "text" (the same with
a text needle inside the video), "smoke" (f32, xla backend, 2 depths x 1 length, 2 tokens).
"""

import ml_collections


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "text", "smoke"):
    raise ValueError(f"configs/niah.py: unknown arg {arg!r}; use '', text, smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.checkpoint = ""
  c.haystack = ""  # .npy [F, H, W, 3] uint8 or a frame dir; "" = seeded noise frames
  c.frame_size = (448, 448)
  c.frame_counts = (64, 256, 1024)
  c.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  c.fps = 2.0
  c.needle_kind = "frame"
  c.needle_word = "pineapple"
  c.policies = ("dense", "a_shape", "vertical_slash", "2d_boundary")
  c.policy_kwargs = ml_collections.ConfigDict(
    {
      n: ml_collections.ConfigDict({"block_q": 128, "block_k": 64})
      for n in ("a_shape", "vertical_slash", "2d_boundary")
    }
  )
  c.backend = "pallas"
  c.dtype = "bfloat16"
  c.max_new_tokens = 16
  c.text_start = "grid"
  if arg == "text":
    c.needle_kind = "text"
  if arg == "smoke":
    c.frame_size = (56, 84)
    c.frame_counts = (8,)
    c.depths = (0.0, 1.0)
    c.policies = ("dense", "a_shape")
    c.policy_kwargs = ml_collections.ConfigDict(
      {"a_shape": ml_collections.ConfigDict({"block_q": 16, "block_k": 16, "local_tokens": 32})}
    )
    c.backend = "xla"
    c.dtype = "float32"
    c.max_new_tokens = 2
  return c
