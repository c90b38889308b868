"""The Pallas top-k against lax.top_k on calls of few long rows (the vertical-slash
estimate's one row per head), each timed as a jitted call's wall (median; a call's
dispatch floor included):

  python tools/topk_few_rows.py > topk.txt

Per (rows, n, k): lax.top_k; the kernel with its default tiles; the kernel with each row
whole in one program (tile = n, block_rows 1) at 4, 8 and 16 warps, on random rows and
on rows with 1 in 13 entries valid (the rest -inf); whether its set is lax.top_k's. Then
`planning._top_k_1d` (the estimate's chunked top-k) of 28 rows of 131072, with the
planner's settings.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench, planning
from pallas_kernels.topk_select import top_k_select

SHAPES = ((28, 8192, 512), (28, 4096, 128), (28, 16384, 512), (28, 2048, 128))
WHOLE = ((4,), (8,), (16,))


def timed(fn, *args, iters=50):
  return round(bench.timeit(jax.jit(fn), *args, warmup=3, iters=iters), 4)


def main():
  key = jax.random.PRNGKey(0)
  for r, n, k in SHAPES:
    x = jax.random.normal(key, (r, n), jnp.float32)
    sparse = jnp.where(jnp.arange(n) % 13 == 0, x, -jnp.inf)
    want = jnp.sort(jax.lax.top_k(x, k)[1], 1)
    out = {"lax": timed(lambda x, k=k: jax.lax.top_k(x, k), x)}
    for tile, rows, warps in [(None, None, None)] + [(n, 1, w) for (w,) in WHOLE]:

      def f(x, k=k, tile=tile, rows=rows, warps=warps):
        return top_k_select(x, k, tile=tile, block_rows=rows, num_warps=warps)

      same = bool((jnp.sort(jax.jit(f)(x)[0], 1) == want).all())
      name = f"kernel tile {tile} rows {rows} warps {warps}"
      out[f"{name} (same set: {same})"] = timed(f, x)
      out[f"{name}, sparse"] = timed(f, sparse)
    print(r, n, k, out, flush=True)
  for n, k in ((131072, 512), (131072, 128)):
    x = jax.random.normal(key, (28, n), jnp.float32)
    f = jax.vmap(lambda v, k=k: planning._top_k_1d(v, k))
    print("_top_k_1d", n, k, timed(f, x), flush=True)


if __name__ == "__main__":
  main()
