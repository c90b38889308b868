"""The planner's pooled means (pallas_kernels.block_pool) on its 1M-token shapes: 28 query
heads (4 kv heads) of [1, L, N, 128] bf16 read in place, blocks of 128 query / 64 key rows,
with vmap's usual batching (each head's programs in turn) against `heads_inner=True` (the
heads innermost in one call's grid), timed in the same run.

  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 tools/pool_bench.py --out $OUT/p.json

Cases: "q identity" (block_sparse's queries), "k shared" (a kv head's keys pooled once,
`planning.shared_k_pools`), "q grid" / "k grid" (each query head's rows in its own grid
order, as grid's and the 2D boundary's views: here strides 571 + 13 h). GB/s counts the
bytes of x each call reads (the row and bit lists aside); `max_diff` is inner against
plain (the same sums: 0).
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


def pool_fn(block, gather, heads_inner, num_warps):
  interpret = jax.default_backend() != "gpu"

  def one(x, index, rows, bits):
    return block_mean(
      x,
      bits,
      block=block,
      n_sel=1,
      rows=rows if gather else None,
      index=index,
      heads_inner=heads_inner,
      num_warps=num_warps,
      interpret=interpret,
    )

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0 if gather else None, None)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--length", type=int, default=1048576)
  ap.add_argument("--warps", default="4,8")
  args = ap.parse_args()
  length = args.length
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, length, HEADS, H)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((1, length, KV_HEADS, H)), jnp.bfloat16)
  bits = jnp.ones((length,), jnp.int32)
  q_heads = jnp.arange(HEADS, dtype=jnp.int32)
  q_index = jnp.stack([jnp.zeros_like(q_heads), q_heads], -1)
  k_index = jnp.stack([jnp.zeros_like(q_heads), q_heads // (HEADS // KV_HEADS)], -1)
  kv = jnp.arange(KV_HEADS, dtype=jnp.int32)
  kv_index = jnp.stack([jnp.zeros_like(kv), kv], -1)
  rows = jnp.stack([grid_rows(length, 571 + 13 * h) for h in range(HEADS)])
  cases = [
    ("q identity", q, 128, False, q_index),
    ("k shared", k, 64, False, kv_index),
    ("q grid", q, 128, True, q_index),
    ("k grid", k, 64, True, k_index),
  ]
  out = []
  for name, x, block, gather, index in cases:
    n_h = index.shape[0]
    gb = n_h * length * H * x.dtype.itemsize / 1e9
    r = rows[:n_h] if gather else None
    base = None
    for warps in map(int, args.warps.split(",")):
      for inner in (False, True):
        fn = pool_fn(block, gather, inner, warps)
        got = fn(x, index, r, bits)
        base = got if base is None else base
        diff = float(jnp.max(jnp.abs(got - base)))
        ms = bench.timeit(fn, x, index, r, bits, warmup=2, iters=10)
        ops = {op: us / 1e3 for op, us in top_kernels(fn, x, index, r, bits, n=3)}
        row = dict(case=name, warps=warps, heads_inner=inner, ms=ms, gb_per_s=gb / ms * 1e3)
        row |= dict(max_diff=diff, ops_ms=ops)
        out.append(row)
        print(
          f"{name:11s} warps {warps} {'inner' if inner else 'plain'}: {ms:.3f} ms, "
          f"{gb / ms * 1e3:.0f} GB/s, max diff {diff:.1e}; "
          + ", ".join(f"{op} {t:.3f} ms" for op, t in ops.items()),
          flush=True,
        )
  bench.write_report(args.out, out)


if __name__ == "__main__":
  main()
