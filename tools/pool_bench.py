"""The planner's pooled means (pallas_kernels.block_pool) on its 1M-token shapes: 28 query
heads (4 kv heads) of [1, L, N, 128] bf16 read in place, blocks of 128 query / 64 key rows,
with vmap's usual batching (each head's programs in turn) against `heads_inner=True` (the
heads innermost in one call's grid), timed in the same run.

  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 tools/pool_bench.py --out $OUT/p.json

Cases: "q identity" (block_sparse's queries), "k shared" (a kv head's keys pooled once,
`planning.shared_k_pools`), "q grid" / "k grid" (each query head's rows in its own grid
order, as grid's and the 2D boundary's views: here strides 571 + 13 h), "q grid /8" / "k
grid /4" (the same, sampled as `Grid.pool_tokens` 16 samples them: every 8th / 4th view
row, blocks of 16 rows). GB/s counts the bytes of x each call reads (the row and bit
lists aside; the sampled cases count every row too); `max_diff` is against the case's
first variant (the same sums up to their order).

  python3 tools/pool_bench.py --cases "q grid /8,k grid /4" --n_sel 3 --groups 1,16,32 \
    --warps 4 --out $OUT/pool_groups.json   # block_mean(group=...): planning.POOL_GROUP
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench
from pallas_kernels.block_pool import block_mean
from tools.plan_trace import top_kernels

HEADS, KV_HEADS, H = 28, 4, 128


def grid_rows(length, stride):
  """A grid order: positions sorted by (position % stride, position)."""
  pos = jnp.arange(length, dtype=jnp.int32)
  return jnp.argsort((pos % stride) * length + pos).astype(jnp.int32)


def pool_fn(block, gather, heads_inner, num_warps, n_sel=1, group=1):
  interpret = jax.default_backend() != "gpu"

  def one(x, index, rows, bits):
    return block_mean(
      x,
      bits,
      block=block,
      n_sel=n_sel,
      rows=rows if gather else None,
      index=index,
      heads_inner=heads_inner,
      num_warps=num_warps,
      group=group,
      interpret=interpret,
    )

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0 if gather else None, None)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--length", type=int, default=1048576)
  ap.add_argument("--warps", default="4,8")
  ap.add_argument("--cases", default="q identity,k shared,q grid,k grid")
  ap.add_argument("--n_sel", type=int, default=1, help="selections (random bits past the first)")
  ap.add_argument("--groups", default="1", help="blocks per program (block_mean group)")
  ap.add_argument("--inner", default="0,1", help="heads_inner values")
  args = ap.parse_args()
  length = args.length
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, length, HEADS, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((1, length, KV_HEADS, H)), jnp.bfloat16)
  bits = jnp.ones((length,), jnp.int32)
  for m in range(1, args.n_sel):  # (selection 0: every row; the others random)
    bits |= jnp.asarray(rng.random(length) < 0.5, jnp.int32) << m
  q_heads = jnp.arange(HEADS, dtype=jnp.int32)
  q_index = jnp.stack([jnp.zeros_like(q_heads), q_heads], -1)
  k_index = jnp.stack([jnp.zeros_like(q_heads), q_heads // (HEADS // KV_HEADS)], -1)
  kv = jnp.arange(KV_HEADS, dtype=jnp.int32)
  kv_index = jnp.stack([jnp.zeros_like(kv), kv], -1)
  rows = jnp.stack([grid_rows(length, 571 + 13 * h) for h in range(HEADS)])
  all_cases = {  # name: (x, block, gather, index, every e-th view row)
    "q identity": (q, 128, False, q_index, 1),
    "k shared": (k, 64, False, kv_index, 1),
    "q grid": (q, 128, True, q_index, 1),
    "k grid": (k, 64, True, k_index, 1),
    "q grid /8": (q, 16, True, q_index, 8),
    "k grid /4": (k, 16, True, k_index, 4),
  }
  cases = [(name, *all_cases[name]) for name in args.cases.split(",")]
  out = []
  for name, x, block, gather, index, every in cases:
    n_h = index.shape[0]
    gb = n_h * length * H * x.dtype.itemsize / 1e9
    r = rows[:n_h, ::every] if gather else None
    b = bits[::every]
    base = None
    for warps in map(int, args.warps.split(",")):
      for inner in (bool(int(i)) for i in args.inner.split(",")):
        for group in map(int, args.groups.split(",")):
          fn = pool_fn(block, gather, inner, warps, args.n_sel, group)
          got = fn(x, index, r, b)
          base = got if base is None else base
          diff = float(jnp.max(jnp.abs(got - base)))
          ms = bench.timeit(fn, x, index, r, b, warmup=2, iters=10)
          ops = {op: us / 1e3 for op, us in top_kernels(fn, x, index, r, b, n=3)}
          row = dict(case=name, warps=warps, heads_inner=inner, group=group, n_sel=args.n_sel)
          row |= dict(ms=ms, gb_per_s=gb / ms * 1e3, max_diff=diff, ops_ms=ops)
          out.append(row)
          print(
            f"{name:11s} warps {warps} {'inner' if inner else 'plain'} group {group}: "
            f"{ms:.3f} ms, {gb / ms * 1e3:.0f} GB/s, max diff {diff:.1e}; "
            + ", ".join(f"{op} {t:.3f} ms" for op, t in ops.items()),
            flush=True,
          )
  bench.write_report(args.out, out)


if __name__ == "__main__":
  main()
