"""Permuted plans: kernel time with the permutation as separate gathers vs fused into the
kernel's loads and stores, against cuDNN in the same run (B=1, N=28, K=4, H=128, bf16).

  python tools/fuse_compare.py --lengths 32768 131072 --out fuse.json
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp

import mmjax
from mmjax import bench
from mmjax import policies as P


def _attend(q, k, v, plan, fuse):
  return mmjax.sparse_attention(
    q, k, v, plan=plan, backend="pallas", pallas_options={"fuse_permutation": fuse}
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  rows = []
  for t in args.lengths:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, t, 28, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, 4, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, 4, 128), jnp.bfloat16)
    mod = bench.video_text_modality(t, 576, 16, 256)
    base = bench.timeit(bench.dense_baseline("cudnn"), q, k, v, iters=args.iters)
    flops = 4.0 * t * (t + 1) / 2 * 28 * 128
    for name in ("grid", "2d_boundary", "q_boundary"):
      pol = P.get(name, block_q=128, block_k=64, heads_per_step=4)
      plan = jax.jit(lambda q, k, m, pol=pol: pol.plan(q, k, m))(q, k, mod)
      density = float(plan.density())
      outs = {}
      for fuse in (False, True):
        f = jax.jit(functools.partial(_attend, fuse=fuse))
        outs[fuse] = f(q, k, v, plan)
        ms = bench.timeit(f, q, k, v, plan, iters=args.iters)
        row = dict(
          length=t,
          policy=name,
          fused=fuse,
          ms=ms,
          density=density,
          tflops=flops * density / ms / 1e9,
          cudnn_ms=base,
        )
        rows.append(row)
        print(
          f"T={t} {name:12s} fused={fuse!s:5s} {ms:8.2f} ms  density {density:.4f}  "
          f"{row['tflops']:5.0f} TFLOP/s eff  cudnn {base:.1f} ms",
          flush=True,
        )
      diff = float(jnp.abs(outs[True].astype(jnp.float32) - outs[False].astype(jnp.float32)).max())
      print(f"   max |fused - unfused| = {diff:.2e}", flush=True)
      del plan
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(
        dict(rows=rows, device=jax.devices()[0].device_kind, jax=jax.__version__), fh, indent=2
      )


if __name__ == "__main__":
  main()
