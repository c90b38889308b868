"""Block-sparse flash attention (prefill forward) on the Mosaic GPU lowering (Hopper).

Shape legend: B batch, L length, N query heads, K kv heads (N % K == 0), H head dim,
nQ = L // block_q, MB the width of the block index lists.

What it runs: for each (batch, head, query block) the key blocks listed in `block_idx`
(the first `block_count` entries, ascending), causal by token index. It is the kernel of
identity-order plans without single key columns (dense, a_shape, block_sparse); the
Triton kernel (`kernel.py`) runs every plan, permuted or with columns.

Algorithm, one CTA per (head, query block, batch), three warpgroups:
  warpgroups 0 and 1 each own block_q / 2 query rows (the wgmma M tile is 64 rows);
  warpgroup 2 streams the listed k/v blocks with TMA into a ring of `max_concurrent_steps`
  shared-memory slots, reading block t's index from the list before it waits for the
  slot to be freed;
  each compute warpgroup, per listed block t:
    s = q k^T (wgmma, f32 accumulator); mask key index > query index with -inf only for
    blocks that reach past the warpgroup's first row (they are a suffix of the ascending
    list, found by a binary search over it);
    online softmax in base 2; acc += p v (wgmma);
  the two compute warpgroups alternate on the tensor cores through a shared barrier (one
  runs its softmax while the other multiplies);
  o = acc / l (0 for a row that admitted no key), stored through shared memory by TMA.

The structure (warp specialisation, the k/v ring with "consumed" barriers, the
ping-pong barrier) follows jax's Mosaic GPU attention example
(jax/experimental/pallas/ops/gpu/attention_mgpu.py), which measured 627 TFLOP/s causal on
an H100 in f16 (../shared notes); this kernel adds the block lists, bf16, the softmax
scale and rows that admit nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_flash.kernel import check_index_list, check_qkv

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCKS = ((128, 64), (128, 128))  # (block_q, block_k) of the plans it runs
LOG2E = math.log2(math.e)
_WG_ROWS = 64  # query rows per compute warpgroup at block_q = 128


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Kernel knobs: block_q (two compute warpgroups of block_q // 2 rows) and block_k must
  equal the plan's; `max_concurrent_steps` k/v blocks are in flight."""

  block_q: int = 128
  block_k: int = 64
  max_concurrent_steps: int = 2


