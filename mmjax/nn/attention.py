"""`SparseAttention`: a VLM decoder's attention layer with a pluggable sparsity policy.

Shape legend: B batch, T tokens, D model width, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.attention import sparse_attention
from mmjax.policies import Dense, Policy


def rope_cos_sin(
  positions, head_dim: int, theta: float = 1e6, mrope_section: tuple[int, ...] | None = None
):
  """cos, sin [B, T, H] for rotary embeddings (rotate-half convention).

  Args:
    positions: [B, T] (1D RoPE) or [3, B, T] temporal/height/width ids (mRoPE).
    head_dim: H, even.
    theta: RoPE base.
    mrope_section: for mRoPE, how many of the H/2 frequencies take each of the three
      position rows (Qwen2.5-VL: (16, 24, 24) for H = 128); must sum to H/2.

  Returns:
    cos, sin: [B, T, H] float32.
  """
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
  positions = jnp.asarray(positions)
  if mrope_section is None:
    if positions.ndim != 2:
      raise ValueError(f"1D RoPE takes positions [B, T], got shape {positions.shape}")
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  else:
    if positions.ndim != 3 or positions.shape[0] != len(mrope_section):
      raise ValueError(
        f"mRoPE takes positions [{len(mrope_section)}, B, T], got shape {positions.shape}"
      )
    if sum(mrope_section) != half:
      raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {half}")
    # frequency f takes its angle from position row r(f): the sections in order.
    row_of_freq = jnp.repeat(
      jnp.arange(len(mrope_section)), jnp.asarray(mrope_section), total_repeat_length=half
    )
    # [R, B, T, H/2] -> pick row r(f) for every frequency f -> [B, T, H/2]
    ang_all = positions[..., None].astype(jnp.float32) * inv_freq
    ang = jnp.take_along_axis(ang_all, row_of_freq[None, None, None, :], axis=0)[0]
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """x [B, T, N, H] rotated by cos/sin [B, T, H] (rotate-half convention)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + rot.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


class SparseAttention(nn.Module):
  """Causal prefill self-attention with q/k/v/o projections, GQA, RoPE or mRoPE, and a
  sparsity policy. The policy and backend are static fields (hashable), so a jitted
  `apply` retraces only when they change.

  Attributes:
    num_heads: N.
    num_kv_heads: K (N % K == 0).
    head_dim: H.
    policy: a policy from `mmjax.policies.get` (None: dense).
    backend: "reference", "xla" or "pallas".
    rope_theta: rotary base.
    mrope_section: None for 1D RoPE, else the mRoPE sections (Qwen2.5-VL: (16, 24, 24)).
    qkv_bias: biases on the q/k/v projections (Qwen2 style).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  policy: Policy | None = None
  backend: str = "xla"
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] | None = None
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, modality=None):
    """x [B, T, D]; positions [B, T] or [3, B, T]; modality [B, T] or None -> [B, T, D]."""
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, D], got shape {x.shape}")
    if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
      )
    b, t, d = x.shape
    pshape = (b, t) if self.mrope_section is None else (len(self.mrope_section), b, t)
    if tuple(jnp.shape(positions)) != pshape:
      raise ValueError(f"positions must have shape {pshape}, got {jnp.shape(positions)}")

    def proj(name, heads, bias):
      return nn.DenseGeneral(
        (heads, self.head_dim),
        use_bias=bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )

    # [B, T, D] -> [B, T, N, H] and [B, T, K, H]
    q = proj("q_proj", self.num_heads, self.qkv_bias)(x)
    k = proj("k_proj", self.num_kv_heads, self.qkv_bias)(x)
    v = proj("v_proj", self.num_kv_heads, self.qkv_bias)(x)
    cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.mrope_section)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    policy = self.policy if self.policy is not None else Dense()
    o = sparse_attention(q, k, v, policy, modality, backend=self.backend)
    # [B, T, N, H] -> [B, T, D]
    return nn.DenseGeneral(
      d,
      axis=(-2, -1),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="o_proj",
    )(o)


def dense_reference(params, x, positions, module: SparseAttention):
  """Plain causal attention with the module's params (for tests): [B, T, D]."""
  p = params["params"]
  q = jnp.einsum("btd,dnh->btnh", x, p["q_proj"]["kernel"])
  k = jnp.einsum("btd,dkh->btkh", x, p["k_proj"]["kernel"])
  v = jnp.einsum("btd,dkh->btkh", x, p["v_proj"]["kernel"])
  if module.qkv_bias:
    q, k, v = q + p["q_proj"]["bias"], k + p["k_proj"]["bias"], v + p["v_proj"]["bias"]
  cos, sin = rope_cos_sin(positions, module.head_dim, module.rope_theta, module.mrope_section)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  t = x.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  o = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
  return jnp.einsum("btnh,nhd->btd", o, p["o_proj"]["kernel"])
