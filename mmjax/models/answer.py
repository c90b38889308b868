"""Answer a question about a video (and images) with a Qwen2.5-VL checkpoint: the logic
behind `experiments/answer.py`.

Frames come as a `.npy` array [F, H, W, 3] uint8 or a directory of image files (sorted by
name), already sampled at `fps` frames per second; images as image files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import distributed, policies
from mmjax.models import checkpoint, processing
from mmjax.models.generate import generate
from mmjax.models.qwen2_5_vl import Qwen2_5_VL

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image(path: str) -> np.ndarray:
  from PIL import Image

  if not os.path.isfile(path):
    raise FileNotFoundError(f"image {path!r} does not exist")
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def load_frames(path: str) -> np.ndarray:
  """[F, H, W, 3] uint8 from a .npy file or a directory of images."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(_IMAGE_EXT))
    if not files:
      raise ValueError(f"video dir {path!r} holds no image files ({', '.join(_IMAGE_EXT)})")
    return np.stack([load_image(os.path.join(path, f)) for f in files])
  if path.endswith(".npy"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"video {path!r} does not exist")
    return np.load(path)
  raise ValueError(f"video={path!r}: give a .npy array [F, H, W, 3] or a directory of frames")


def run(cfg, workdir: str | None = None) -> dict:
  """cfg: checkpoint, params (orbax dir or ""), video, images, fps, question, policy,
  policy_kwargs, backend, dtype, max_new_tokens, text_start, seed, mesh ({data, heads,
  seq}; more than one device: the prefill is sharded, see `mmjax.distributed`)."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.params:
    from mmjax.models.qwen2_5_vl import Qwen2_5_VLConfig, param_shapes

    config = Qwen2_5_VLConfig.from_dir(cfg.checkpoint)
    params = checkpoint.restore_params(cfg.params, like=param_shapes(config, dtype))
  else:
    config, params = checkpoint.load_hf_checkpoint(cfg.checkpoint, dtype=dtype)
  proc = processing.Processor.from_dir(cfg.checkpoint, text_start=cfg.text_start)
  videos = [load_frames(cfg.video)] if cfg.video else None
  images = [load_image(p) for p in cfg.images] if cfg.images else None
  if not videos and not images:
    raise ValueError("give a video (--config.video) and/or images (--config.images)")
  prompt = processing.chat_prompt(cfg.question, images=len(images or []), videos=len(videos or []))
  batch = proc(prompt, images=images, videos=videos, video_fps=cfg.fps)
  policy = policies.get(cfg.policy, **dict(cfg.policy_kwargs))
  shape = distributed.MeshShape.parse(cfg.get("mesh"))
  mesh = None
  if shape.size > 1:  # sequence/tensor/head-parallel prefill over shape.size devices
    shape.check(
      batch=batch["input_ids"].shape[0],
      seq_len=batch["input_ids"].shape[1],
      num_heads=config.text.num_heads,
      num_kv_heads=config.text.num_kv_heads,
      where="config.mesh vs the prompt",
    )
    mesh = distributed.make_mesh(shape)
    params = distributed.shard_params(params, mesh)
  model = Qwen2_5_VL(
    config, policy=policy, backend=cfg.backend, dtype=dtype, param_dtype=dtype, mesh=mesh
  )
  t0 = time.perf_counter()
  tokens = generate(model, params, batch, max_new_tokens=cfg.max_new_tokens)
  seconds = time.perf_counter() - t0
  answer = proc.tokenizer.decode(
    [t for t in tokens[0].tolist() if t not in config.eos_token_ids], skip_special_tokens=True
  )
  result = {
    "question": cfg.question,
    "answer": answer,
    "tokens": tokens[0].tolist(),
    "prompt_tokens": int(batch["input_ids"].shape[1]),
    "vision_tokens": int(batch["modality"].sum()),
    "policy": cfg.policy,
    "backend": cfg.backend,
    "mesh": dataclasses.asdict(shape),
    "seconds_with_compile": seconds,
    "device": jax.devices()[0].device_kind,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "answer.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
