"""Qwen2.5-VL decoder prefill per sparse policy against the dense path (random weights).

Hypothesis: at 128k tokens of video + text, attention dominates the 7B decoder's prefill,
so a policy's attention speedup carries over to the whole prefill minus the projections
and MLPs, which every policy shares.

  python experiments/bench_prefill.py --config=configs/bench_prefill.py \
      --workdir=benchmarks/results/h100_prefill     # on the GPU (device tool)
  python experiments/bench_prefill.py --config=configs/bench_prefill.py:smoke

Args: "" (Qwen2.5-VL-7B shapes, bf16, 128k tokens, pallas backend vs cuDNN dense),
"smoke" (a tiny model, 512 tokens, f32, CPU, xla backend vs xla dense).
"""

import ml_collections

POLICIES = ("a_shape", "vertical_slash", "block_sparse", "grid", "q_boundary", "2d_boundary")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/bench_prefill.py: unknown arg {arg!r}; use '' or smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "qwen2_5_vl_7b"
  c.dtype = "bfloat16"
  c.backend = "pallas"
  c.baseline_backend = ""  # "": cudnn on the GPU (bf16/f16), xla otherwise
  c.lengths = (131072,)
  c.frame_hw = (16, 16)  # merged tokens per frame (448 x 448 pixels per frame)
  c.text = (96, 64)  # text tokens before and after the video
  c.block_q = 128
  c.block_k = 64
  c.heads_per_step = 4
  c.warmup = 1
  c.iters = 3
  c.policies = POLICIES
  c.policy_kwargs = ml_collections.ConfigDict({n: ml_collections.ConfigDict({}) for n in POLICIES})
  if arg == "smoke":
    c.model = "tiny"
    c.dtype = "float32"
    c.backend = "xla"
    c.lengths = (512,)
    c.frame_hw = (4, 4)
    c.text = (32, 16)
    c.block_q = 64
    c.heads_per_step = 0
    c.iters = 1
    c.policy_kwargs.a_shape = ml_collections.ConfigDict({"sink_tokens": 32, "local_tokens": 64})
  return c
