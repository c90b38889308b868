"""The planner's pooled-score top-k (scores, chunk maxima, the two top-k passes) with the
scores from XLA (cuBLAS dot; mask and maxima as XLA passes) or from the pooled_scores
kernel (tiles without an allowed pair skipped), and the top-k kernel's rows whole up to
4096 or 512 entries (longer ones chunked), or scores and picks in one kernel
(pooled_topk, `planning.SCORE_TOPK_IMPL`), timed in the same run against the first.

  python3 tools/score_bench.py --out $OUT/score_bench.json     # on the GPU
  python3 tools/score_bench.py --variants planner,fused        # the planner's now vs fused

Cases (28 heads vmapped, head_dim 128, limits as a causal identity view: query block i's
last position, key block j's first): block_sparse at 1M (8192 x 16384 blocks, top 32) and
128k, grid's top 8 at 1M, and a 2D-boundary-like component at 1M whose query and key
blocks of the modality are two bands. `same`: the fraction of rows whose picked set is
the baseline's (TF32 products in both; near-ties may break differently).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench, planning
from pallas_kernels.pooled_topk import pooled_top_k
from tools.plan_trace import top_kernels

HEADS = 28
# name: (nQ, nK, top k, query-block band, key-block band) (bands as fractions; None: all)
CASES = {
  "block_sparse_1m": (8192, 16384, 32, None, None),
  "grid_1m": (8192, 16384, 8, None, None),
  "component_1m": (8192, 16384, 32, (0.3, 0.7), (0.1, 0.5)),
  "block_sparse_128k": (1024, 2048, 32, None, None),
  "tiny": (64, 256, 8, None, None),  # (a smoke run on the CPU: --cases tiny)
}
# (scores, the kernel's tile, planning._KERNEL_ROW); the first is the baseline: XLA's
# scores, rows up to 4096 to the top-k kernel whole (the planner before 2026-12-01b)
VARIANTS = {
  "xla_4096": ("xla", None, 4096),
  "pallas_4096": ("pallas", (64, 128, 4), 4096),
  "xla_512": ("xla", None, 512),
  "planner": ("pallas", (64, 128, 4), 512),  # the planner's default since 2026-12-01b
  "pallas_64x64": ("pallas", (64, 64, 4), 512),
  "fused": ("fused", (64, 128, 4), 512),  # scores and picks in one kernel
  # the pooled means in bfloat16 (planning.SCORE_DTYPE), with some tiles
  "planner_bf16": ("pallas", (64, 128, 4), 512, "bfloat16"),
  "bf16_128x128": ("pallas", (128, 128, 4), 512, "bfloat16"),
  "bf16_128x128_w8": ("pallas", (128, 128, 8), 512, "bfloat16"),
  "bf16_64x256": ("pallas", (64, 256, 4), 512, "bfloat16"),
  "bf16_128x64": ("pallas", (128, 64, 4), 512, "bfloat16"),
  "fused_bf16": ("fused", (64, 128, 4), 512, "bfloat16"),
  "fused_bf16_128": ("fused", (128, 128, 8), 512, "bfloat16"),
}


def inputs(n_q, n_k, qband, kband, seed=0):
  rng = np.random.default_rng(seed)
  qp = jnp.asarray(rng.standard_normal((HEADS, n_q, 128)) * 0.3, jnp.float32)
  kp = jnp.asarray(rng.standard_normal((HEADS, n_k, 128)) * 0.3, jnp.float32)
  q_lim = (np.arange(n_q) + 1) * 128 - 1
  k_lim = np.arange(n_k) * 64
  if qband:
    i = np.arange(n_q) / n_q
    q_lim = np.where((i >= qband[0]) & (i < qband[1]), q_lim, -1)
  if kband:
    j = np.arange(n_k) / n_k
    k_lim = np.where((j >= kband[0]) & (j < kband[1]), k_lim, 2**30)
  lims = (jnp.asarray(q_lim, jnp.int32), jnp.asarray(k_lim, jnp.int32))
  return qp, kp, *lims


def picker(n_k, k, fused=False, dtype="float32"):
  chunk = planning.topk_chunk(n_k, k)

  def one(qp, kp, q_lim, k_lim):
    qp, kp = qp.astype(dtype), kp.astype(dtype)  # (as planning._score_inputs casts them)
    if fused:  # as planning.scored_top_k calls it
      bm, bn, warps = planning.SCORE_TILES
      idx, vals = pooled_top_k(
        qp,
        kp,
        q_lim,
        k_lim,
        k=k,
        scale=0.088,
        block_m=bm,
        block_n=max(bn, chunk),
        num_warps=warps,
        interpret=jax.default_backend() != "gpu",
      )
      return jnp.sort(jnp.where(vals > -jnp.inf, idx, -1), axis=1)
    s, valid, cmax = planning.pooled_score_matrix(qp, kp, q_lim, k_lim, 0.088, chunk)
    idx, vals = planning.top_k_entries(
      s, valid, k, present=jnp.asarray(True), chunk_max=cmax, skip_empty=False
    )
    return jnp.sort(jnp.where(vals > -jnp.inf, idx, -1), axis=1)  # (-1: no pick)

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


def top_ops(fn, x, n=5):
  """The n costliest ops of one profiled call (us), printed and returned."""
  top = top_kernels(fn, *x, n=n)
  print("    " + ", ".join(f"{op} {us:.0f}us" for op, us in top))
  return top


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--cases", default=",".join(c for c in CASES if c != "tiny"))
  ap.add_argument("--variants", default=",".join(VARIANTS), help="the first is the baseline")
  args = ap.parse_args()
  rows = []
  for name in args.cases.split(","):
    n_q, n_k, k, qband, kband = CASES[name]
    x = inputs(n_q, n_k, qband, kband)
    want, t_base = None, None
    for variant in args.variants.split(","):
      impl, tiles, kernel_row, *dtype = VARIANTS[variant]
      dtype = dtype[0] if dtype else "float32"
      planning.SCORE_IMPL = "pallas" if impl == "fused" else impl
      planning._KERNEL_ROW = kernel_row
      planning.SCORE_TILES = tiles or planning.SCORE_TILES
      f = picker(n_k, k, fused=impl == "fused", dtype=dtype)
      got = np.asarray(f(*x))
      want = got if want is None else want
      same = float(np.mean(np.all(got == want, axis=2)))
      t = bench.timeit(f, *x, warmup=2, iters=10)
      t_base = t_base or t
      chunk = planning.topk_chunk(n_k, k)
      print(
        f"{name} {impl} {dtype} {tiles} rows<={kernel_row} (chunk {chunk}): {t:.3f} ms, "
        f"{t_base / t:.2f}x, same rows {same:.5f}",
        flush=True,
      )
      row = dict(case=name, variant=variant, impl=impl, tiles=tiles, kernel_row=kernel_row)
      row["dtype"] = dtype
      row["chunk"] = chunk
      rows.append(dict(row, ms=t, ratio=t_base / t, same=same, ops=top_ops(f, x)))
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
