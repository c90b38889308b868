"""Pure-jnp reference of the pooled_topk kernel."""

import jax
import jax.numpy as jnp


def pooled_top_k_reference(qp, kp, q_lim, k_lim, *, k, scale, scores=None):
  """(idx [nQ, k], vals [nQ, k]) that `lax.top_k` picks from the masked scores (full f32
  products; or `scores` [nQ, nK] given, e.g. a kernel's) rounded to the inputs' dtype,
  -inf past the allowed pairs."""
  if scores is None:
    scores = jnp.einsum("ih,jh->ij", f32(qp), f32(kp), precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(k_lim[None, :] <= q_lim[:, None], scores, -jnp.inf).astype(qp.dtype)
  vals, idx = jax.lax.top_k(s, k)
  return idx.astype(jnp.int32), vals


def f32(x):
  """x in float32 (bfloat16 inputs exactly: their products are then exact in f32)."""
  return x.astype(jnp.float32)
