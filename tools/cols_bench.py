"""The col_select kernel on the planner's shapes at 1M tokens (28 heads of 8192 query
blocks of 128, key blocks of 64), chunk and warp variants timed in one run; the ratios are
against the planner's setting (`planning.COLS_TILES`) of the same run.

  python3 tools/cols_bench.py --out $OUT/cols_bench.json

Shapes: "vertical_slash" (512 shared columns, lists of up to 387 key blocks) and
"q_boundary" (two patterns' 1024 columns, 809 blocks, each query block's 128 own tokens,
covered by its blocks as in the planner's plans); "q_boundary_no_own" and
"vertical_slash_own" swap the own tokens, to tell which of the two costs. `--shapes`
picks some.
"""

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench, planning
from pallas_kernels.col_select import select_columns

HEADS, BQ, BK = 28, 128, 64
SHAPES = {
  "vertical_slash": (512, 387, 0),
  "q_boundary": (1024, 809, BQ),
  # which of q_boundary's differences costs: its own tokens, or twice the candidates
  "q_boundary_no_own": (1024, 809, 0),
  "vertical_slash_own": (512, 387, BQ),
}


def inputs(length, n_cand, n_blocks, n_own, seed=0):
  """One head's inputs: sorted candidates of two sets, rows with causal limits, block
  lists ascending with each row's own blocks, own tokens (all covered)."""
  rng = np.random.default_rng(seed)
  n_rows, n_k = length // BQ, length // BK
  sets = max(1, n_cand // 512)
  keys = np.concatenate([rng.choice(length, n_cand // sets, replace=False) for _ in range(sets)])
  bits = np.repeat(1 << np.arange(sets), n_cand // sets)
  order = np.argsort(keys, kind="stable")
  cand, cand_bits = keys[order].astype(np.int32), bits[order].astype(np.int32)
  rows = np.arange(n_rows)
  row_bits = np.full(n_rows, (1 << sets) - 1, np.int32)
  row_lim = (rows * BQ + BQ - 1).astype(np.int32)
  # per row: the own blocks, then random earlier ones up to half the list
  own_blk = rows[:, None] * (BQ // BK) + np.arange(BQ // BK)[None, :]
  extra = rng.integers(0, np.maximum(own_blk[:, :1], 1), (n_rows, n_blocks // 2 - BQ // BK))
  blocks = np.sort(np.concatenate([own_blk, extra], axis=1), axis=1)
  dup = np.concatenate([np.zeros((n_rows, 1), bool), blocks[:, 1:] == blocks[:, :-1]], 1)
  blocks = np.where(dup, n_k + 1, blocks)
  blocks = np.sort(blocks, axis=1)
  count = (blocks <= n_k).sum(1).astype(np.int32)
  blocks = np.pad(np.where(blocks <= n_k, blocks, 0), ((0, 0), (0, n_blocks - blocks.shape[1])))
  args = [cand, cand_bits, cand, row_bits, row_lim, blocks.astype(np.int32), count]
  kw = {}
  if n_own:
    own = (rows[:, None] * BQ + np.arange(BQ)[None, :]).astype(np.int32)
    kw = dict(own=own, own_ok=np.ones_like(own, bool), own_lim=own)
  return [jnp.asarray(a) for a in args], {k: jnp.asarray(v) for k, v in kw.items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--length", type=int, default=1048576)
  ap.add_argument("--chunks", default="32,64,128")
  ap.add_argument("--warps", default="1,2,4")
  ap.add_argument("--shapes", default=",".join(SHAPES))
  args = ap.parse_args()
  bad = sorted(set(args.shapes.split(",")) - set(SHAPES))
  if bad:
    raise ValueError(f"--shapes: unknown {bad}; known: {list(SHAPES)}")
  interpret = jax.default_backend() != "gpu"
  rows = []
  for shape in args.shapes.split(","):
    n_cand, n_blocks, n_own = SHAPES[shape]
    a, kw = inputs(args.length, n_cand, n_blocks, n_own)
    heads = lambda x: jnp.broadcast_to(x, (HEADS, *x.shape))  # noqa: E731
    a, kw = [heads(x) for x in a], {k: heads(v) for k, v in kw.items()}
    max_cols = n_cand + n_own
    base = None
    variants = itertools.product(map(int, args.chunks.split(",")), map(int, args.warps.split(",")))
    default = planning.COLS_TILES
    for chunk, warps in [default, *[v for v in variants if v != default]]:
      fn = jax.jit(
        jax.vmap(
          lambda a, kw, c=chunk, w=warps, mc=max_cols: select_columns(
            *a, block_k=BK, max_cols=mc, chunk=c, num_warps=w, interpret=interpret, **kw
          )
        )
      )
      ms = bench.timeit(fn, a, kw, warmup=2, iters=10)
      base = base or ms
      print(f"{shape} chunk {chunk} warps {warps}: {ms:.3f} ms, {base / ms:.2f}x", flush=True)
      rows.append(dict(shape=shape, chunk=chunk, warps=warps, ms=ms, vs_default=base / ms))
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