def _check(q, k, v, block_idx, block_count, block_q, block_k, max_concurrent_steps, debug):
  b, length, n, _, h = check_qkv(q, k, v)
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
      f"dtype: the Mosaic GPU kernel takes q, k, v of one of "
      f"{[str(jnp.dtype(d)) for d in SUPPORTED_DTYPES]}; got {q.dtype}, {k.dtype}, {v.dtype} "
      "(the Triton kernel, sparse_flash.sparse_attention, also takes float32)"
    )
  if h not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim={h} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
  if block_q != 2 * _WG_ROWS:
    raise ValueError(f"block_q={block_q}: the Mosaic GPU kernel takes block_q=128")
  if block_k % 64 or block_k > 128:
    raise ValueError(f"block_k={block_k}: the Mosaic GPU kernel takes block_k 64 or 128")
  if max_concurrent_steps < 2:
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be >= 2")
  for name, bs in (("block_q", block_q), ("block_k", block_k)):
    if length % bs:
      raise ValueError(f"L={length} must be a multiple of {name}={bs} (pad the inputs)")
  nq = length // block_q
  used = check_index_list("block_idx", block_idx, block_count, (b, n, nq), length // block_k, debug)
  if used is not None and not (np.diff(np.asarray(block_idx), axis=-1) > 0)[used[..., 1:]].all():
    raise ValueError("block_idx: the listed blocks of a query block must be ascending")


def sparse_attention(
  q,
  k,
  v,
  block_idx,
  block_count,
  *,
  block_q: int = 128,
  block_k: int = 64,
  sm_scale: float | None = None,
  max_concurrent_steps: int = 2,
  interpret: bool = False,
  debug: bool = False,
):
  """Attention over the listed key blocks, causal by token index (identity order).

  Args:
    q: [B, L, N, H] queries (bf16 or f16).
    k, v: [B, L, K, H] keys and values, shared by the N // K query heads of a kv head.
    block_idx: [B, N, nQ, MB] int32 key-block indices, ascending in each row;
      block_count [B, N, nQ] int32 the valid ones.
    block_q, block_k: the plan's block sizes (128; 64 or 128).
    sm_scale: softmax scale, 1/sqrt(H) by default.
    max_concurrent_steps: k/v blocks in flight (shared-memory ring slots).
    interpret: must be False: jax's Mosaic GPU interpret mode (jax 0.10.2) does not run
      this kernel (no `run_state`); the Triton kernel, `sparse_flash.sparse_attention`,
      runs with interpret=True on the CPU.
    debug: with concrete inputs, check counts, index ranges and ascending order first.

  Returns:
    [B, L, N, H] in q's dtype.
  """
  if interpret:
    raise ValueError(
      "interpret=True: the Mosaic GPU kernel does not run in interpret mode; use "
      "pallas_kernels.sparse_flash.sparse_attention(..., interpret=True) on the CPU"
    )
  _check(q, k, v, block_idx, block_count, block_q, block_k, max_concurrent_steps, debug)
  h = q.shape[3]
  return _call(
    q,
    k,
    v,
    block_idx,
    block_count,
    block_k=block_k,
    sm_scale=float(sm_scale if sm_scale is not None else 1.0 / math.sqrt(h)),
    max_concurrent_steps=max_concurrent_steps,
  )


@functools.partial(jax.jit, static_argnames=("block_k", "sm_scale", "max_concurrent_steps"))
def _call(q, k, v, block_idx, block_count, *, block_k, sm_scale, max_concurrent_steps):
  b, length, n, h = q.shape
  g = n // k.shape[2]
  nq = length // (2 * _WG_ROWS)
  mb = block_idx.shape[3]
  steps_in_flight = max_concurrent_steps
  dtype = q.dtype
  rows = _WG_ROWS
  qk_scale = sm_scale * LOG2E
  search_iters = max(1, math.ceil(math.log2(mb + 1)))

  def kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref, scoped):
    bi = lax.axis_index("batch")
    ni = lax.axis_index("heads")
    qi = lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    (qo_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_used, v_used), sched = scoped
    count = cnt_ref[bi, ni, qi]

    def schedule():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      q_base = qi * (2 * rows) + wg * rows  # this warpgroup's first query row
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_base, rows), ni], qo_smem, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])

      # blocks j with (j + 1) * block_k <= q_base + 1 need no mask; the list is ascending,
      # so they are its first n_full entries (binary search for the first j >= limit).
      limit = lax.div(q_base + 1, jnp.int32(block_k))
      lo, hi = jnp.int32(0), count
      for _ in range(search_iters):
        mid = lax.div(lo + hi, jnp.int32(2))
        j_mid = idx_ref[bi, ni, qi, jnp.minimum(mid, mb - 1)]
        right = (mid < hi) & (j_mid < limit)
        lo = jnp.where(right, mid + 1, lo)
        hi = jnp.where(right, hi, mid)
      n_full = lo

      m_i = plgpu.layout_cast(
        jnp.full((rows,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
      )
      l_i = plgpu.layout_cast(jnp.full((rows,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((rows, h), 0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(count > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(schedule)

      def step(t, carry, masked):
        acc, m_i, l_i = carry
        slot = lax.rem(t, jnp.int32(steps_in_flight))

        # [rows, H] x [H, block_k] -> [rows, block_k]
        def qk_fn(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, _transposed(k_smem.at[slot]))
          schedule()
          return acc_ref[...]

        s = pl.run_scoped(qk_fn, plgpu.ACC((rows, block_k), jnp.float32))
        plgpu.barrier_arrive(k_used.at[slot])
        if masked:
          j = idx_ref[bi, ni, qi, t]
          q_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_k), 0, layout=plgpu.Layout.WGMMA)
          k_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_k), 1, layout=plgpu.Layout.WGMMA)
          s = jnp.where(q_ids + q_base >= k_ids + j * block_k, s, -jnp.inf)
        # online softmax in base 2; m is kept in scaled units (an FMA per score).
        m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
        if masked:  # a row that has admitted nothing yet keeps m = -inf
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
          m_use = m_new
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        plgpu.barrier_arrive(sched)  # softmax done
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)  # the tensor cores are ours

        # [rows, block_k] x [block_k, H] -> [rows, H]
        def pv_fn(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = t + 1

          @pl.when(nxt < count)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(steps_in_flight))])

        acc = pl.run_state(pv_fn)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_used.at[slot])
        return acc, m_new, l_i

      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m_i, l_i))
      acc, m_i, l_i = lax.fori_loop(n_full, count, functools.partial(step, masked=True), carry)
      pl.when(wg == 0)(schedule)

      l_safe = jnp.where(l_i > 0, l_i, 1.0)
      acc = acc / lax.broadcast_in_dim(l_safe, (rows, h), [0])
      qo_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(q_base, rows), ni])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _stream():
      plgpu.set_max_registers(40, action="decrease")
      kvh = lax.div(ni, jnp.int32(g))

      def issue(j, slot):
        sl = (bi, pl.ds(pl.multiple_of(j * block_k, block_k), block_k), kvh)
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

      for t in range(steps_in_flight):

        @pl.when(t < count)
        def _(t=t):
          issue(idx_ref[bi, ni, qi, t], t)

      @pl.loop(0, jnp.maximum(count - steps_in_flight, 0))
      def _(t):
        slot = lax.rem(t, jnp.int32(steps_in_flight))
        j = idx_ref[bi, ni, qi, t + steps_in_flight]  # read before the wait
        sl = (bi, pl.ds(pl.multiple_of(j * block_k, block_k), block_k), kvh)
        plgpu.barrier_wait(k_used.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_used.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

  def entry(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
      plgpu.SMEM((2, rows, h), dtype, transforms=transforms),
      plgpu.SMEM((steps_in_flight, block_k, h), dtype, transforms=transforms),
      plgpu.SMEM((steps_in_flight, block_k, h), dtype, transforms=transforms),
    )
    pl.run_scoped(
      lambda *scoped: kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, out_ref, scoped),
      smem,
      (
        plgpu.Barrier(num_barriers=steps_in_flight),
        plgpu.Barrier(num_barriers=steps_in_flight),
        plgpu.Barrier(num_barriers=2),
      ),
      (plgpu.Barrier(num_arrivals=2, num_barriers=steps_in_flight),) * 2,
      plgpu.Barrier(num_arrivals=2),
      collective_axes="wg",
    )

  return plgpu.kernel(
    entry,
    out_type=jax.ShapeDtypeStruct(q.shape, dtype),
    grid=(n, nq, b),
    grid_names=("heads", "q_blocks", "batch"),
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, block_idx, block_count)


def _transposed(ref):
  """ref [R, C] viewed as [C, R] (jax 0.11 has Ref.transpose; older jax transpose_ref)."""
  if hasattr(plgpu, "transpose_ref"):
    return plgpu.transpose_ref(ref, (1, 0))
  return ref.transpose((1, 0))
