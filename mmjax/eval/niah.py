"""Needle in a video haystack (the paper's V-NIAH and mixed-modality NIAH), on any
Qwen2.5-VL checkpoint mmjax loads.

- "frame" needle: a frame showing a word is put into the haystack video at a depth
  (a fraction of its length); the question asks for the word.
- "text" needle: the video is split at the depth and a sentence holding the word is put
  between the two parts (text inside the video's tokens); the question asks for it.

An answer is right when the needle's word appears in it (case-insensitive). Every
(length, depth, policy) cell is one greedy generation; results go to `niah.jsonl`, a
table and a depth x length accuracy heat map per policy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from mmjax import runinfo
from mmjax.models import processing
from mmjax.models.generate import generate
from mmjax.models.qwen2_5_vl import Qwen2_5_VL

SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class Needle:
  word: str = "pineapple"
  kind: str = "frame"  # "frame" or "text"
  question: str = "What is the secret word in the video? Answer with one word."
  sentence: str = "The secret word is {word}."

  def __post_init__(self):
    if self.kind not in ("frame", "text"):
      raise ValueError(f"needle kind={self.kind!r}: use 'frame' or 'text'")
    if not self.word.strip():
      raise ValueError("the needle word is empty")


def needle_frame(word: str, height: int, width: int) -> np.ndarray:
  """A uint8 [H, W, 3] frame: the word in black on white, as large as fits."""
  from PIL import Image, ImageDraw, ImageFont

  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  size = max(8, height // 4)
  font = ImageFont.load_default(size=size)
  draw.text((width // 20, height // 3), word, fill="black", font=font)
  return np.asarray(img)


def insert_at_depth(frames: np.ndarray, item: np.ndarray, depth: float, unit: int = 2) -> int:
  """Replaces `unit` frames (one temporal patch) at `depth` with `item`, in place; returns
  the first replaced frame index (a multiple of `unit`)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  n = frames.shape[0] // unit
  if n < 1:
    raise ValueError(f"the haystack has {frames.shape[0]} frames, fewer than {unit}")
  i = min(int(round(depth * (n - 1))), n - 1) * unit
  frames[i : i + unit] = item
  return i


def build_example(haystack: np.ndarray, needle: Needle, depth: float, unit: int = 2):
  """(prompt text, videos) for one cell: the needle put at `depth` of the haystack."""
  frames = np.array(haystack, copy=True)
  if needle.kind == "frame":
    insert_at_depth(frames, needle_frame(needle.word, *frames.shape[1:3]), depth, unit)
    prompt = processing.chat_prompt(needle.question, videos=1, system=SYSTEM)
    return prompt, [frames]
  n = frames.shape[0] // unit
  cut = min(max(1, int(round(depth * n))), n - 1) * unit if n > 1 else unit
  parts = [frames[:cut], frames[cut:]]
  vid = "<|vision_start|><|video_pad|><|vision_end|>"
  sentence = needle.sentence.format(word=needle.word)
  prompt = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    f"{vid}{sentence}{vid}{needle.question}<|im_end|>\n<|im_start|>assistant\n"
  )
  return prompt, [p for p in parts if len(p)]


def is_correct(answer: str, word: str) -> bool:
  return word.lower() in answer.lower()


