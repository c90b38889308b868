"""The Pallas top-k (pallas_kernels.topk_select) against lax.top_k on the planner's shapes,
timed in the same run; checks that both pick the same entries.

  python3 tools/topk_bench.py --out $OUT/topk_bench.json     # on the GPU

Shapes (rows, n, k): the chunk maxima and candidates of a 1M-token block_sparse plan over
28 heads (229376 rows of 1024 and of 512, k 32), the same at 128k taken whole (28672 rows of
2048), and the vertical picks of a 1M plan (28 rows of 16384, k 512).
"""

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench
from pallas_kernels.topk_select import top_k_select, top_k_select_reference

SHAPES = ((229376, 1024, 32), (229376, 512, 32), (28672, 2048, 32), (28, 16384, 512))
# values: "ties" (rounded to 1/8: ties at the k-th value) or "continuous" (normal f32, like
# the planner's scores); a search that stops early would time them differently
VALUES = ("ties", "continuous")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  interpret = jax.default_backend() != "gpu"
  rows_out = []
  for (rows, n, k), values in itertools.product(SHAPES, VALUES):
    if interpret:
      rows = min(rows, 64)
    x = jax.random.normal(jax.random.PRNGKey(rows + n + k), (rows, n), jnp.float32)
    if values == "ties":
      x = jnp.round(x * 8) / 8
    ours = jax.jit(lambda x, k=k: top_k_select(x, k, interpret=interpret))
    ref = jax.jit(lambda x, k=k: jax.lax.top_k(x, k))
    same = all(
      bool(jnp.array_equal(a, b))
      for a, b in zip(ours(x), top_k_select_reference(x, k), strict=True)
    )
    t_ours = bench.timeit(ours, x, warmup=2, iters=10)
    t_ref = bench.timeit(ref, x, warmup=2, iters=10)
    row = dict(rows=rows, n=n, k=k, values=values, pallas_ms=t_ours, lax_top_k_ms=t_ref, same=same)
    row["speedup"] = t_ref / t_ours
    rows_out.append(row)
    print(
      f"[{rows}, {n}] k={k} {values}: pallas {t_ours:.3f} ms, lax.top_k {t_ref:.3f} ms, "
      f"{t_ref / t_ours:.1f}x, same entries: {same}",
      flush=True,
    )
  bench.write_report(args.out, rows_out)


if __name__ == "__main__":
  main()
