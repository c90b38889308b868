"""Pure-jnp reference of the col_select kernel."""

import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max


def select_columns_reference(
  cand,
  cand_bits,
  cand_lim,
  row_bits,
  row_lim,
  blocks,
  block_count,
  *,
  block_k,
  max_cols,
  own=None,
  own_ok=None,
  own_lim=None,
):
  """(cols [R, max_cols], count [R]) as `col_select.select_columns` defines them: every
  row's candidate keys and own tokens in one row, sorted, the first of each key kept."""
  n_rows, n_blocks = blocks.shape
  keys = jnp.broadcast_to(cand, (n_rows, cand.shape[0]))
  ok = ((cand_bits[None, :] & row_bits[:, None]) != 0) & (cand_lim[None, :] <= row_lim[:, None])
  if own is not None:
    keys = jnp.concatenate([keys, own], axis=1)
    ok = jnp.concatenate([ok, own_ok & (own_lim <= row_lim[:, None])], axis=1)
  listed = jnp.arange(n_blocks)[None, :] < block_count[:, None]
  kb = keys // block_k
  inside = jnp.any((kb[:, :, None] == blocks[:, None, :]) & listed[:, None, :], axis=-1)
  srt = jnp.sort(jnp.where(ok & ~inside, keys, _BIG), axis=1)
  first = (srt < _BIG) & jnp.concatenate(
    [jnp.ones((n_rows, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1
  )
  count = jnp.minimum(first.sum(1), max_cols).astype(jnp.int32)
  # the kept keys in order: each one's slot is the number kept before it
  slot = jnp.where(first, jnp.cumsum(first, axis=1) - 1, max_cols)
  rows = jnp.arange(n_rows)[:, None]
  cols = jnp.zeros((n_rows, max_cols), jnp.int32).at[rows, slot].set(srt, mode="drop")
  return cols, count
