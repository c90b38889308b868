"""Sparse prefill + dense greedy decoding with a kv cache, jitted.

`generate(model, params, batch)` answers a processor batch (text + images/videos): one
jitted prefill through the model's sparsity policy, then a jitted `while_loop` of dense
decode steps that stops when every sequence has produced an end token.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.qwen2_5_vl import Qwen2_5_VL, as_grid, count_vision_tokens


def check_batch(model: Qwen2_5_VL, batch: Mapping[str, Any]):
  """ValueError for a malformed processor batch. Returns (B, T)."""
  c = model.config
  for key in ("input_ids", "position_ids"):
    if key not in batch:
      raise ValueError(f"batch has no {key!r} (give the processor's output)")
  ids = np.asarray(batch["input_ids"])
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"input_ids must be [B, T] with T > 0, got shape {ids.shape}")
  b, t = ids.shape
  if ids.min() < 0 or ids.max() >= c.text.vocab_size:
    raise ValueError(
      f"input_ids must lie in [0, {c.text.vocab_size}), got {ids.min()}..{ids.max()}"
    )
  pos = np.asarray(batch["position_ids"])
  if pos.shape != (3, b, t):
    raise ValueError(f"position_ids must be [3, B, T] = {(3, b, t)}, got {pos.shape}")
  mod = batch.get("modality")
  if mod is not None and np.shape(mod) != (b, t):
    raise ValueError(f"modality must be [B, T] = {(b, t)}, got {np.shape(mod)}")
  m = c.vision.spatial_merge_size
  for tok, pv_key, grid_key, what in (
    (c.image_token_id, "pixel_values", "image_grid_thw", "image"),
    (c.video_token_id, "pixel_values_videos", "video_grid_thw", "video"),
  ):
    n_tok = int((ids == tok).sum())
    have = batch.get(pv_key) is not None
    n_feat = count_vision_tokens(batch.get(grid_key), m) if have else 0
    if n_tok != n_feat:
      raise ValueError(
        f"{n_tok} {what} pad tokens in input_ids but {n_feat} {what} features from "
        f"{grid_key}={None if not have else as_grid(batch[grid_key])}"
      )
  return b, t


def _pad_cache(cache, length):
  def pad(x):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

  return [(pad(k), pad(v)) for k, v in cache]


@functools.partial(
  jax.jit, static_argnames=("model", "image_grid_thw", "video_grid_thw", "cache_len", "all_logits")
)
def _prefill(
  model,
  params,
  input_ids,
  position_ids,
  modality,
  pixel_values,
  pixel_values_videos,
  image_grid_thw,
  video_grid_thw,
  cache_len,
  all_logits,
):
  logits, cache = model.apply(
    params,
    input_ids,
    position_ids,
    modality,
    pixel_values,
    image_grid_thw,
    pixel_values_videos,
    video_grid_thw,
    all_logits=all_logits,
  )
  return logits, _pad_cache(cache, cache_len)


def prefill(
  model: Qwen2_5_VL, params, batch: Mapping[str, Any], *, cache_len=None, all_logits=False
):
  """Jitted prefill of a processor batch with the model's policy and backend.

  Args:
    model: a `Qwen2_5_VL` (its `policy` and `backend` apply to every layer).
    params: its params.
    batch: the processor's output (input_ids [B, T], position_ids [3, B, T], modality
      [B, T], and pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw).
    cache_len: S >= T, the kv cache's length (default T).
    all_logits: logits of every token [B, T, V] instead of the last one [B, 1, V].

  Returns:
    (logits, cache: per layer (k, v) [B, S, K, H]).
  """
  b, t = check_batch(model, batch)
  cache_len = t if cache_len is None else int(cache_len)
  if cache_len < t:
    raise ValueError(f"cache_len={cache_len} is shorter than the prompt ({t} tokens)")
  grids = {
    k: as_grid(batch[k]) if batch.get(k) is not None else None
    for k in ("image_grid_thw", "video_grid_thw")
  }
  opt = lambda k: None if batch.get(k) is None else jnp.asarray(batch[k])
  mod = batch.get("modality")
  return _prefill(
    model,
    params,
    jnp.asarray(batch["input_ids"], jnp.int32),
    jnp.asarray(batch["position_ids"], jnp.int32),
    None if mod is None else jnp.asarray(mod, jnp.int32),
    opt("pixel_values"),
    opt("pixel_values_videos"),
    grids["image_grid_thw"],
    grids["video_grid_thw"],
    cache_len,
    all_logits,
  )


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _decode_loop(model, params, cache, first, start_index, start_pos, eos, steps):
  b = first.shape[0]
  out = jnp.full((b, steps), eos[0], jnp.int32)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, done, out = carry
    out = out.at[:, i].set(jnp.where(done, eos[0], tok))
    done = done | jnp.isin(tok, eos)
    logits, cache = model.apply(params, tok, start_pos + i, cache, start_index + i, method="decode")
    return i + 1, jnp.argmax(logits, -1).astype(jnp.int32), cache, done, out

  init = (jnp.int32(0), first, cache, jnp.zeros((b,), bool), out)
  n, _, _, _, out = jax.lax.while_loop(cond, body, init)
  return out, n


def generate(
  model: Qwen2_5_VL,
  params,
  batch: Mapping[str, Any],
  *,
  max_new_tokens: int = 32,
  eos_token_ids: Sequence[int] | None = None,
  return_logits: bool = False,
):
  """Greedy answer to a processor batch: sparse prefill, then dense decode steps.

  Args:
    model, params, batch: as `prefill`.
    max_new_tokens: the most tokens generated per sequence.
    eos_token_ids: end tokens (default: the model config's).
    return_logits: also return the prefill's last-token logits [B, 1, V].

  Returns:
    tokens [B, n] int32 numpy (n <= max_new_tokens; after a sequence's end token, the
    first end token id fills its row); with `return_logits`, (tokens, logits).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  eos = tuple(eos_token_ids if eos_token_ids is not None else model.config.eos_token_ids)
  if not eos:
    raise ValueError("eos_token_ids is empty")
  b, t = check_batch(model, batch)
  logits, cache = prefill(model, params, batch, cache_len=t + max_new_tokens)
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  # the next text position continues after the largest prompt position (mRoPE)
  start_pos = jnp.asarray(np.asarray(batch["position_ids"]).max(axis=(0, 2)) + 1, jnp.int32)
  out, n = _decode_loop(
    model,
    params,
    cache,
    first,
    jnp.int32(t),
    start_pos,
    jnp.asarray(eos, jnp.int32),
    max_new_tokens,
  )
  tokens = np.asarray(out)[:, : int(n)]
  return (tokens, logits) if return_logits else tokens
