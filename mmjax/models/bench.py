"""Model prefill benchmark: the Qwen2.5-VL decoder over a long video + text prompt, each
sparse policy through its backend against the dense path (cuDNN on the GPU), timed in
one run. Random weights (no checkpoint download is possible on the GPU machines).

The timed function is the decoder prefill from embeddings (all layers, final norm, the
last token's logits): the vision tower is the same for every policy and is not timed;
vision tokens get random embeddings.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mmjax import policies, runinfo
from mmjax.bench import timeit
from mmjax.models import processing
from mmjax.models.qwen2_5_vl import (
  Qwen2_5_VL,
  Qwen2_5_VLConfig,
  TextConfig,
  VisionConfig,
  init_params,
  qwen2_5_vl_7b,
)
from mmjax.plotting import pyplot


def tiny_config() -> Qwen2_5_VLConfig:
  """A small model for smoke runs (H = 32 so the Pallas kernels take it)."""
  return Qwen2_5_VLConfig(
    text=TextConfig(
      vocab_size=512,
      hidden_size=128,
      intermediate_size=256,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mrope_section=(4, 6, 6),
    ),
    vision=VisionConfig(
      depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=128
    ),
    image_token_id=500,
    video_token_id=501,
    vision_start_token_id=502,
    vision_end_token_id=503,
    eos_token_ids=(504,),
  )


def tiny_sharded_config() -> Qwen2_5_VLConfig:
  """The tiny model with 8 query / 4 kv heads (H = 32): meshes of heads * seq up to 4."""
  c = tiny_config()
  return dataclasses.replace(
    c,
    text=dataclasses.replace(c.text, hidden_size=256, num_heads=8, num_kv_heads=4),
    vision=dataclasses.replace(c.vision, out_hidden_size=256),
  )


MODELS = {"qwen2_5_vl_7b": qwen2_5_vl_7b, "tiny": tiny_config, "tiny_sharded": tiny_sharded_config}


def video_prompt(config: Qwen2_5_VLConfig, seq_len: int, frame_hw=(16, 16), text=(96, 64), seed=0):
  """A chat-shaped prompt of exactly `seq_len` tokens: text, one video (as many frames of
  frame_hw merged tokens as fit), text. Returns input_ids [1, T], position_ids [3, 1, T],
  modality [1, T] (numpy) and the video grid."""
  fh, fw = frame_hw
  before, after = text
  per_frame = fh * fw
  n_frames = (seq_len - before - after - 2) // per_frame
  if n_frames < 1:
    raise ValueError(f"seq_len={seq_len} leaves no room for a frame of {per_frame} tokens")
  after = seq_len - before - 2 - n_frames * per_frame
  rng = np.random.default_rng(seed)
  vocab = min(config.image_token_id, config.video_token_id, config.vision_start_token_id)
  ids = np.concatenate(
    [
      rng.integers(0, vocab, before),
      [config.vision_start_token_id],
      np.full(n_frames * per_frame, config.video_token_id),
      [config.vision_end_token_id],
      rng.integers(0, vocab, after),
    ]
  ).astype(np.int64)[None]
  m = config.vision.spatial_merge_size
  grid = np.asarray([[n_frames, fh * m, fw * m]])
  pos, _ = processing.rope_index(
    ids,
    None,
    grid,
    np.asarray([1.0]),
    spatial_merge_size=m,
    tokens_per_second=config.vision.tokens_per_second,
    image_token_id=config.image_token_id,
    video_token_id=config.video_token_id,
    vision_start_token_id=config.vision_start_token_id,
  )
  mod = (ids == config.video_token_id).astype(np.int32)
  return ids.astype(np.int32), pos.astype(np.int32), mod, grid


def _embeds(model: Qwen2_5_VL, params, ids, seed):
  """Token embeddings, with N(0, 1)-scaled random vectors for the video tokens."""

  @jax.jit
  def f(params, ids):
    x = model.apply(params, ids, method="embed")
    noise = jax.random.normal(jax.random.key(seed), x.shape, jnp.float32).astype(x.dtype)
    return jnp.where((ids == model.config.video_token_id)[..., None], noise, x)

  return f(params, ids)


def run(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Runs the prefill benchmark of `cfg` (configs/bench_prefill.py)."""
  if cfg.model not in MODELS:
    raise ValueError(f"model={cfg.model!r} is not one of {sorted(MODELS)}")
  mc = MODELS[cfg.model]()
  dtype = jnp.dtype(cfg.dtype)
  on_gpu = jax.default_backend() == "gpu"
  base_backend = cfg.baseline_backend or (
    "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"
  )
  params = init_params(mc, seed=cfg.seed, dtype=dtype)
  rows = []
  for length in cfg.lengths:
    ids, pos, mod, grid = video_prompt(mc, length, tuple(cfg.frame_hw), tuple(cfg.text), cfg.seed)
    blocks = {"block_q": cfg.block_q, "block_k": cfg.block_k}
    entries = [("dense", base_backend, policies.Dense(**blocks))]
    for name in cfg.policies:
      kw = dict(cfg.policy_kwargs.get(name, {}))
      kw.setdefault("heads_per_step", cfg.heads_per_step)
      entries.append((name, cfg.backend, policies.get(name, **blocks, **kw)))
    x = _embeds(Qwen2_5_VL(mc, dtype=dtype, param_dtype=dtype), params, jnp.asarray(ids), cfg.seed)
    posj, modj = jnp.asarray(pos), jnp.asarray(mod)
    base_ms = None
    for name, backend, pol in tqdm(entries, desc=f"T={length}", disable=not progress):
      model = Qwen2_5_VL(mc, policy=pol, backend=backend, dtype=dtype, param_dtype=dtype)

      @jax.jit
      def prefill(params, x, pos, mod, model=model):
        logits, _ = model.apply(params, x, pos, mod, method="prefill_embeds")
        return logits

      row = dict(length=length, policy=name, backend=backend, frames=int(grid[0, 0]))
      try:
        t0 = datetime.datetime.now()
        jax.block_until_ready(prefill(params, x, posj, modj))
        row["first_call_s"] = (datetime.datetime.now() - t0).total_seconds()
        ms = timeit(prefill, params, x, posj, modj, warmup=cfg.warmup, iters=cfg.iters)
        row["ms"] = ms
        if name == "dense":
          base_ms = ms
        row["speedup"] = (base_ms / ms) if base_ms else None
      except Exception as e:  # noqa: BLE001  (record, go on to the next policy)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"T={length} {name}: FAILED {row['error']}", flush=True)
      rows.append(row)
      if workdir:  # after every row: a run cut short keeps what it measured
        _write(workdir, rows, cfg, mc, base_backend, final=False)
  if workdir:
    _write(workdir, rows, cfg, mc, base_backend, final=True)
  return rows


