"""Pure-jnp reference of the topk_select kernel: `lax.top_k`, then index order."""

import jax
import jax.numpy as jnp


def top_k_select_reference(x, k):
  """The k largest entries of each row of x [R, n] (ties to the lower index), in
  ascending index order: (idx [R, k] int32, values [R, k])."""
  vals, idx = jax.lax.top_k(x, k)
  order = jnp.argsort(idx, axis=-1)
  return (
    jnp.take_along_axis(idx, order, axis=-1).astype(jnp.int32),
    jnp.take_along_axis(vals, order, axis=-1),
  )
