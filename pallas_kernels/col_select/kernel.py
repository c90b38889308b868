"""Per query block, the single key columns a sparse plan visits; Pallas on the Triton
lowering.

A plan's vertical lines are one shared candidate list per head (each pattern's picked
columns, sorted once), offered to the query blocks a pattern serves. Each query block
keeps the candidates it is offered that are causal for it and not inside one of its kept
key blocks, plus (in a query-only view) its own tokens, deduplicated and ascending, the
first `max_cols`. In XLA that took a dozen passes over [R, V] arrays (binary searches one
step per pass, a merge with the own tokens, prefix counts, scatters): 20-25 ms of a
q_boundary plan at 1M tokens for 28 heads on an H200. Here one program takes one row:

  own tokens (U of them): kept if allowed, not covered, and no offered candidate has the
    same key (a binary search in the shared list)
  loop over the shared list in chunks of C, from the chunk of the first entry offered to
  the row to that of the last (`_ranges`):
    kept = offered to the row (set bits) and the first offered entry of its key (the
           offered sets of the equal entries before it, `prev_bits`), causal
           (cand_lim <= row_lim), not covered (a binary search in the row's blocks)
    slot = kept before it (a running count + a cumsum in the chunk)
           + kept own tokens below it      ([U, C] comparisons, only in rows keeping some)
    the key is stored at its slot (slots past max_cols dropped)
    kept own tokens learn how many kept candidates lie below them   ([U, C], likewise)
  kept own tokens stored at their slots (their rank among themselves by [U, U]
    comparisons: they need not be sorted); the slots from the count to max_cols set to 0

Few rows keep an own token (a local window or the nearest diagonals cover a query
block's own tokens), but a kernel whose code holds the [U, C] arrays gets few programs
per SM for every row (its registers), and the searches are latency-bound. So a first
kernel does the rows that keep none and marks the others, and a second kernel does those
into the same buffers: 2.05x on q_boundary's shape at 1M on an H200 against both kinds
of rows in one kernel (benchmarks/results/h200_2026-12-01d, `own_mode` at d802b4d).

Keys equal in the list must have equal cand_lim (it is a property of the key), so being
causal and not covered is the same for every copy of a key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.spans import true_span

_PAD = np.int32(np.iinfo(np.int32).max)  # the key of the list's padding entries
# a spare output slot per row (see `_kernel`): None in interpret mode only, or True / False
SPARE_SLOT = None


def _count_below(ref, base, n, n_max, x, mask):
  """Entries of ref[base : base + n] (ascending; n <= n_max, n_max static) below x, per
  element of x: a branchless binary search of unrolled gathers."""
  lo = jnp.zeros(x.shape, jnp.int32)
  step = 1 << (n_max.bit_length() - 1) if n_max else 0
  while step:
    probe = lo + step
    val = plgpu.load(ref.at[base + jnp.minimum(probe, n_max) - 1], mask=mask, other=0)
    lo = jnp.where((probe <= n) & (val < x), probe, lo)
    step >>= 1
  return lo


def _kernel(*refs, n_cand, chunk, n_blocks, max_cols, n_own, block_k, zero_chunk, phase, spare):
  """One row (query block) per program. phase: "all" (no own tokens), "light" (the rows
  that keep no own token; each row's count of kept own tokens goes to `flag`), "heavy"
  (the rows `flag` marks; the outputs are the light call's, aliased). spare: each row has
  one slot more, which the lanes that store nothing point at (interpret mode)."""
  (cand_ref, bits_ref, prev_ref, run_ref, lim_ref, rbits_ref, rlim_ref) = refs[:7]
  first_ref, end_ref, blocks_ref, bcount_ref = refs[7:11]
  rest = list(refs[11:])
  own_ref = own_ok_ref = own_lim_ref = flag_in = flag_out = None
  if n_own:
    own_ref, own_ok_ref, own_lim_ref = rest[:3]
    rest = rest[3:]
  if phase == "heavy":  # the flags, then the light call's outputs (aliased to ours)
    flag_in = rest[0]
    rest = rest[3:]
  if phase == "light":
    cols_ref, count_ref, flag_out = rest
  else:
    cols_ref, count_ref = rest
  i = pl.program_id(0)
  rb = rbits_ref[i]
  rl = rlim_ref[i]
  nb = bcount_ref[i]
  b_base = i * n_blocks
  # row i's slots, and in interpret mode one more: a lane that stores nothing points
  # there (the interpreter writes its old value back, which must not land on a slot
  # another lane of the same store fills; on a GPU a masked lane writes nothing)
  width = max_cols + spare
  out_base = i * width

  def slots(slot, put):
    return out_base + jnp.where(put, slot, max_cols if spare else 0)

  def covered(keys, mask):  # is key // block_k one of the row's blocks
    if not n_blocks:
      return jnp.zeros(keys.shape, jnp.bool_)
    kb = keys // block_k
    lo = _count_below(blocks_ref, b_base, nb, n_blocks, kb, mask)
    at = plgpu.load(blocks_ref.at[b_base + jnp.minimum(lo, n_blocks - 1)], mask=mask, other=-1)
    return (lo < nb) & (at == kb)

  def own_tokens():  # (own [U], kept [U], how many are kept)
    sl = pl.ds(i * n_own, n_own)
    own = own_ref[sl]
    ok = (own_ok_ref[sl] != 0) & (own_lim_ref[sl] <= rl)
    ok &= ~covered(own, ok)
    # an offered candidate with the same key takes the key instead
    pos = _count_below(cand_ref, 0, n_cand, n_cand, own, ok)
    at = jnp.minimum(pos, n_cand - 1)
    same = plgpu.load(cand_ref.at[at], mask=ok, other=-1) == own
    offered = (plgpu.load(run_ref.at[at], mask=ok, other=0) & rb) != 0
    kept_own = ok & ~(same & offered)
    return own, kept_own, jnp.sum(jnp.where(kept_own, 1, 0))

  def body(c, carry, own_terms):
    total, below_own = carry
    sl = pl.ds(c * chunk, chunk)
    a = cand_ref[sl]
    kept = ((bits_ref[sl] & rb) != 0) & ((prev_ref[sl] & rb) == 0) & (lim_ref[sl] <= rl)
    kept &= ~covered(a, kept)
    k_i = jnp.where(kept, 1, 0).astype(jnp.int32)
    slot = total + jnp.cumsum(k_i) - k_i
    if own_terms is not None:
      own, kept_own, _ = own_terms
      # [U, C]: kept own tokens below each candidate, kept candidates below each own token
      below_a = jnp.where(kept_own[:, None] & (own[:, None] < a[None, :]), 1, 0)
      below_o = jnp.where(kept[None, :] & (a[None, :] < own[:, None]), 1, 0)
      slot += jnp.sum(below_a, axis=0).astype(jnp.int32)
      below_own += jnp.sum(below_o, axis=1).astype(jnp.int32)
    put = kept & (slot < max_cols)
    plgpu.store(cols_ref.at[slots(slot, put)], a, mask=put)
    return total + jnp.sum(k_i), below_own

  def run(own_terms):
    """The loop over the list, then the row's own tokens, count and trailing zeros."""
    below0 = jnp.int32(0) if own_terms is None else jnp.zeros((n_own,), jnp.int32)
    step = functools.partial(body, own_terms=own_terms)
    # (only the chunks from the first to the last entry offered to the row: `_ranges`)
    carry = (jnp.int32(0), below0)
    total, below_own = jax.lax.fori_loop(first_ref[i], end_ref[i], step, carry)
    if own_terms is not None:
      own, kept_own, n_kept_own = own_terms

      @pl.when(n_kept_own > 0)
      def _():
        # [U, U]: kept own tokens below each one (the kept ones are distinct)
        below = jnp.where(kept_own[None, :] & (own[None, :] < own[:, None]), 1, 0)
        slot = jnp.sum(below, axis=1).astype(jnp.int32) + below_own
        put = kept_own & (slot < max_cols)
        plgpu.store(cols_ref.at[slots(slot, put)], own, mask=put)

      total += n_kept_own.astype(jnp.int32)
    count = jnp.minimum(total, max_cols)
    # the slots past the count (the stores above filled exactly the ones before it)
    for z in range(-(-max_cols // zero_chunk)):
      j = z * zero_chunk + jnp.arange(zero_chunk, dtype=jnp.int32)
      zeros = jnp.zeros((zero_chunk,), jnp.int32)
      put = (j < max_cols) & (j >= count)
      plgpu.store(cols_ref.at[slots(j, put)], zeros, mask=put)
    count_ref[pl.ds(i, 1)] = jnp.full((1,), count, jnp.int32)

  if phase == "all":
    run(None)
  elif phase == "light":
    _, _, n_kept_own = own_tokens()
    flag_out[pl.ds(i, 1)] = jnp.full((1,), n_kept_own, jnp.int32)
    pl.when(n_kept_own == 0)(lambda: run(None))
  else:  # heavy

    @pl.when(flag_in[i] > 0)
    def _():
      run(own_tokens())


def _run_bits(cand, bits):
  """(prev_bits, run_bits) [V]: the OR of the bits of the equal keys before each entry, and
  of all equal keys (cand ascending)."""
  start = jnp.concatenate([jnp.ones((1,), bool), cand[1:] != cand[:-1]])

  def op(x, y):  # segmented OR: y's segment restarts at its flag
    fx, bx = x
    fy, by = y
    return fx | fy, jnp.where(fy, by, bx | by)

  _, incl = jax.lax.associative_scan(op, (start, bits))
  prev = jnp.where(start, 0, jnp.concatenate([jnp.zeros((1,), bits.dtype), incl[:-1]]))
  end = jnp.concatenate([cand[1:] != cand[:-1], jnp.ones((1,), bool)])
  _, incl_rev = jax.lax.associative_scan(op, (end[::-1], bits[::-1]))
  return prev, incl | incl_rev[::-1]


def _ranges(cand_bits, row_bits, chunk):
  """Per row, the chunks [first, end) of the list holding the entries offered to it (its
  bits): the first and last entry of each of the 31 bits, combined over the row's bits.
  Rows of a set whose entries are few and together (a 2D boundary's vision rows: a grid's
  sink columns, past the text pair's vertical lines) skip the rest of the list."""
  n = cand_bits.shape[0]
  bit = jnp.arange(32, dtype=jnp.int32)
  lo, hi = true_span(((cand_bits[None, :] >> bit[:, None]) & 1) != 0)  # [32] each
  takes = ((row_bits[:, None] >> bit[None, :]) & 1) != 0  # [R, 32]
  first = jnp.min(jnp.where(takes & (lo < hi)[None, :], lo[None, :], n), axis=1)
  end = jnp.max(jnp.where(takes, hi[None, :], 0), axis=1)
  first_c = jnp.minimum(first // chunk, -(-end // chunk))  # (none offered: an empty range)
  return first_c.astype(jnp.int32), (-(-end // chunk)).astype(jnp.int32)


def select_columns(
  cand,
  cand_bits,
  cand_lim,
  row_bits,
  row_lim,
  blocks,
  block_count,
  *,
  block_k: int,
  max_cols: int,
  own=None,
  own_ok=None,
  own_lim=None,
  chunk: int = 128,
  num_warps: int = 1,
  interpret: bool = False,
):
  """Per row, the distinct keys it takes from a shared candidate list and its own tokens,
  minus those inside its key blocks, ascending.

  Args:
    cand: [V] int32 ascending, the shared candidate keys (a key may repeat, V may be 0).
    cand_bits: [V] int32, the sets each entry belongs to (a bit mask; 0: none).
    cand_lim: [V] int32, equal for equal keys.
    row_bits: [R] int32, the sets each row takes; row_lim: [R] int32. Entry v is offered
      to row r iff cand_bits[v] & row_bits[r] != 0, and allowed iff also
      cand_lim[v] <= row_lim[r].
    blocks: [R, MB] int32, row r's key blocks ascending in its first block_count[r] ([R]
      int32) entries; key j is covered for row r iff j // block_k is one of them.
    block_k: keys per block; max_cols: the output's width.
    own, own_ok, own_lim: [R, U] (U a power of two) int32, bool, int32, or None: each
      row's own keys (distinct where own_ok), taken when own_ok and own_lim <= row_lim.
    chunk: candidates per loop step (a power of two); num_warps: per program (128 and 1
      were the fastest measured on an H200: tools/cols_bench.py); interpret: Pallas
      interpret mode.

  Returns:
    (cols [R, max_cols] int32: the row's allowed, uncovered keys (offered candidates and
    own tokens), distinct, ascending, the first max_cols, then 0; count [R] int32).
  """
  if cand.ndim != 1:
    raise ValueError(f"cand must be [V]; got shape {cand.shape}")
  (n_cand,) = cand.shape
  if blocks.ndim != 2:
    raise ValueError(f"blocks must be [R, MB]; got shape {blocks.shape}")
  n_rows, n_blocks = blocks.shape
  for name, arr, shape in (
    ("cand", cand, (n_cand,)),
    ("cand_bits", cand_bits, (n_cand,)),
    ("cand_lim", cand_lim, (n_cand,)),
    ("row_bits", row_bits, (n_rows,)),
    ("row_lim", row_lim, (n_rows,)),
    ("blocks", blocks, (n_rows, n_blocks)),
    ("block_count", block_count, (n_rows,)),
  ):
    if arr.shape != shape or arr.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32 of shape {shape}; got {arr.dtype} {arr.shape}")
  if (own is None) != (own_ok is None) or (own is None) != (own_lim is None):
    raise ValueError("own, own_ok and own_lim go together (all or none)")
  n_own = 0
  if own is not None:
    n_own = own.shape[-1]
    if own.shape != (n_rows, n_own) or own.dtype != jnp.int32 or n_own & (n_own - 1):
      raise ValueError(
        f"own must be int32 [R={n_rows}, U] with U a power of two; got {own.dtype} {own.shape}"
      )
    if own_ok.shape != own.shape or own_ok.dtype != jnp.bool_:
      raise ValueError(
        f"own_ok must be bool of shape {own.shape}; got {own_ok.dtype} {own_ok.shape}"
      )
    if own_lim.shape != own.shape or own_lim.dtype != jnp.int32:
      raise ValueError(f"own_lim must be int32 of shape {own.shape}; got {own_lim.dtype}")
  if block_k < 1 or max_cols < 1:
    raise ValueError(f"block_k={block_k} and max_cols={max_cols} must be >= 1")
  if chunk < 1 or chunk & (chunk - 1):
    raise ValueError(f"chunk={chunk} must be a power of two")
  return _call(
    (cand, cand_bits, cand_lim, row_bits, row_lim, blocks, block_count, own, own_ok, own_lim),
    block_k=int(block_k),
    max_cols=int(max_cols),
    chunk=int(chunk),
    num_warps=num_warps,
    interpret=interpret,
  )


@functools.partial(
  jax.jit, static_argnames=("block_k", "max_cols", "chunk", "num_warps", "interpret")
)
def _call(arrays, *, block_k, max_cols, chunk, num_warps, interpret):
  cand, cand_bits, cand_lim, row_bits, row_lim, blocks, block_count, own, own_ok, own_lim = arrays
  n_rows, n_blocks = blocks.shape
  # the list padded to whole chunks (at least one) by keys no row is offered
  n_cand = max(chunk, -(-cand.shape[0] // chunk) * chunk)
  pad = n_cand - cand.shape[0]
  prev_bits, run_bits = _run_bits(cand, cand_bits) if cand.shape[0] else (cand_bits, cand_bits)
  cols = [
    jnp.pad(cand, (0, pad), constant_values=_PAD),
    jnp.pad(cand_bits, (0, pad)),
    jnp.pad(prev_bits, (0, pad)),
    jnp.pad(run_bits, (0, pad)),
    jnp.pad(cand_lim, (0, pad), constant_values=_PAD),
  ]
  first, end = _ranges(cols[1], row_bits, chunk)
  args = cols + [row_bits, row_lim, first, end, blocks.reshape(-1), block_count]
  n_own = 0
  if own is not None:
    n_own = own.shape[1]
    args += [own.reshape(-1), own_ok.reshape(-1).astype(jnp.int32), own_lim.reshape(-1)]
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  # (a spare slot per row only where masked lanes store: its slice was a copy of the
  # output, 0.03 ms at the end of a 2D boundary's 128k plan on an H200)
  spare = int(interpret if SPARE_SLOT is None else SPARE_SLOT)
  out_shape = [
    jax.ShapeDtypeStruct((n_rows * (max_cols + spare),), jnp.int32),
    jax.ShapeDtypeStruct((n_rows,), jnp.int32),
  ]

  def call(phase, inputs, outs, aliases=None):
    kernel = functools.partial(
      _kernel,
      n_cand=n_cand,
      chunk=chunk,
      n_blocks=n_blocks,
      max_cols=max_cols,
      n_own=n_own,
      block_k=block_k,
      zero_chunk=min(128, 1 << (max_cols - 1).bit_length()),
      phase=phase,
      spare=spare,
    )
    return pl.pallas_call(
      kernel,
      grid=(n_rows,),
      in_specs=[whole(a.shape) for a in inputs],
      out_specs=[whole(o.shape) for o in outs],
      out_shape=outs,
      input_output_aliases=aliases or {},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=f"mmjax_col_select_{phase}",
    )(*inputs)

  if not n_own:
    cols_flat, count = call("all", args, out_shape)
  else:  # the rows keeping no own token, then (into the same buffers) the others
    flag = jax.ShapeDtypeStruct((n_rows,), jnp.int32)
    cols_flat, count, kept = call("light", args, [*out_shape, flag])
    heavy_args = [*args, kept, cols_flat, count]
    aliases = {len(args) + 1: 0, len(args) + 2: 1}
    cols_flat, count = call("heavy", heavy_args, out_shape, aliases)
  return cols_flat.reshape(n_rows, max_cols + spare)[:, :max_cols], count
