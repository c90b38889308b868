"""Qwen2.5-VL in Flax (linen): the vision tower and the language decoder, with a sparsity
policy in every decoder layer's prefill attention.

Written from the architecture as published (the Qwen2.5-VL report and the public
transformers implementation, read, not copied). Parameter names mirror the Hugging Face
checkpoint's so that `mmjax.models.checkpoint` maps them one to one.

Shape legend: B batch, T tokens, D text width, V vocabulary, N query heads, K kv heads,
H head dim, P vision patches, E vision width, F patch features (C * tp * p * p),
S cache length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import distributed
from mmjax.attention import sparse_attention
from mmjax.nn.attention import apply_rope, rope_cos_sin
from mmjax.policies import Dense, MMInference, Policy

# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (a ViT with windowed attention and a 2x2 patch merger)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: int = 2
  hidden_act: str = "silu"
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_features(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language decoder (Qwen2 with 3D mRoPE)."""

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """A Qwen2.5-VL model: text + vision configs and the special token ids."""

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  eos_token_ids: tuple[int, ...] = (151645, 151643)

  def __post_init__(self):
    t, v = self.text, self.vision
    if t.hidden_size % t.num_heads:
      raise ValueError(f"text hidden_size={t.hidden_size} is not a multiple of heads={t.num_heads}")
    if t.num_heads % t.num_kv_heads:
      raise ValueError(f"text num_heads={t.num_heads} not a multiple of kv heads={t.num_kv_heads}")
    if sum(t.mrope_section) * 2 != t.head_dim:
      raise ValueError(
        f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"
      )
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      raise ValueError(
        f"vision hidden_size={v.hidden_size} / num_heads={v.num_heads} must be a multiple of 4"
      )
    if v.out_hidden_size != t.hidden_size:
      raise ValueError(
        f"vision out_hidden_size={v.out_hidden_size} must equal text hidden_size={t.hidden_size}"
      )
    for act, where in ((t.hidden_act, "text"), (v.hidden_act, "vision")):
      if act not in _ACTS:
        raise ValueError(f"{where} hidden_act={act!r} is not supported; use one of {sorted(_ACTS)}")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> Qwen2_5_VLConfig:
    """From a Hugging Face `config.json` dict (flat text keys, as in the released
    checkpoints, or a nested `text_config`, as transformers 5 writes)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in archs:
      raise ValueError(
        f"not a Qwen2.5-VL config: model_type={model_type!r}, architectures={archs}; "
        "expected model_type 'qwen2_5_vl'"
      )
    td = dict(d)
    if isinstance(d.get("text_config"), Mapping):
      td = {**d, **d["text_config"]}
    rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
    theta = rope.get("rope_theta", td.get("rope_theta", 1e6))
    section = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
    if td.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True is not supported (Qwen2.5-VL ships with False)")
    hidden = int(td["hidden_size"])
    heads = int(td["num_attention_heads"])
    if td.get("head_dim") not in (None, hidden // heads):
      raise ValueError(f"head_dim={td['head_dim']} != hidden_size / heads = {hidden // heads}")
    tie = bool(d.get("tie_word_embeddings", td.get("tie_word_embeddings", False)))
    text = TextConfig(
      vocab_size=int(td["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(td["intermediate_size"]),
      num_layers=int(td["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(td.get("num_key_value_heads") or heads),
      rms_norm_eps=float(td.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      mrope_section=section,
      tie_word_embeddings=tie,
      hidden_act=td.get("hidden_act", "silu"),
    )
    vd = d.get("vision_config") or {}
    vrope = vd.get("rope_parameters") or {}
    vision = VisionConfig(
      depth=int(vd.get("depth", 32)),
      hidden_size=int(vd.get("hidden_size", 1280)),
      intermediate_size=int(vd.get("intermediate_size", 3420)),
      num_heads=int(vd.get("num_heads", 16)),
      in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
      patch_size=int(vd.get("patch_size", 14)),
      temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
      spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
      window_size=int(vd.get("window_size", 112)),
      fullatt_block_indexes=tuple(int(i) for i in vd.get("fullatt_block_indexes", ())),
      out_hidden_size=int(vd.get("out_hidden_size", hidden)),
      tokens_per_second=int(vd.get("tokens_per_second", 2)),
      hidden_act=vd.get("hidden_act", "silu"),
      rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    eos = td.get("eos_token_id", d.get("eos_token_id", 151645))
    eos = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
    return cls(
      text=text,
      vision=vision,
      image_token_id=int(d.get("image_token_id", 151655)),
      video_token_id=int(d.get("video_token_id", 151656)),
      vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
      vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
      eos_token_ids=eos,
    )

  @classmethod
  def from_dir(cls, path: str) -> Qwen2_5_VLConfig:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
      raise FileNotFoundError(f"no config.json in checkpoint dir {path!r}")
    with open(f) as fh:
      return cls.from_hf(json.load(fh))


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
  """The shapes of Qwen2.5-VL-7B-Instruct."""
  return Qwen2_5_VLConfig()


# ----------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------
_ACTS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (w.astype(self.dtype) * xf.astype(self.dtype)).astype(self.dtype)


def _dense(features, name, bias, dtype, param_dtype):
  return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


class MLP(nn.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  intermediate: int
  act: str = "silu"
  bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    mk = lambda f, n: _dense(f, n, self.bias, self.dtype, self.param_dtype)
    h = _ACTS[self.act](mk(self.intermediate, "gate_proj")(x)) * mk(self.intermediate, "up_proj")(x)
    return mk(d, "down_proj")(h)


# ----------------------------------------------------------------------------------------
# vision tower
# ----------------------------------------------------------------------------------------
GridTHW = tuple[tuple[int, int, int], ...]


def as_grid(grid_thw) -> GridTHW:
  """[n, 3] ints (array or nested sequence) -> a hashable tuple of (t, h, w)."""
  g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return tuple((int(t), int(h), int(w)) for t, h, w in g)


def _check_grid(grid: GridTHW, cfg: VisionConfig):
  m = cfg.spatial_merge_size
  for i, (t, h, w) in enumerate(grid):
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(
        f"grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
        f"spatial_merge_size={m}"
      )


def vision_layout(grid: GridTHW, cfg: VisionConfig):
  """Static index tables of the vision tower for one set of images/videos (numpy).

  Returns a dict:
    hw_pos [P, 2]: (row, col) patch coordinates, merge-block-major as the patches come.
    window_index [P / m^2]: merged units reordered window by window.
    window_seqlens, frame_seqlens: segment lengths (patches, in window order) of the
      windowed and of the full-attention blocks.
  """
  m = cfg.spatial_merge_size
  unit = m * m
  win = cfg.window_size // m // cfg.patch_size
  if win < 1:
    raise ValueError(f"window_size={cfg.window_size} is smaller than one merged unit")
  hw, order, wlens, flens = [], [], [], []
  base = 0
  for t, h, w in grid:
    # patch coordinates, grouped by m x m merge blocks (row-major over blocks)
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = r.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    c = c.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    hw.append(np.tile(np.stack([r, c], -1), (t, 1)))
    # windows of win x win merged units, per frame, row-major over windows
    gh, gw = h // m, w // m
    idx = np.arange(t * gh * gw).reshape(t, gh, gw)
    nwh, nww = -(-gh // win), -(-gw // win)
    for f in range(t):
      for a in range(nwh):
        for b in range(nww):
          cell = idx[f, a * win : (a + 1) * win, b * win : (b + 1) * win].reshape(-1)
          order.append(cell + base)
          wlens.append(cell.size * unit)
      flens.append(h * w)
    base += t * gh * gw
  return {
    "hw_pos": np.concatenate(hw, 0),
    "window_index": np.concatenate(order, 0),
    "window_seqlens": np.asarray(wlens, np.int64),
    "frame_seqlens": np.asarray(flens, np.int64),
  }


def _segments(seqlens: np.ndarray):
  """Packed segments -> (gather [G, L] into the packed axis, valid [G, L], back [P])."""
  lmax = int(seqlens.max())
  starts = np.concatenate([[0], np.cumsum(seqlens)[:-1]])
  off = np.arange(lmax)
  valid = off[None, :] < seqlens[:, None]
  gather = np.where(valid, starts[:, None] + off[None, :], 0)
  back = np.concatenate([i * lmax + np.arange(n) for i, n in enumerate(seqlens)])
  return gather.astype(np.int32), valid, back.astype(np.int32)


def segment_attention(q, k, v, seqlens: np.ndarray):
  """Non-causal attention inside packed segments.

  Args:
    q, k, v: [P, N, H], the segments laid end to end.
    seqlens: static segment lengths (numpy), summing to P.

  Returns:
    [P, N, H] in q's dtype.
  """
  gather, valid, back = _segments(seqlens)
  prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  qs, ks, vs = (x[gather] for x in (q, k, v))  # [G, L, N, H]
  # [G, L, N, H] x [G, L', N, H] -> [G, N, L, L']
  s = jnp.einsum("glnh,gmnh->gnlm", qs, ks, precision=prec, preferred_element_type=jnp.float32)
  s = s / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.asarray(valid)[:, None, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  # [G, N, L, L'] x [G, L', N, H] -> [G, L, N, H]
  o = jnp.einsum("gnlm,gmnh->glnh", p, vs, precision=prec)
  return o.reshape(-1, *o.shape[2:])[back]


class VisionBlock(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, seqlens):
    """x [P, E]; cos/sin [P, H]; seqlens: static segment lengths -> [P, E]."""
    c = self.cfg
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    h = RMSNorm(1e-6, name="norm1", **kw)(x)
    qkv = _dense(3 * c.hidden_size, "qkv", True, **kw)(h)
    # [P, 3E] -> 3 x [P, N, H]
    q, k, v = jnp.split(qkv.reshape(x.shape[0], 3, c.num_heads, c.head_dim), 3, axis=1)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    q = apply_rope(q[None], cos[None], sin[None])[0]
    k = apply_rope(k[None], cos[None], sin[None])[0]
    o = segment_attention(q, k, v, seqlens).reshape(x.shape[0], c.hidden_size)
    x = x + _dense(c.hidden_size, "proj", True, **kw)(o)
    h = RMSNorm(1e-6, name="norm2", **kw)(x)
    return x + MLP(c.intermediate_size, c.hidden_act, True, name="mlp", **kw)(h)


class VisionTower(nn.Module):
  """Patches [P, F] of images/videos -> merged tokens [P / m^2, D] in the input order."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values, grid_thw):
    """pixel_values [P, F]; grid_thw: static (t, h, w) per item -> [P / m^2, D]."""
    c = self.cfg
    grid = as_grid(grid_thw)
    _check_grid(grid, c)
    n_patch = sum(t * h * w for t, h, w in grid)
    if pixel_values.ndim != 2 or pixel_values.shape != (n_patch, c.patch_features):
      raise ValueError(
        f"pixel_values must be [P, F] = {(n_patch, c.patch_features)} for grid_thw={grid}, "
        f"got {pixel_values.shape}"
      )
    lay = vision_layout(grid, c)
    unit = c.spatial_merge_size**2
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    # patch embedding (a Conv3d whose kernel equals its stride): [P, F] x [F, E]
    x = nn.Dense(c.hidden_size, use_bias=False, name="patch_embed", **kw)(
      pixel_values.astype(self.dtype)
    )
    # 2D rotary angles: the first H/4 frequencies rotate by row, the next H/4 by column.
    quarter = c.head_dim // 4
    inv = 1.0 / (c.rope_theta ** (np.arange(quarter, dtype=np.float64) * 2 / (c.head_dim // 2)))
    ang = lay["hw_pos"][:, :, None].astype(np.float64) * inv  # [P, 2, H/4]
    ang = ang.reshape(n_patch, 2 * quarter)
    ang = np.concatenate([ang, ang], -1).astype(np.float32)  # [P, H]
    # reorder merged units window by window (each unit's m^2 patches stay together)
    perm = (lay["window_index"][:, None] * unit + np.arange(unit)).reshape(-1)
    x = x[perm]
    cos, sin = jnp.asarray(np.cos(ang[perm])), jnp.asarray(np.sin(ang[perm]))
    for i in range(c.depth):
      lens = lay["frame_seqlens"] if i in c.fullatt_block_indexes else lay["window_seqlens"]
      x = VisionBlock(c, name=f"blocks_{i}", **kw)(x, cos, sin, lens)
    # patch merger: norm, m^2 neighbours concatenated, 2-layer GELU MLP
    x = RMSNorm(1e-6, name="merger_ln_q", **kw)(x).reshape(-1, unit * c.hidden_size)
    x = _dense(unit * c.hidden_size, "merger_mlp_0", True, **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    x = _dense(c.out_hidden_size, "merger_mlp_2", True, **kw)(x)
    return x[np.argsort(lay["window_index"])]


# ----------------------------------------------------------------------------------------
# language decoder
# ----------------------------------------------------------------------------------------
def layer_policy(policy: Policy | None, layer: int) -> Policy:
  """The policy of one decoder layer: `mminference` tables are per layer."""
  if policy is None:
    return Dense()
  if isinstance(policy, MMInference):
    return policy.for_layer(layer)
  return policy


class TextAttention(nn.Module):
  cfg: TextConfig
  layer: int
  policy: Policy | None = None
  backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mesh: Any = None

  def setup(self):
    c = self.cfg
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.q_proj = _dense(c.num_heads * c.head_dim, "q_proj", True, **kw)
    self.k_proj = _dense(c.num_kv_heads * c.head_dim, "k_proj", True, **kw)
    self.v_proj = _dense(c.num_kv_heads * c.head_dim, "v_proj", True, **kw)
    self.o_proj = _dense(c.hidden_size, "o_proj", False, **kw)

  def _qkv(self, x, cos, sin):
    c = self.cfg
    b, t, _ = x.shape
    # [B, T, D] -> [B, T, N, H], [B, T, K, H]
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x, cos, sin, modality):
    """Prefill: x [B, T, D] -> ([B, T, D], (k, v) [B, T, K, H] for the cache)."""
    q, k, v = self._qkv(x, cos, sin)
    # the offline search and the model ablation read each layer's q/k/v: mutable=["calib"]
    self.sow("calib", "qkv", (q, k, v))
    pol = layer_policy(self.policy, self.layer)
    if self.mesh is None:
      o = sparse_attention(q, k, v, pol, modality, backend=self.backend)
    else:  # head-parallel (all-to-all from the token-sharded q/k/v when mesh.seq > 1)
      q, k, v = (distributed.constrain(a, self.mesh, distributed.QKV) for a in (q, k, v))
      o = distributed.sharded_sparse_attention(
        q, k, v, pol, modality, mesh=self.mesh, backend=self.backend
      )
    return self.o_proj(o.reshape(*x.shape[:2], -1)), (k, v)

  def decode(self, x, cos, sin, cache, index):
    """One step: x [B, 1, D], cache (k, v) [B, S, K, H], index: this token's slot."""
    c = self.cfg
    q, k, v = self._qkv(x, cos, sin)
    ck, cv = cache
    ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
    b, s = ck.shape[:2]
    g = c.num_heads // c.num_kv_heads
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    qg = q.reshape(b, c.num_kv_heads, g, c.head_dim)
    # [B, K, G, H] x [B, S, K, H] -> [B, K, G, S]
    sc = jnp.einsum("bkgh,bskh->bkgs", qg, ck, precision=prec, preferred_element_type=jnp.float32)
    sc = sc / math.sqrt(c.head_dim)
    sc = jnp.where(jnp.arange(s) <= index, sc, -jnp.inf)
    p = jax.nn.softmax(sc, axis=-1).astype(cv.dtype)
    # [B, K, G, S] x [B, S, K, H] -> [B, K, G, H]
    o = jnp.einsum("bkgs,bskh->bkgh", p, cv, precision=prec)
    return self.o_proj(o.reshape(b, 1, -1).astype(x.dtype)), (ck, cv)


class DecoderLayer(nn.Module):
  cfg: TextConfig
  layer: int
  policy: Policy | None = None
  backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mesh: Any = None
  mlp_chunk: int = 0

  def setup(self):
    c = self.cfg
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.input_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.self_attn = TextAttention(c, self.layer, self.policy, self.backend, mesh=self.mesh, **kw)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, **kw)
    self.mlp = MLP(c.intermediate_size, c.hidden_act, False, **kw)

  def __call__(self, x, cos, sin, modality):
    a, kv = self.self_attn(self.input_layernorm(x), cos, sin, modality)
    x = x + a
    return x + self._mlp(self.post_attention_layernorm(x)), kv

  def _mlp(self, x):
    """The MLP, over `mlp_chunk` tokens at a time when set: the [B, T, I] hiddens (I =
    5.3 D for Qwen2.5-VL-7B) are what a long prefill's peak memory holds otherwise. With
    a mesh, the chunks are of each device's own T / seq tokens (no communication)."""
    b, t, d = x.shape
    c = self.mlp_chunk
    s = self.mesh.shape["seq"] if self.mesh is not None else 1
    if not c or c >= t // s or self.is_initializing():
      return self.mlp(x)
    # [B, T, D] -> [B, S, T/S, D] (S = mesh seq): the token axis split as the mesh splits
    # it, so chunking axis 2 slices every device's local tokens.
    xs = x.reshape(b, s, t // s, d)
    spec = distributed.P("data", "seq", None, None)
    if self.mesh is not None:
      xs = distributed.constrain(xs, self.mesh, spec)
    # a loop over chunks that overwrites each chunk of its own carry with the MLP of it
    # ([B, S, c, D] -> [B, S, c, D]), so one chunk's hiddens live at a time and no stacked
    # copies of x are made (lax.map's per-layer output stacks were all allocated at once
    # on the GPU: 65 GB of temporaries for 28 layers at 256k, tools/prefill_memory.py).
    tl = t // s
    n = -(-tl // c)
    if n * c != tl:
      xs = jnp.pad(xs, ((0, 0), (0, 0), (0, n * c - tl), (0, 0)))
    mlp, variables = self.mlp.unbind()  # a pure function of the chunk

    def body(i, acc):
      if self.mesh is not None:
        acc = distributed.constrain(acc, self.mesh, spec)
      chunk = jax.lax.dynamic_slice_in_dim(acc, i * c, c, axis=2)
      return jax.lax.dynamic_update_slice_in_dim(acc, mlp.apply(variables, chunk), i * c, 2)

    out = jax.lax.fori_loop(0, n, body, xs)[:, :, :tl].reshape(b, t, d)
    if self.mesh is not None:
      out = distributed.constrain(out, self.mesh, distributed.TOKENS)
    return out

  def decode(self, x, cos, sin, cache, index):
    a, cache = self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, index)
    x = x + a
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Qwen2_5_VL(nn.Module):
  """The whole model. Methods (call through `apply(..., method=...)`):

  - `__call__` / `prefill`: token ids (+ vision patches) -> logits and the kv cache.
  - `decode`: one token per sequence against the cache.
  - `embed`: token embeddings with the vision features put in place of the pad tokens.

  Attributes:
    config: the model's shapes.
    policy: the prefill sparsity policy of every decoder layer (an `mminference` policy
      gives each layer its own row of the table); None = dense.
    backend: `mmjax.sparse_attention` backend of the prefill ("xla", "pallas",
      "reference", or "cudnn" for the dense policy).
    mesh: None (one device), or a `mmjax.distributed.make_mesh` mesh: the prefill then runs
      sequence parallel (activations [B/data, T/seq, D] per device), tensor parallel over
      `heads` (place the params with `mmjax.distributed.shard_params`), and head-parallel
      sparse attention (see `mmjax.distributed`).
    mlp_chunk: run each MLP over this many tokens at a time (0: all at once), of each
      device's own T / seq tokens with a mesh; bounds the peak memory of a long prefill.
      Same numbers either way.
  """

  config: Qwen2_5_VLConfig
  policy: Policy | None = None
  backend: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mesh: Any = None
  mlp_chunk: int = 0

  def setup(self):
    c = self.config
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.visual = VisionTower(c.vision, **kw)
    self.embed_tokens = nn.Embed(
      c.text.vocab_size, c.text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.layers = [
      DecoderLayer(
        c.text, i, self.policy, self.backend, mesh=self.mesh, mlp_chunk=self.mlp_chunk, **kw
      )
      for i in range(c.text.num_layers)
    ]
    self.norm = RMSNorm(c.text.rms_norm_eps, **kw)
    if not c.text.tie_word_embeddings:
      self.lm_head = _dense(c.text.vocab_size, "lm_head", False, **kw)

  def _logits(self, x):
    x = self.norm(x)
    if self.config.text.tie_word_embeddings:
      return self.embed_tokens.attend(x)
    return self.lm_head(x)

  def embed(
    self,
    input_ids,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
  ):
    """[B, T] ids -> [B, T, D] embeddings; the image/video pad tokens take, in order, the
    vision tower's merged tokens of the images/videos (grids are static)."""
    c = self.config
    x = self.embed_tokens(input_ids)
    for ids_tok, pv, grid in (
      (c.image_token_id, pixel_values, image_grid_thw),
      (c.video_token_id, pixel_values_videos, video_grid_thw),
    ):
      if pv is None:
        continue
      feats = self.visual(pv, grid).astype(x.dtype)  # [n_vis, D]
      mask = input_ids == ids_tok  # [B, T]
      slot = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
      x = jnp.where(mask[..., None], feats[jnp.clip(slot, 0, feats.shape[0] - 1)], x)
    return x

  def calibration_qk(self, input_ids, position_ids, **vision):
    """Per layer (q [B, T, N, H], k [B, T, K, H]) of a dense prefill, for the offline
    search. Call with `apply(..., method="calibration_qk", mutable=["calib"])`; the pairs
    come back in the "calib" collection (see `mmjax.search.model_layers`)."""
    x = self.embed(input_ids, **vision)
    return self.prefill_embeds(x, position_ids, None, all_logits=False)[0]

  def prefill_embeds(self, x, position_ids, modality=None, all_logits=False):
    """Decoder prefill from embeddings x [B, T, D] and mRoPE positions [3, B, T].

    Returns (logits [B, T, V] if all_logits else [B, 1, V] of the last token,
             cache: per layer (k, v) [B, T, K, H]).
    """
    t = self.config.text
    cos, sin = rope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    shard = (lambda a: a) if self.mesh is None else self._shard_tokens
    if self.mesh is not None:
      distributed.MeshShape.of(self.mesh).check(
        batch=x.shape[0],
        seq_len=x.shape[1],
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        where="Qwen2_5_VL prefill",
      )
    x, cos, sin = shard(x), shard(cos), shard(sin)
    cache = []
    for layer in self.layers:
      x, kv = layer(x, cos, sin, modality)
      x = shard(x)
      cache.append(kv)
    if not all_logits:
      x = x[:, -1:]
    return self._logits(x), cache

  def _shard_tokens(self, a):
    """[B, T, ...] -> laid out [B/data, T/seq, ...] per device (sequence parallel)."""
    pspec = distributed.P("data", "seq", *([None] * (a.ndim - 2)))
    return distributed.constrain(a, self.mesh, pspec)

  def __call__(
    self,
    input_ids,
    position_ids,
    modality=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    all_logits=True,
  ):
    """Prefill. input_ids [B, T]; position_ids [3, B, T]; modality [B, T] (0 text,
    1 vision; None: all text) -> (logits, cache) as `prefill_embeds`."""
    x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    return self.prefill_embeds(x, position_ids, modality, all_logits)

  def decode(self, token, position, cache, index):
    """token [B] ids at text position [B] (all three mRoPE rows equal), written to cache
    slot `index` -> (logits [B, V], cache)."""
    t = self.config.text
    x = self.embed_tokens(token[:, None])
    pos = jnp.broadcast_to(position[None, :, None], (3, token.shape[0], 1))
    cos, sin = rope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
    new = []
    for layer, kv in zip(self.layers, cache, strict=True):
      x, kv = layer.decode(x, cos, sin, kv, index)
      new.append(kv)
    return self._logits(x)[:, 0], new


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------
def param_shapes(config: Qwen2_5_VLConfig, dtype=jnp.float32):
  """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), no compute."""
  model = Qwen2_5_VL(config, dtype=dtype, param_dtype=dtype)
  v = config.vision
  m = v.spatial_merge_size
  grid = ((1, m, m),)
  pv = jax.ShapeDtypeStruct((m * m, v.patch_features), dtype)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  pos = jax.ShapeDtypeStruct((3, 1, 1), jnp.int32)

  def init(key, ids, pos, pv):
    ids = ids.at[0, 0].set(config.image_token_id)
    return model.init(key, ids, pos, None, pv, grid)

  # only the params (init also returns the "calib" q/k the decoder sows)
  return {"params": jax.eval_shape(init, jax.random.key(0), ids, pos, pv)["params"]}


def init_params(
  config: Qwen2_5_VLConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02, mesh=None
):
  """Random parameters without running the model (normal(std) weights, zero biases, unit
  norms), made leaf by leaf on the device: usable for 7B-sized models on one GPU. With a
  `mesh` they are made in place with `mmjax.distributed.param_shardings`.

  Leaf i is normal(fold_in(key(seed), i)). One small jitted function per distinct (kind,
  shape, dtype, sharding) makes the leaves (the 28 layers of a 7B model share ~12 of
  them): one jit over all leaves took 2-3 minutes to compile on a GPU.
  """
  shapes = param_shapes(config, dtype)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  shardings = [None] * len(leaves)
  if mesh is not None:
    shardings = jax.tree_util.tree_leaves(distributed.param_shardings(shapes, mesh))
  makers = {}

  def maker(kind, shape, dtype, sharding):
    sig = (kind, shape, jnp.dtype(dtype).name, sharding)
    if sig not in makers:

      def make(key, i):
        if kind == "weight":
          return jnp.ones(shape, dtype)
        if kind == "bias":
          return jnp.zeros(shape, dtype)
        k = jax.random.fold_in(key, i)
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

      makers[sig] = jax.jit(make, out_shardings=sharding)
    return makers[sig]

  key = jax.random.key(seed)
  out = []
  for i, ((path, leaf), sharding) in enumerate(zip(leaves, shardings, strict=True)):
    name = str(path[-1].key) if hasattr(path[-1], "key") else ""
    kind = name if name in ("weight", "bias") else "normal"
    out.append(maker(kind, tuple(leaf.shape), leaf.dtype, sharding)(key, jnp.uint32(i)))
  return jax.tree_util.tree_unflatten(treedef, out)


def vision_inputs(batch: Mapping[str, Any]) -> dict:
  """The model's vision arguments from a processor output (grids made static)."""
  out = {}
  if batch.get("pixel_values") is not None:
    out["pixel_values"] = jnp.asarray(batch["pixel_values"])
    out["image_grid_thw"] = as_grid(batch["image_grid_thw"])
  if batch.get("pixel_values_videos") is not None:
    out["pixel_values_videos"] = jnp.asarray(batch["pixel_values_videos"])
    out["video_grid_thw"] = as_grid(batch["video_grid_thw"])
  return out


def count_vision_tokens(grid: Sequence[Sequence[int]] | None, merge: int) -> int:
  if grid is None:
    return 0
  return sum(t * h * w for t, h, w in as_grid(grid)) // (merge * merge)
