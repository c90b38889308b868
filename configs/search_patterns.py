"""Offline per-head pattern search: which pattern, at which budget, for every head.

Hypothesis: compared at one compute budget (density 0.4), each planted head of the
synthetic suite keeps the most attention mass with the pattern it was planted with, or
within `tie` of it with a simpler one, so the search recovers the planted patterns.

  python experiments/search_patterns.py --config=configs/search_patterns.py \
      --workdir=workdirs/search        # the planted suite, 3 seeds x 6 heads (CPU, ~3 min)
  python experiments/search_patterns.py --config=configs/search_patterns.py:model \
      --config.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.video=frames.npy \
      --config.save_to=configs/patterns/qwen2_5_vl_7b.json --workdir=workdirs/search_7b
  python experiments/search_patterns.py --config=configs/search_patterns.py:smoke

Args: "" (the synthetic suite), "model" (a checkpoint's own q/k on a video clip),
"smoke" (a tiny synthetic layout, one layer, two budgets).
"""

import ml_collections

from mmjax import search, synthetic


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "model", "smoke"):
    raise ValueError(f"configs/search_patterns.py: unknown arg {arg!r}; use '', model, smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.source = "synthetic"
  c.patterns = search.SIMPLICITY
  c.scales = search.SearchConfig().scales
  c.max_density = 0.4
  c.tie = search.SearchConfig().tie
  c.last_q = 64
  c.sample_blocks = 16
  c.block_q = 64
  c.block_k = 64
  c.policy_kwargs = ml_collections.ConfigDict(
    {p: ml_collections.ConfigDict({}) for p in c.patterns}
  )
  c.save_to = ""  # also write the table here (e.g. configs/patterns/<name>.json)
  # synthetic source
  c.num_layers = 3
  c.head_kinds = tuple(synthetic.HEAD_KINDS)
  c.layout = ml_collections.ConfigDict(
    dict(frames=24, height=16, width=16, text_prefix=64, text_between=16, text_suffix=64)
  )
  # model source
  c.checkpoint = ""
  c.dtype = "float32"
  c.video = ""  # .npy [F, H, W, 3] or a frame dir; "" = seeded random frames
  c.frames = 8
  c.frame_size = (224, 224)
  c.fps = 2.0
  c.question = "Describe the video."
  if arg == "model":
    c.source = "model"
  if arg == "smoke":
    c.num_layers = 1
    c.scales = (0.5, 1.0)
    c.layout.update(frames=4, height=8, width=8, text_prefix=32, text_between=8, text_suffix=32)
    c.block_q = c.block_k = 16
    c.sample_blocks = 4
  return c
