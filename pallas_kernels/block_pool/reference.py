"""Pure-jnp reference of the block_pool kernel."""

import jax.numpy as jnp


def block_mean_reference(x, bits, *, block, n_sel, rows=None, index=None):
  """Per block of `block` view rows, the mean of the rows each selection admits:
  [n_sel, L // block, H] f32 (see `block_pool.block_mean`)."""
  if index is not None:
    x = x[index[0], :, index[1]]
  xv = (x if rows is None else x[rows]).astype(jnp.float32)
  length, h = xv.shape
  xv = xv.reshape(length // block, block, h)
  out = []
  for m in range(n_sel):
    w = ((bits >> m) & 1).reshape(length // block, block)
    total = jnp.where(w[:, :, None] > 0, xv, 0.0).sum(1)
    out.append(total / jnp.maximum(w.sum(1), 1).astype(jnp.float32)[:, None])
  return jnp.stack(out)