def _write(workdir, rows, cfg, mc, base_backend, final):
  result = {
    "rows": rows,
    "model": cfg.model,
    "model_config": dataclasses.asdict(mc),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "baseline": f"dense policy, backend={base_backend!r}",
    "timed": "decoder prefill from embeddings: all layers + final norm + last-token logits",
    "manifest": runinfo.manifest(cfg.seed),
    "complete": final,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "bench.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(format_table(result) + "\n")
  if final:
    plot(rows, os.path.join(workdir, "speedup.png"))


def format_table(result) -> str:
  lines = [
    f"{result['model']} prefill on {result['device']}, jax {result['jax']}, {result['date']}; "
    f"baseline: {result['baseline']}; timed: {result['timed']}",
    "",
    "| T | policy | backend | ms | speedup vs dense | first call (s) |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    if "error" in r:
      lines.append(f"| {r['length']} | {r['policy']} | {r['backend']} | {r['error']} | | |")
      continue
    sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
    lines.append(
      f"| {r['length']} | {r['policy']} | {r['backend']} | {r['ms']:.1f} | {sp} | "
      f"{r['first_call_s']:.1f} |"
    )
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  plt = pyplot(path)
  if plt is None:
    return
  ok = [r for r in rows if r.get("speedup")]
  lengths = sorted({r["length"] for r in ok})
  names = list(dict.fromkeys(r["policy"] for r in ok))
  fig, ax = plt.subplots(figsize=(7, 3.8))
  width = 0.8 / max(len(lengths), 1)
  for j, length in enumerate(lengths):
    vals = [
      next((r["speedup"] for r in ok if r["policy"] == n and r["length"] == length), 0.0)
      for n in names
    ]
    ax.bar(np.arange(len(names)) + j * width, vals, width, label=f"T={length}")
  ax.set_xticks(np.arange(len(names)) + width * (len(lengths) - 1) / 2, names, rotation=20)
  ax.set_ylabel("prefill speedup over dense")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