def run(
  model: Qwen2_5_VL,
  params,
  proc: processing.Processor,
  haystack: np.ndarray,
  *,
  needle: Needle,
  frame_counts: Sequence[int],
  depths: Sequence[float],
  policies: dict,
  fps: float = 2.0,
  max_new_tokens: int = 16,
  workdir: str | None = None,
  progress: bool = True,
) -> list[dict]:
  """Runs every (frames, depth, policy) cell.

  Args:
    model: the model (its policy is replaced per cell by `policies[name]`).
    params: its params.
    proc: the processor of its checkpoint.
    haystack: uint8 [F, H, W, 3] frames; the first `frames` of them make each length.
    needle: what is hidden and asked.
    frame_counts: haystack lengths in frames (each <= F).
    depths: needle depths in [0, 1].
    policies: name -> policy (None = dense).

  Returns:
    One row per cell: frames, tokens, depth, policy, answer, correct, seconds.
  """
  if haystack.ndim != 4 or haystack.shape[-1] != 3 or haystack.dtype != np.uint8:
    raise ValueError(f"haystack must be uint8 [F, H, W, 3], got {haystack.dtype} {haystack.shape}")
  if not policies:
    raise ValueError("give at least one policy (name -> policy, None for dense)")
  for f in frame_counts:
    if not 2 <= f <= haystack.shape[0]:
      raise ValueError(f"frame count {f} is not in [2, {haystack.shape[0]}] (the haystack)")
  unit = proc.cfg.temporal_patch_size
  cells = [(f, d, p) for f in frame_counts for d in depths for p in policies]
  rows = []
  for f, d, name in tqdm(cells, desc="niah", disable=not progress):
    prompt, videos = build_example(haystack[:f], needle, d, unit)
    batch = proc(prompt, videos=videos, video_fps=fps)
    m = model.clone(policy=policies[name])
    t0 = time.perf_counter()
    tokens = generate(m, params, batch, max_new_tokens=max_new_tokens)
    answer = proc.tokenizer.decode(
      [t for t in tokens[0].tolist() if t not in model.config.eos_token_ids],
      skip_special_tokens=True,
    )
    rows.append(
      {
        "frames": f,
        "tokens": int(batch["input_ids"].shape[1]),
        "depth": d,
        "policy": name,
        "needle": needle.kind,
        "answer": answer,
        "correct": is_correct(answer, needle.word),
        "seconds": round(time.perf_counter() - t0, 3),
      }
    )
    runinfo.release_compiled()  # a large grid compiles many programs (see runinfo)
  if workdir:
    write(rows, workdir)
  return rows


def write(rows, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "niah.jsonl"), "w") as f:
    for r in rows:  # timings apart, identical across reruns
      f.write(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) + "\n")
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(format_table(rows) + "\n")
  plot(rows, os.path.join(workdir, "niah.png"))


def accuracy(rows) -> dict[str, float]:
  out = {}
  for name in dict.fromkeys(r["policy"] for r in rows):
    out[name] = float(np.mean([r["correct"] for r in rows if r["policy"] == name]))
  return out


def format_table(rows) -> str:
  lines = ["| policy | accuracy | cells |", "|---|---|---|"]
  for name, acc in accuracy(rows).items():
    n = sum(r["policy"] == name for r in rows)
    lines.append(f"| {name} | {acc:.3f} | {n} |")
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  from mmjax.plotting import pyplot

  plt = pyplot(path)
  if plt is None:
    return
  names = list(dict.fromkeys(r["policy"] for r in rows))
  lengths = sorted({r["tokens"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
  for ax, name in zip(axes[0], names, strict=True):
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
      if r["policy"] == name:
        grid[depths.index(r["depth"]), lengths.index(r["tokens"])] = float(r["correct"])
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=6, rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
    ax.set_xlabel("prompt tokens", fontsize=8)
  axes[0][0].set_ylabel("needle depth", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_config(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """The runner behind experiments/niah.py (configs/niah.py)."""
  import jax.numpy as jnp

  from mmjax import policies as P
  from mmjax.models import checkpoint
  from mmjax.models.answer import load_frames

  if not cfg.checkpoint:
    raise ValueError("niah needs --config.checkpoint (a Qwen2.5-VL checkpoint dir)")
  dtype = jnp.dtype(cfg.dtype)
  config, params = checkpoint.load_hf_checkpoint(cfg.checkpoint, dtype=dtype)
  proc = processing.Processor.from_dir(cfg.checkpoint, text_start=cfg.text_start)
  if cfg.haystack:
    haystack = load_frames(cfg.haystack)
  else:  # seeded smooth noise frames
    rng = np.random.default_rng(cfg.seed)
    n = max(cfg.frame_counts)
    small = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    reps = (1, -(-cfg.frame_size[0] // 8), -(-cfg.frame_size[1] // 8), 1)
    haystack = np.tile(small.repeat(1, 0), reps)[:, : cfg.frame_size[0], : cfg.frame_size[1]]
    haystack = np.ascontiguousarray(haystack)
  pols = {}
  for name in cfg.policies:
    kw = dict(cfg.policy_kwargs.get(name, {}))
    pols[name] = None if name == "dense" and not kw else P.get(name, **kw)
  model = Qwen2_5_VL(config, backend=cfg.backend, dtype=dtype, param_dtype=dtype)
  needle = Needle(word=cfg.needle_word, kind=cfg.needle_kind)
  return run(
    model,
    params,
    proc,
    haystack,
    needle=needle,
    frame_counts=tuple(cfg.frame_counts),
    depths=tuple(cfg.depths),
    policies=pols,
    fps=cfg.fps,
    max_new_tokens=cfg.max_new_tokens,
    workdir=workdir,
    progress=progress,
  )
