"""Pure-jnp reference of the attn_mass kernel."""

import jax
import jax.numpy as jnp


def attention_mass_reference(q, k, key_lim, q_lim, base, *, scale, perm=None, index=None):
  """(col [L], slash [L]) as `attn_mass.attention_mass` defines them, from the dense
  softmax p [R, L] in f32."""
  if index is not None:
    k = k[index[0], :, index[1]]
  if perm is not None:
    k = k[perm]
  length = k.shape[0]
  s = jnp.einsum(
    "rh,jh->rj", q.astype(jnp.float32), k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  allowed = key_lim[None, :] <= q_lim[:, None]
  s = jnp.where(allowed, s * scale, -jnp.inf)
  m = jnp.max(s, axis=1, keepdims=True)
  e = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  p = e / jnp.maximum(e.sum(1, keepdims=True), 1e-30)
  # slash[o] = sum_r p[r, base_r - o] (0 where base_r - o < 0)
  o = jnp.arange(length)
  j = base[:, None] - o[None, :]
  slash = jnp.where(j >= 0, jnp.take_along_axis(p, jnp.clip(j, 0, length - 1), axis=1), 0.0)
  return p.sum(0), slash.sum(0)
