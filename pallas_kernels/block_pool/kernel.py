"""Masked means of row blocks, for several row selections at once, through an optional row
gather; Pallas on the Triton lowering.

The planner's pooled q / k: for a view of L tokens (a permutation of the rows of x [L, H])
cut into blocks of `block` consecutive view rows, the mean of each block's rows that a
selection (a modality) admits, for every selection in one read of x. XLA fused the same
sums (a gather by the permutation, a masked window sum) into the row reductions of the
block statistics beside them, and ran them 6x slower than the identity view's sums
(2d_boundary at 1M on an H200: 61 of its 183 ms plan).

Algorithm, one program per block i (`group` > 1: per `group` blocks, the sums below as
one dot of 0/1 weights per selection):
  rows = perm[i * block : (i + 1) * block]     (the view's rows of x; identity: the slice)
  xb   = x[rows, :] in f32                     [block, H], one gathered load
  for each selection m (bit m of `bits`):
    w = bit m of bits[block i]                 [block] 0/1
    out[m, i, :] = sum(w * xb, rows) / sum(w)  if sum(w) > 0, else 0 (no sum: skipped)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.heads_inner import HeadRefs, heads_innermost

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_SELECTIONS = 31  # bits of an int32 (the sign bit unused)


def _kernel(*refs, block, n_sel, group, gather, in_place, per_head, stacked):
  refs = list(refs)
  index_ref = refs.pop(0) if in_place else None
  rows_ref = refs.pop(0) if gather else None
  bits_ref, x_ref, *out_refs = refs

  def out(m, *at):  # (the output ref of selection m, the index of `at` in it)
    return (out_refs[0], (m, *at)) if stacked else (out_refs[m], at)

  # a call batched over heads (`per_head`: the refs with a leading head axis; the output
  # has one too) has the head as its first grid axis, the innermost of the launch
  heads = HeadRefs(per_head | {"out"}, pl.program_id(0)) if per_head else HeadRefs()
  get = heads.get
  i = heads.program_id(0)
  sl = pl.ds(i * group * block, group * block)
  rows = get("rows", rows_ref, sl) if gather else sl
  if in_place:  # x [B, L, N, H]: the (batch, head) slice, read where it lies
    xb = x_ref[get("index", index_ref, 0), rows, get("index", index_ref, 1), :]
  else:
    xb = x_ref[rows, :]
  bits = get("bits", bits_ref, sl)  # [group * block]
  if group > 1:  # the group's sums as one dot per selection: w [group, rows] @ xb
    r = jnp.arange(group * block, dtype=jnp.int32)
    mine = (r // block)[None, :] == jnp.arange(group, dtype=jnp.int32)[:, None]
    f32 = xb.dtype == jnp.float32  # (0/1 weights: exact products; f32 without TF32)
    for m in range(n_sel):
      w = jnp.where(mine & (((bits >> m) & 1) > 0)[None, :], 1.0, 0.0)  # [group, rows]
      count = jnp.sum(w, axis=1)  # [group]
      ref, at = out(m, pl.ds(i * group, group), slice(None))

      @pl.when(jnp.sum(count) > 0)
      def _(w=w, count=count, ref=ref, at=at):
        total = plgpu.dot(w.astype(xb.dtype), xb, allow_tf32=not f32)  # [group, H] f32
        mean = (total / jnp.maximum(count, 1.0)[:, None]).astype(ref.dtype)
        heads.set("out", ref, at, mean)

      _zeros_if(jnp.sum(count) == 0, heads, ref, at, (group, xb.shape[-1]))
    return
  xb = xb.astype(jnp.float32)  # [block, H]
  for m in range(n_sel):
    w = (bits >> m) & 1
    count = jnp.sum(w)
    ref, at = out(m, i, slice(None))

    @pl.when(count > 0)
    def _(w=w, count=count, ref=ref, at=at):
      total = jnp.sum(jnp.where(w[:, None] > 0, xb, 0.0), axis=0)  # [H]
      mean = (total / count.astype(jnp.float32)).astype(ref.dtype)
      heads.set("out", ref, at, mean)

    _zeros_if(count == 0, heads, ref, at, (xb.shape[-1],))


def _zeros_if(empty, heads, out_ref, at, shape):
  """Zeros at out[at] (shape `shape`) where `empty`: a selection with no row in the
  program's blocks skips its sum (the planner pools the selections of modality ids an
  input rarely has with the others, and most blocks have none of their rows)."""

  @pl.when(empty)
  def _():
    heads.set("out", out_ref, at, jnp.zeros(shape, out_ref.dtype))


def is_group(group) -> bool:
  """Whether `group` is a valid `block_mean(group=...)`: 1, or a power of two >= 16 (a
  dot's rows)."""
  if isinstance(group, bool) or not isinstance(group, int):
    return False
  return group == 1 or (group >= 16 and not group & (group - 1))


def block_mean(
  x,
  bits,
  *,
  block: int,
  n_sel: int,
  rows=None,
  index=None,
  interpret: bool = False,
  num_warps: int = 4,
  heads_inner: bool = False,
  group: int = 1,
  out_dtype=jnp.float32,
  poison: float | None = None,
  stacked: bool = True,
):
  """Per block of `block` view rows, the mean of the rows each selection admits.

  Args:
    x: [L, H] float (f32, bf16 or f16), or [B, L, N, H] with `index`.
    bits: [V] int32 in view order: bit m set where the view row counts for selection m.
    block: view rows per block (a power of two >= 16 dividing V).
    n_sel: the number of selections, 1..31.
    rows: [V] int32, the row of x at each view index (in range; not checked under jit):
      a permutation (V = L), or some of x's rows (V < L: the planner's sampled means,
      `Grid.pool_tokens`), or None for the identity view (V = L).
    index: int32 [2], (batch, head): with a 4-D x, the [L, H] slice x[batch, :, head] to
      pool, read in place (a sliced-out copy of every head would cost a pass over x).
    interpret: run in Pallas interpret mode (CPU).
    num_warps: tuning.
    heads_inner: under vmap over heads (a batched `index`, and `rows` / `bits` batched or
      shared), one call whose grid has the head innermost: the programs of one block
      for every head run together, so with the identity view (or any view the heads
      share) they read neighbouring bytes of x [B, L, N, H] at once, rather than each
      head sweeping its [L, H] slice in turn (vmap's usual batching puts the head axis
      outermost). The same means.
    group: blocks per program: 1, each program sums its block's rows per selection (a
      reduction each); or a power of two >= 16 dividing V / block, each program sums its
      `group` blocks per selection as one dot of 0/1 weights [group, group * block] with
      their rows (exact products, f32 sums in another order): fewer, larger programs
      for small blocks (the planner's sampled means have 16 rows).
    out_dtype: the means' dtype (f32 sums and division, then rounded once): the planner's
      pooled scores take bf16 means on a GPU, and rounding here spares a conversion pass.
    poison: tests only: the output starts filled with this value, aliased into the
      kernel, so an entry the kernel fails to write keeps it.
    stacked: True, the selections' means in one array; False, a tuple of n_sel arrays
      [V // block, H], one output buffer each (the planner reads each selection's
      means on its own: slices of one array were copies, about 30 us of 2d_boundary's
      128k plan on an H200 for its four key selections, h200_2026-12-04).

  Returns:
    mean [n_sel, V // block, H] in out_dtype, 0 where a block has no row of the selection
    (`stacked` False: the tuple of mean[0], ..., mean[n_sel - 1]).
  """
  if x.ndim == 4:
    if index is None or index.shape != (2,) or index.dtype != jnp.int32:
      got = None if index is None else f"{index.dtype} {index.shape}"
      raise ValueError(f"a 4-D x [B, L, N, H] needs index: int32 (batch, head) [2]; got {got}")
  elif x.ndim != 2 or index is not None:
    raise ValueError(
      f"x must be [L, H] (index None) or [B, L, N, H] with index; got shape {x.shape}"
    )
  if x.dtype not in SUPPORTED_DTYPES:
    raise ValueError(
      f"x dtype {x.dtype} is not supported; use one of "
      f"{[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}"
    )
  length, h = x.shape[-3 if x.ndim == 4 else 0], x.shape[-1]
  if h < 16 or h & (h - 1):
    raise ValueError(f"head dim H={h} must be a power of two >= 16")
  if not isinstance(block, int) or block < 16 or block & (block - 1):
    raise ValueError(f"block={block!r} must be a power of two >= 16")
  if rows is not None and (rows.ndim != 1 or rows.dtype != jnp.int32):
    raise ValueError(f"rows must be int32 of shape (V,); got {rows.dtype} {rows.shape}")
  n_view = length if rows is None else rows.shape[0]
  if n_view % block:
    what = "L" if rows is None else "V (the rows given)"
    raise ValueError(f"{what}={n_view} must be a multiple of block={block} (pad the inputs)")
  if not isinstance(n_sel, int) or not 1 <= n_sel <= MAX_SELECTIONS:
    raise ValueError(f"n_sel must be an int in [1, {MAX_SELECTIONS}]; got {n_sel!r}")
  if bits.shape != (n_view,) or bits.dtype != jnp.int32:
    raise ValueError(f"bits must be int32 of shape ({n_view},); got {bits.dtype} {bits.shape}")
  if not is_group(group):
    raise ValueError(f"group={group!r} must be 1 or a power of two >= 16")
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(
      f"out_dtype {jnp.dtype(out_dtype)} is not supported; use one of "
      f"{[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}"
    )
  if (n_view // block) % group:
    raise ValueError(
      f"group={group} must divide the {n_view // block} blocks (V={n_view} / block={block})"
    )
  static = dict(
    block=block,
    n_sel=n_sel,
    group=group,
    out_dtype=jnp.dtype(out_dtype).name,
    num_warps=num_warps,
    interpret=interpret,
    poison=poison,
    stacked=stacked,
  )
  if not heads_inner:
    return _call(x, bits, rows, index, **static)
  fn = _heads_inner(rows is not None, index is not None, tuple(sorted(static.items())))
  return fn(x, bits, *([rows] if rows is not None else []), *([index] if index is not None else []))


_ARGS = ("x", "bits", "rows", "index")


def _pool(
  x,
  bits,
  rows,
  index,
  *,
  per_head,
  n_heads,
  block,
  n_sel,
  group,
  out_dtype,
  num_warps,
  interpret,
  poison,
  stacked,
):
  """The pallas_call. per_head: the names of the arguments with a leading head axis of
  n_heads (a call batched over heads, the head the first grid axis); empty: one head."""
  length, h = bits.shape[-1], x.shape[-1]
  nb = length // block
  gather, in_place = rows is not None, index is not None
  lead = (n_heads,) if per_head else ()
  kernel = functools.partial(
    _kernel,
    block=block,
    n_sel=n_sel,
    group=group,
    gather=gather,
    in_place=in_place,
    per_head=per_head,
    stacked=stacked,
  )
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
  args = ([index] if in_place else []) + ([rows] if gather else []) + [bits, x]
  in_specs = [whole(a.shape) for a in args]
  shapes = [lead + (n_sel, nb, h)] if stacked else [lead + (nb, h)] * n_sel
  aliases = {}
  if poison is not None:  # the poisoned buffers become the outputs (the kernel ignores them)
    for j, shape in enumerate(shapes):
      in_specs.append(whole(shape))
      args.append(jnp.full(shape, poison, out_dtype))
      aliases[len(args) - 1] = j
    kernel = functools.partial(_drop_inputs, kernel, len(shapes))
  out = pl.pallas_call(
    kernel,
    grid=lead + (nb // group,),
    in_specs=in_specs,
    out_specs=[whole(shape) for shape in shapes],
    out_shape=[jax.ShapeDtypeStruct(shape, out_dtype) for shape in shapes],
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="mmjax_block_mean",
  )(*args)
  return out[0] if stacked else tuple(out)


_STATIC = ("block", "n_sel", "group", "out_dtype", "num_warps", "interpret", "poison", "stacked")
_call = jax.jit(
  functools.partial(_pool, per_head=frozenset(), n_heads=None), static_argnames=_STATIC
)


@functools.cache
def _heads_inner(gather, in_place, static):
  """The call for one head, batched by vmap into one call with the heads first in its
  grid (innermost in the launch); x batched (each head its own array) takes vmap's usual
  batching."""
  static = dict(static)

  def split(args):  # (x, bits, [rows], [index]) -> _ARGS order
    args = list(args)
    index = args.pop() if in_place else None
    rows = args.pop() if gather else None
    return (*args, rows, index)

  return heads_innermost(
    functools.partial(_call, **static), functools.partial(_pool, **static), split, _ARGS, "x"
  )


def _drop_inputs(kernel, n, *refs):  # (the n poisoned inputs, before the n outputs)
  kernel(*refs[: -2 * n], *refs[-n:])
