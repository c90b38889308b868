"""Masked pooled-block scores and their chunk maxima in one pass; Pallas on the Triton
lowering.

The planner's block_sparse / grid picks: S = qp kp^T * scale over the pooled (mean) query
and key blocks [nQ, nK], -inf where a pair is not allowed, then per row the top-k through
chunk maxima (`mmjax.planning.top_k_entries`). XLA wrote S and read it back whole for the
maxima (at 1M tokens, 28 heads: 4.7 + 3.8 ms per component on an H200); here the maxima
come from the tile in registers as S is written, and only the chosen chunks are read back.

Algorithm, one program per [bm, bn] tile of S:
  if no pair of the tile is allowed (max q_lim < min k_lim) and not `fill`:
    store -inf as the tile's chunk maxima and leave its s unwritten  (the causal half of
      an identity view, the other modalities' blocks of a grouped one)
  s = qp[i-tile] kp[j-tile]^T * scale                        [bm, bn] f32
  s = -inf where k_lim[j] > q_lim[i]                         (the caller's mask)
  s rounded to the inputs' dtype (f32 or bf16)
  store s; store max over each run of `chunk` columns        [bm, bn / chunk]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

POOLED_DTYPES = (jnp.float32, jnp.bfloat16)


def _kernel(qp_ref, kp_ref, qlim_ref, klim_ref, s_ref, cmax_ref, *, scale, chunk, tf32, fill):
  bm, bn = s_ref.shape
  q_lim, k_lim = qlim_ref[...], klim_ref[...]

  def scores():
    s = plgpu.dot(qp_ref[...], kp_ref[...], trans_b=True, allow_tf32=tf32) * scale  # [bm, bn]
    s = jnp.where(k_lim[None, :] <= q_lim[:, None], s, -jnp.inf).astype(s_ref.dtype)
    s_ref[...] = s
    if cmax_ref is not None:
      cmax_ref[...] = jnp.max(s.reshape(bm, bn // chunk, chunk), axis=2)

  if fill:
    scores()
    return
  some = jnp.max(q_lim) >= jnp.min(k_lim)
  pl.when(some)(scores)

  @pl.when(jnp.logical_not(some))
  def _():
    cmax_ref[...] = jnp.full(cmax_ref.shape, -jnp.inf, cmax_ref.dtype)


def pooled_scores(
  qp,
  kp,
  q_lim,
  k_lim,
  *,
  scale: float,
  chunk: int = 0,
  block_m: int = 64,
  block_n: int = 64,
  tf32: bool = True,
  fill: bool = True,
  num_warps: int = 4,
  interpret: bool = False,
):
  """Masked scores of pooled blocks and, if `chunk`, their maxima per chunk of columns.

  Args:
    qp: [nQ, H] pooled queries; kp: [nK, H] pooled keys (padded inside to multiples of
      the tile: padded pairs are not allowed), both float32 or both bfloat16 (products of
      bfloat16 inputs are exact in f32; the sums are f32 either way).
    q_lim: [nQ] int32; k_lim: [nK] int32: pair (i, j) is allowed iff k_lim[j] <= q_lim[i].
    scale: the scores' scale.
    chunk: columns per chunk maximum (a power of two dividing block_n), or 0 for none.
    block_m, block_n: the tile (powers of two >= 16; at most the padded nQ / nK).
    tf32: f32 inputs rounded to TF32 for the dot (the matrix units' f32 mode, as XLA's
      default f32 dot on a GPU); False: full f32 products. (No effect on bfloat16.)
    fill: False (needs `chunk`): a tile without an allowed pair is skipped, its s left
      unwritten (undefined) and its chunk maxima -inf; read s only in chunks whose maximum
      is finite.
    interpret: Pallas interpret mode (CPU).

  Returns:
    (s [nQ, nK] in the inputs' dtype (bfloat16: the f32 sums rounded once, as a bf16
    matmul gives them; half the bytes written), -inf where not allowed; chunk maxima
    [nQ, ceil(nK / chunk)] of s or None; a partial last chunk is the maximum of its
    columns).
  """
  block_m, block_n = check_pooled(qp, kp, q_lim, k_lim, block_m, block_n)
  block_n = max(block_n, chunk)
  if chunk and (chunk & (chunk - 1) or block_n % chunk):
    raise ValueError(f"chunk={chunk} must be a power of two dividing block_n={block_n}")
  if not fill and not chunk:
    raise ValueError("fill=False needs chunk maxima (chunk > 0) to tell the unwritten tiles")
  return _call(
    qp,
    kp,
    q_lim,
    k_lim,
    scale=float(scale),
    chunk=chunk,
    block_m=block_m,
    block_n=block_n,
    tf32=tf32,
    fill=fill,
    num_warps=num_warps,
    interpret=interpret,
  )


def check_pooled(qp, kp, q_lim, k_lim, block_m, block_n):
  """Checks the pooled kernels' inputs (this one's and pooled_topk's); returns the tile
  (block_m, block_n) cut to the padded sizes."""
  if qp.ndim != 2 or kp.ndim != 2 or qp.shape[1] != kp.shape[1]:
    raise ValueError(f"qp must be [nQ, H] and kp [nK, H]; got {qp.shape}, {kp.shape}")
  if qp.dtype != kp.dtype or qp.dtype not in POOLED_DTYPES:
    raise ValueError(f"qp and kp must be both float32 or both bfloat16; got {qp.dtype}, {kp.dtype}")
  n_q, n_k = qp.shape[0], kp.shape[0]
  for name, b in (("block_m", block_m), ("block_n", block_n)):
    if b < 16 or b & (b - 1):
      raise ValueError(f"{name}={b} must be a power of two >= 16")
  for name, arr, n in (("q_lim", q_lim, n_q), ("k_lim", k_lim, n_k)):
    if arr.shape != (n,) or arr.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32 of shape ({n},); got {arr.dtype} {arr.shape}")
  return (
    min(block_m, max(16, 1 << (n_q - 1).bit_length())),
    min(block_n, max(16, 1 << (n_k - 1).bit_length())),
  )


def dot_tf32(dtype, tf32):
  """The `allow_tf32` of the pooled kernels' dot (this one's and pooled_topk's: the same
  dot) for inputs of `dtype`: a precision only for f32 inputs, None for bf16."""
  return tf32 if dtype == jnp.float32 else None


def pad_to_tiles(qp, kp, q_lim, k_lim, block_m, block_n):
  """The inputs padded to whole tiles; padded rows and columns allow nothing."""
  (n_q0, _), n_k0 = qp.shape, kp.shape[0]
  n_q, n_k = -(-n_q0 // block_m) * block_m, -(-n_k0 // block_n) * block_n
  return (
    jnp.pad(qp, ((0, n_q - n_q0), (0, 0))),
    jnp.pad(kp, ((0, n_k - n_k0), (0, 0))),
    jnp.pad(q_lim, (0, n_q - n_q0), constant_values=-1),
    jnp.pad(k_lim, (0, n_k - n_k0), constant_values=2**30),
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "chunk",
    "block_m",
    "block_n",
    "tf32",
    "fill",
    "num_warps",
    "interpret",
  ),
)
def _call(
  qp, kp, q_lim, k_lim, *, scale, chunk, block_m, block_n, tf32, fill, num_warps, interpret
):
  (n_q0, h), n_k0 = qp.shape, kp.shape[0]
  qp, kp, q_lim, k_lim = pad_to_tiles(qp, kp, q_lim, k_lim, block_m, block_n)
  n_q, n_k = qp.shape[0], kp.shape[0]
  out_specs = [pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))]
  out_shape = [jax.ShapeDtypeStruct((n_q, n_k), qp.dtype)]
  if chunk:
    out_specs.append(pl.BlockSpec((block_m, block_n // chunk), lambda i, j: (i, j)))
    out_shape.append(jax.ShapeDtypeStruct((n_q, n_k // chunk), qp.dtype))
  tf32 = dot_tf32(qp.dtype, tf32)
  kernel = functools.partial(_kernel, scale=scale, chunk=chunk, tf32=tf32, fill=fill)
  if not chunk:
    kernel = functools.partial(_no_chunks, kernel)
  out = pl.pallas_call(
    kernel,
    grid=(n_q // block_m, n_k // block_n),
    in_specs=[
      pl.BlockSpec((block_m, h), lambda i, j: (i, 0)),
      pl.BlockSpec((block_n, h), lambda i, j: (j, 0)),
      pl.BlockSpec((block_m,), lambda i, j: (i,)),
      pl.BlockSpec((block_n,), lambda i, j: (j,)),
    ],
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
    interpret=interpret,
    name="mmjax_pooled_scores",
  )(qp, kp, q_lim, k_lim)
  s = out[0][:n_q0, :n_k0]
  return (s, out[1][:n_q0, : -(-n_k0 // chunk)]) if chunk else (s, None)


def _no_chunks(kernel, qp_ref, kp_ref, qlim_ref, klim_ref, s_ref):
  kernel(qp_ref, kp_ref, qlim_ref, klim_ref, s_ref, None)
