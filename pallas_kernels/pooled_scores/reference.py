"""Pure-jnp reference of the pooled_scores kernel."""

import jax
import jax.numpy as jnp


def pooled_scores_reference(qp, kp, q_lim, k_lim, *, scale, chunk=0):
  """(s [nQ, nK] in the inputs' dtype, -inf where k_lim[j] > q_lim[i]; chunk maxima or
  None): full f32 products of the inputs as given (f32 or bf16), f32 sums, rounded once."""
  s = jnp.einsum("ih,jh->ij", f32(qp), f32(kp), precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(k_lim[None, :] <= q_lim[:, None], s, -jnp.inf).astype(qp.dtype)
  if not chunk:
    return s, None
  n_k = s.shape[1]
  pad = -n_k % chunk
  padded = jnp.pad(s, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  return s, padded.reshape(s.shape[0], -1, chunk).max(-1)


def f32(x):
  """x in float32 (bfloat16 inputs exactly: their products are then exact in f32)."""
  return x.astype(jnp.float32)
