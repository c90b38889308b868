"""Times the planner's pieces for one policy, vmapped over heads as policy.plan does.

python tools/profile_plan.py --length 131072 --heads 28
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import bench, planning
from mmjax import policies as P


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=131072)
  ap.add_argument("--heads", type=int, default=28)
  args = ap.parse_args()
  t, n, h = args.length, args.heads, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  q = jax.random.normal(keys[0], (n, t, h), jnp.bfloat16)
  k = jax.random.normal(keys[1], (n, t, h), jnp.bfloat16)
  mod = bench.video_text_modality(t, 576, 16, 256)[0]
  kw = dict(seq_len=t, block_q=128, block_k=64, scale=1 / np.sqrt(h))
  pol = P.get("2d_boundary", block_q=128, block_k=64)

  def timed(name, f):
    g = jax.jit(jax.vmap(f, in_axes=(0, 0, None)))
    ms = bench.timeit(g, q, k, mod, warmup=1, iters=3)
    print(f"{name:45s} {ms:9.2f} ms", flush=True)

  def view(layout, strides=()):
    return lambda q, k, m: planning.build_view(
      layout, strides, q.astype(jnp.float32), k.astype(jnp.float32), m, **kw
    )

  timed("cast q,k to f32", lambda q, k, m: (q.astype(jnp.float32), k.astype(jnp.float32)))
  timed("view identity", lambda q, k, m: view(planning.Layout("none"))(q, k, m).q)
  timed("view both", lambda q, k, m: view(planning.Layout("both"))(q, k, m).q)
  grid_layout = pol.layout()
  timed(
    "view both + grid(576)",
    lambda q, k, m: view(grid_layout, ((1, jnp.int32(576)),))(q, k, m).q,
  )
  for comp in pol.components():
    pat = comp.pattern

    def f(q, k, m, comp=comp, pat=pat):
      v = view(planning.Layout("both"))(q, k, m)
      return planning.pattern_priority(
        pat.name, pat, v, comp.q_mod, comp.k_mod, v.causal_possible()
      )[0]

    timed(f"view both + {pat.name} {comp.q_mod},{comp.k_mod}", f)
  n_k = t // 64
  mb, mc = min(pol.max_blocks(n_k), n_k), pol.max_cols()
  timed(
    "full head_plan 2d_boundary",
    lambda q, k, m: planning.head_plan(
      pol.layout(), pol.components(), q, k, m, max_blocks=mb, max_cols=mc, **kw
    )["block_idx"],
  )


if __name__ == "__main__":
  main()
