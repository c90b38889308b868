"""Answer a question about a video with a Qwen2.5-VL checkpoint, sparse prefill + dense
greedy decoding.

  python experiments/answer.py --config=configs/answer.py \
      --config.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct --config.video=frames.npy \
      --config.question="What happens in the video?" --workdir=workdirs/answer

Args: "" (bf16, the 2d_boundary policy on the pallas backend; every field can be
overridden), "smoke" (f32 on the CPU: the tests point it at a tiny random checkpoint).
"""

import ml_collections


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/answer.py: unknown arg {arg!r}; use '' or smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.checkpoint = ""  # a Hugging Face Qwen2.5-VL dir (config, safetensors, tokenizer.json)
  c.params = ""  # optional: an orbax dir written by experiments/convert_checkpoint.py
  c.video = ""  # .npy [F, H, W, 3] uint8, or a dir of frame images
  c.images = ()
  c.fps = 2.0  # the rate the given frames were sampled at
  c.question = "What happens in the video?"
  c.policy = "2d_boundary"
  c.policy_kwargs = ml_collections.ConfigDict({"block_q": 128, "block_k": 64})
  c.backend = "pallas"
  c.dtype = "bfloat16"
  c.max_new_tokens = 64
  c.text_start = "grid"  # mRoPE text after vision: "grid" (transformers 5) or "max" (Qwen)
  # devices of the prefill (mmjax.distributed): data x heads x seq; heads * seq must divide
  # the kv heads (4 for 7B) and seq the prompt length. 1 x 1 x 1 = one device.
  c.mesh = ml_collections.ConfigDict({"data": 1, "heads": 1, "seq": 1})
  if arg == "smoke":
    c.dtype = "float32"
    c.backend = "xla"
    c.policy_kwargs = ml_collections.ConfigDict({"block_q": 16, "block_k": 16})
    c.max_new_tokens = 4
  return c
