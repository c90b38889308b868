"""Exact per-row top-k, returned as a set in index order; Pallas on the Triton lowering.

For each row of x [R, n], the k largest entries with ties going to the lower index: the
entries `jax.lax.top_k` picks, but in ascending index order. XLA runs a top-k with k > 16
as a sort of the whole row on a GPU; this kernel counts instead of sorting. For the 229k
rows of 1024 chunk maxima of a 1M-token block_sparse plan (k 32) on an H200: 4.2 ms
against 10.9 ms (benchmarks/results/h200_2026-11-30/topk_kernel/topk_bench.json).

Algorithm, per program (`block_rows` rows):
  key = x as an int32 whose signed order is the float total order (the sign-magnitude
        bits flipped for negatives; -0.0 below +0.0, as lax.top_k has it)
  t   = the k-th largest key, built bit by bit from the top in the unsigned (key ^ 2^31)
        order: 32 passes, each keeping the bit if count(key >= candidate) >= k
        (bf16 / f16: the 16-bit pattern's key, shifted to [1, 2^16): 16 passes, half the
        counting; the planner's pooled scores are bf16 on a GPU)
  keep every entry with key > t, then the entries equal to t in index order until k
  slot = running count of kept entries; (index, value) are scattered to the row's slot
Rows of at most `tile` columns are loaded once and searched in registers; longer rows are
re-read tile by tile in each pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN = np.int32(-(2**31))  # also the key of a masked (padding) column: below every float
_LOW31 = np.int32(2**31 - 1)


_LOW15 = np.int32(2**15 - 1)
_OFFSET16 = np.int32(2**15 + 1)


def _key_bits(dtype):
  """The bits of `_keys`: 16 for bf16 / f16, 32 for f32."""
  return 16 if jnp.dtype(dtype).itemsize == 2 else 32


def _keys(x):
  """int32 keys whose signed order is x's total order (-0.0 below +0.0, as lax.top_k
  orders them; no NaN). f32: the bits, the magnitude flipped for negatives. bf16 / f16:
  the same on the 16-bit pattern (sign-extended), plus 2^15 + 1: keys in [1, 2^16) (the
  largest finite pattern and +inf stay below 2^15 - 1 before the shift), so that 0 (the
  masked key) is below every value and the search needs 16 bits."""
  if _key_bits(x.dtype) == 16:
    u = jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32)
    return jnp.where(u < 0, u ^ _LOW15, u) + _OFFSET16
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(u < 0, u ^ _LOW31, u)


def _kernel(x_ref, idx_ref, val_ref, *, n_rows, n, k, block_rows, tile, n_tiles):
  row0 = pl.program_id(0) * block_rows
  rows = row0 + jnp.arange(block_rows, dtype=jnp.int32)
  row_ok = rows < n_rows

  bits = _key_bits(x_ref.dtype)
  masked = _MIN if bits == 32 else np.int32(0)  # below every key

  def load(t):  # (x, keys, column ids) of tile t
    cols = t * tile + jnp.arange(tile, dtype=jnp.int32)
    ok = row_ok[:, None] & (cols < n)[None, :]
    ref = x_ref.at[pl.ds(row0, block_rows), pl.ds(t * tile, tile)]
    x = plgpu.load(ref, mask=ok, other=0)
    return x, jnp.where(ok, _keys(x), masked), cols

  if n_tiles == 1:  # the keys stay in registers; x is loaded again at the end
    _, key0, _ = load(0)

  def count_ge(cand):  # [R] entries with key >= cand (signed keys), per row
    if n_tiles == 1:
      return jnp.sum((key0 >= cand[:, None]).astype(jnp.int32), axis=1)

    def body(t, acc):
      _, key, _ = load(t)
      return acc + jnp.sum((key >= cand[:, None]).astype(jnp.int32), axis=1)

    return jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((block_rows,), jnp.int32))

  # f32 keys are signed: the search runs in the unsigned order (key ^ 2^31); 16-bit keys
  # are non-negative already
  flip = _MIN if bits == 32 else np.int32(0)

  def bit_step(b, res):  # res: the k-th largest key so far, unsigned bits in int32
    cand = res | jnp.left_shift(jnp.int32(1), bits - 1 - b)
    return jnp.where(count_ge(cand ^ flip) >= k, cand, res)

  t = jax.lax.fori_loop(0, bits, bit_step, jnp.zeros((block_rows,), jnp.int32)) ^ flip
  n_gt = count_ge(t + 1)  # keys > t (t + 1 cannot overflow: t is at most +inf's key)
  need = k - n_gt  # entries equal to t to keep, lowest index first

  def emit(x, key, cols, eq_before, kept_before):
    eq = key == t[:, None]
    eq_rank = eq_before[:, None] + jnp.cumsum(eq.astype(jnp.int32), axis=1)
    sel = (key > t[:, None]) | (eq & (eq_rank <= need[:, None]))
    slot = kept_before[:, None] + jnp.cumsum(sel.astype(jnp.int32), axis=1) - 1
    # the running counts for the next tile (sums: Triton has no slice for [:, -1])
    counts = (
      eq_before + jnp.sum(eq.astype(jnp.int32), axis=1),
      kept_before + jnp.sum(sel.astype(jnp.int32), axis=1),
    )
    sel &= row_ok[:, None]
    # entries not kept point at one spare slot past the rows (interpret mode writes masked
    # lanes back with their old value, so they must not alias a kept entry's slot)
    at = jnp.where(sel, rows[:, None] * k + slot, n_rows * k)
    plgpu.store(idx_ref.at[at], jnp.broadcast_to(cols[None, :], at.shape), mask=sel)
    plgpu.store(val_ref.at[at], x.astype(val_ref.dtype), mask=sel)
    return counts

  zero = jnp.zeros((block_rows,), jnp.int32)
  if n_tiles == 1:
    emit(*load(0), zero, zero)
  else:

    def body(t_i, carry):
      return emit(*load(t_i), *carry)

    jax.lax.fori_loop(0, n_tiles, body, (zero, zero))


def top_k_select(
  x,
  k: int,
  *,
  interpret: bool = False,
  block_rows: int | None = None,
  tile: int | None = None,
  num_warps: int | None = None,
  poison: float | None = None,
):
  """The k largest entries of each row, ties to the lower index, in index order.

  Args:
    x: [R, n] float (f32, bf16 or f16), no NaN (not checked: the planner's inputs are
      checked before they get here).
    k: 1 <= k <= n.
    interpret: run in Pallas interpret mode (CPU).
    block_rows, tile, num_warps: tuning; rows per program, columns held at once (a power
      of two; rows longer than `tile` are re-read in each of the 32 passes, 16 for
      bf16 / f16), warps.
    poison: tests only: the outputs start filled with this value (indices: -1), aliased
      into the kernel, so a slot the kernel fails to write keeps it.

  Returns:
    (idx [R, k] int32 ascending, values [R, k] in x's dtype): the entries
    `jax.lax.top_k(x, k)` picks.
  """
  if x.ndim != 2:
    raise ValueError(f"x must be [R, n]; got shape {x.shape}")
  if x.dtype not in SUPPORTED_DTYPES:
    raise ValueError(
      f"x dtype {x.dtype} is not supported; use one of "
      f"{[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}"
    )
  n_rows, n = x.shape
  if not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, n={n}]; got {k!r}")
  n_pow2 = 1 << max(0, (n - 1).bit_length())
  tile = tile or min(n_pow2, 4096)
  if tile & (tile - 1):
    raise ValueError(f"tile={tile} must be a power of two")
  tile = min(tile, n_pow2)
  block_rows = block_rows or max(1, min(16, 16384 // tile))
  if block_rows & (block_rows - 1):
    raise ValueError(f"block_rows={block_rows} must be a power of two")
  num_warps = num_warps or (4 if block_rows * tile <= 8192 else 8)
  return _call(
    x,
    k=k,
    block_rows=block_rows,
    tile=tile,
    num_warps=num_warps,
    interpret=interpret,
    poison=poison,
  )


@functools.partial(
  jax.jit, static_argnames=("k", "block_rows", "tile", "num_warps", "interpret", "poison")
)
def _call(x, *, k, block_rows, tile, num_warps, interpret, poison):
  n_rows, n = x.shape
  n_tiles = -(-n // tile)
  kernel = functools.partial(
    _kernel, n_rows=n_rows, n=n, k=k, block_rows=block_rows, tile=tile, n_tiles=n_tiles
  )
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  size = n_rows * k + 1
  in_specs, args, aliases = [whole((n_rows, n))], [x], {}
  if poison is not None:  # poisoned buffers become the outputs (the kernel ignores them)
    in_specs += [whole((size,))] * 2
    args += [jnp.full((size,), -1, jnp.int32), jnp.full((size,), poison, x.dtype)]
    aliases = {1: 0, 2: 1}
    kernel = functools.partial(_drop_aliased_inputs, kernel)
  idx, vals = pl.pallas_call(
    kernel,
    grid=(-(-n_rows // block_rows),),
    in_specs=in_specs,
    out_specs=[whole((size,)), whole((size,))],
    out_shape=[  # + 1: the spare slot
      jax.ShapeDtypeStruct((size,), jnp.int32),
      jax.ShapeDtypeStruct((size,), x.dtype),
    ],
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="mmjax_topk_select",
  )(*args)
  return idx[:-1].reshape(n_rows, k), vals[:-1].reshape(n_rows, k)


def _drop_aliased_inputs(kernel, x_ref, _idx_in, _val_in, idx_ref, val_ref, **kw):
  kernel(x_ref, idx_ref, val_ref, **kw)
