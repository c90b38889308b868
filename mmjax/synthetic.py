"""Synthetic VLM-like prefill inputs with planted attention structure and ground truth.

Layout (`VideoLayout`): a text prefix (system prompt), then F frames of h x w patch tokens,
each frame preceded by `text_between` text tokens (a timestamp), then a text suffix (the
question). Modality 0 is text, 1 is vision.

Each head gets q/k built so its attention concentrates on one structure, the one a policy
is made for (`HEAD_KINDS`):
  a_shape         the first tokens (sinks) + a local window.
  vertical_slash  a few key columns for every query + diagonals at fixed offsets + local.
  block_sparse    tokens come in segments with topics; queries attend to segments of their
                  own topic.
  grid            vision queries attend to the same patch position in other frames.
  q_boundary      text queries: sinks + local window + columns; vision queries: the same
                  patch in other frames + local window (both in original positions).
  2d_boundary     text queries attend to nearby TEXT tokens (a window counted in text
                  tokens, across the frames in between), vision queries to the same patch in
                  other frames.
Everything is built from independent pieces of the head dimension: a sink direction, a
positional code whose dot product is a bump of a given width (random Fourier features), and
near-orthogonal random codes for patch positions, topics and columns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

HEAD_KINDS = ("a_shape", "vertical_slash", "block_sparse", "grid", "q_boundary", "2d_boundary")
TEXT, VISION = 0, 1


@dataclasses.dataclass(frozen=True)
class VideoLayout:
  frames: int = 24
  height: int = 16
  width: int = 16
  text_prefix: int = 64
  text_between: int = 16
  text_suffix: int = 64

  def __post_init__(self):
    for f in dataclasses.fields(self):
      val = getattr(self, f.name)
      if not isinstance(val, int) or val < 0:
        raise ValueError(f"VideoLayout.{f.name} must be an int >= 0, got {val!r}")
    if self.frames < 1 or self.height < 1 or self.width < 1:
      raise ValueError("VideoLayout needs frames, height and width >= 1")

  @property
  def frame_tokens(self) -> int:
    return self.height * self.width

  @property
  def frame_stride(self) -> int:
    """Distance in original positions between the same patch of consecutive frames."""
    return self.frame_tokens + self.text_between

  @property
  def seq_len(self) -> int:
    return self.text_prefix + self.frames * self.frame_stride + self.text_suffix

  def arrays(self):
    """Per token: modality, frame id (-1 text), patch id (-1 text), text rank (-1 vision)."""
    mod, frame, patch = [], [], []
    mod += [TEXT] * self.text_prefix
    frame += [-1] * self.text_prefix
    patch += [-1] * self.text_prefix
    for f in range(self.frames):
      mod += [TEXT] * self.text_between + [VISION] * self.frame_tokens
      frame += [-1] * self.text_between + [f] * self.frame_tokens
      patch += [-1] * self.text_between + list(range(self.frame_tokens))
    mod += [TEXT] * self.text_suffix
    frame += [-1] * self.text_suffix
    patch += [-1] * self.text_suffix
    mod = np.asarray(mod, np.int32)
    text_rank = np.where(mod == TEXT, np.cumsum(mod == TEXT) - 1, -1).astype(np.int32)
    return mod, np.asarray(frame, np.int32), np.asarray(patch, np.int32), text_rank


@dataclasses.dataclass(frozen=True)
class SyntheticBatch:
  q: jax.Array  # [B, T, N, H]
  k: jax.Array  # [B, T, N, H]
  v: jax.Array  # [B, T, N, H]
  modality: jax.Array  # [B, T] int32
  head_kinds: tuple[str, ...]
  layout: VideoLayout


def _fourier(pos, freqs, phases):
  """[T, 2F] features whose dot products approximate a bump in pos distance."""
  ang = pos[:, None].astype(np.float64) * freqs[None, :] + phases[None, :]
  return np.concatenate([np.cos(ang), np.sin(ang)], axis=1) / np.sqrt(len(freqs))


def _codes(rng, n, dim):
  c = rng.standard_normal((n, dim))
  return c / np.linalg.norm(c, axis=1, keepdims=True)


def _head(kind, layout: VideoLayout, rng, head_dim, strength):
  """q, k [T, H] (numpy float64) planting `kind`."""
  mod, frame, patch, text_rank = layout.arrays()
  t = layout.seq_len
  pos = np.arange(t)
  # head-dim budget: 2 sink | 32 local code | 48 patch/topic/column codes | rest noise
  d_loc, d_code = 32, 48
  if head_dim < 2 + d_loc + d_code:
    raise ValueError(f"synthetic heads need head_dim >= {2 + d_loc + d_code}, got {head_dim}")
  q = np.zeros((t, head_dim))
  k = np.zeros((t, head_dim))
  sl_sink, sl_loc = slice(0, 2), slice(2, 2 + d_loc)
  sl_code = slice(2 + d_loc, 2 + d_loc + d_code)
  a = strength
  is_text = mod == TEXT

  def sink(rows, n_sink=4):
    k[:n_sink, sl_sink] = [1.0, 0.0]
    q[rows, sl_sink] = [a, 0.0]

  def local(rows, width, offsets=(0.0,), weights=(1.0,)):
    """Queries in rows attend the keys ~width/2 around each offset before them."""
    freqs = rng.uniform(0, np.pi / width, d_loc // 2)
    zeros = np.zeros(d_loc // 2)
    k[:, sl_loc] = _fourier(pos, freqs, zeros)
    pairs = zip(offsets, weights, strict=True)
    qf = sum(w * _fourier(pos - width / 2 - o, freqs, zeros) for o, w in pairs)
    q[rows, sl_loc] = a * qf[rows]

  if kind == "a_shape":
    sink(pos >= 0)
    local(pos >= 0, 96)
  elif kind == "vertical_slash":
    sink(pos >= 0)
    cols = rng.choice(np.arange(8, t), 24, replace=False)
    colcode = _codes(rng, 1, d_code)[0]
    k[cols, sl_code] = colcode
    q[:, sl_code] = 0.6 * a * colcode
    local(pos >= 0, 16, offsets=(0.0, 300.0), weights=(1.0, 0.9))
  elif kind == "block_sparse":
    seg = 256
    n_topics = 6
    topic_of_seg = rng.integers(0, n_topics, -(-t // seg))
    topics = topic_of_seg[pos // seg]
    codes = _codes(rng, n_topics, d_code)
    k[:, sl_code] = codes[topics]
    q[:, sl_code] = a * codes[topics]
    sink(pos >= 0)
  elif kind == "grid":
    codes = _codes(rng, layout.frame_tokens, d_code)
    vis = ~is_text
    k[vis, sl_code] = codes[patch[vis]]
    q[vis, sl_code] = a * codes[patch[vis]]
    sink(pos >= 0)
    local(is_text, 64)
  elif kind == "q_boundary":
    sink(pos >= 0)
    cols = rng.choice(np.arange(8, t), 16, replace=False)
    colcode = _codes(rng, 1, d_code)[0]
    codes = _codes(rng, layout.frame_tokens, d_code)
    vis = ~is_text
    k[vis, sl_code] = codes[patch[vis]]
    q[vis, sl_code] = a * codes[patch[vis]]
    k[cols, sl_code] = colcode
    q[is_text, sl_code] = 0.6 * a * colcode
    local(pos >= 0, 64)
    q[vis, sl_loc] *= 0.5  # vision queries: the grid first, locality second
  elif kind == "2d_boundary":
    sink(pos >= 0)
    codes = _codes(rng, layout.frame_tokens, d_code)
    vis = ~is_text
    k[vis, sl_code] = codes[patch[vis]]
    q[vis, sl_code] = a * codes[patch[vis]]
    tr = np.where(is_text, text_rank, -1)
    freqs = rng.uniform(0, np.pi / 48, d_loc // 2)
    zeros = np.zeros(d_loc // 2)
    k[is_text, sl_loc] = _fourier(tr[is_text], freqs, zeros)
    q[is_text, sl_loc] = a * _fourier(tr[is_text] - 24.0, freqs, zeros)
  else:
    raise ValueError(f"unknown head kind {kind!r}; known: {HEAD_KINDS}")
  noise = 0.3
  q[:, sl_code.stop :] += noise * rng.standard_normal((t, head_dim - sl_code.stop))
  k[:, sl_code.stop :] += noise * rng.standard_normal((t, head_dim - sl_code.stop))
  # the logit scale of the kernels is 1/sqrt(H): pre-multiply so `strength` is in logits.
  return q * np.sqrt(head_dim), k


def make_batch(
  seed: int = 0,
  layout: VideoLayout | None = None,
  head_kinds=HEAD_KINDS,
  batch: int = 1,
  head_dim: int = 128,
  strength: float = 12.0,
  dtype=jnp.float32,
) -> SyntheticBatch:
  """A batch with one head per entry of `head_kinds` (same layout for every batch item).

  Returns q, k, v of shape [B, T, N, H] (K = N), modality [B, T].
  """
  layout = layout or VideoLayout()
  for kind in head_kinds:
    if kind not in HEAD_KINDS:
      raise ValueError(f"unknown head kind {kind!r}; known: {HEAD_KINDS}")
  rng = np.random.default_rng(seed)
  qs, ks = [], []
  for _ in range(batch):
    qh, kh = zip(
      *[_head(kind, layout, rng, head_dim, strength) for kind in head_kinds], strict=True
    )
    qs.append(np.stack(qh, axis=1))
    ks.append(np.stack(kh, axis=1))
  q = np.stack(qs)
  k = np.stack(ks)
  v = rng.standard_normal(q.shape)
  mod = np.broadcast_to(layout.arrays()[0], (batch, layout.seq_len))
  return SyntheticBatch(
    q=jnp.asarray(q, dtype),
    k=jnp.asarray(k, dtype),
    v=jnp.asarray(v, dtype),
    modality=jnp.asarray(mod, jnp.int32),
    head_kinds=tuple(head_kinds),
    layout=layout,
  )
