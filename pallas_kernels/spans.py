"""The span of the true entries of a mask, shared by the kernels' wrappers (the loop bounds
of col_select and pooled_topk) and the planner (`planning_lists._wide_rows`)."""

from __future__ import annotations

import jax.numpy as jnp


def true_span(mask):
  """(first, end) int32 along mask's last axis: the index of its first true entry and one
  past its last, (0, 0) where it has none (an empty range either way)."""
  n = mask.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  end = jnp.max(jnp.where(mask, idx + 1, 0), axis=-1)
  first = jnp.min(jnp.where(mask, idx, n), axis=-1)
  return jnp.minimum(first, end).astype(jnp.int32), end.astype(jnp.int32)
