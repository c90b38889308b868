"""Kernel tile sweep on the GPU against cuDNN in the same run (B=1, N=28, K=4, H=128).

python tools/kernel_tiles.py --length 32768 --out results.json
"""

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp

import mmjax
from mmjax import bench
from mmjax import policies as P

TILES = ((64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2))


def _attend(q, k, v, plan, opts):
  return mmjax.sparse_attention(q, k, v, plan=plan, backend="pallas", pallas_options=dict(opts))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=32768)
  ap.add_argument("--out", default="")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--quick", action="store_true", help="only the 128x64 w4 s2 tile")
  args = ap.parse_args()
  t, n, kh, h = args.length, 28, 4, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, t, n, h), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, t, kh, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, t, kh, h), jnp.bfloat16)
  flops_dense = 4.0 * t * (t + 1) / 2 * n * h
  base = bench.timeit(bench.dense_baseline("cudnn"), q, k, v, iters=args.iters)
  rows = [dict(name="cudnn", ms=base, tflops=flops_dense / base / 1e9, density=1.0)]
  print(f"cudnn causal: {base:.2f} ms, {flops_dense / base / 1e9:.0f} TFLOP/s", flush=True)
  ref = None
  for bq, bk, warps, stages in TILES[1:2] if args.quick else TILES:
    opts = dict(num_warps=warps, num_stages=stages)
    pols = {
      "dense": P.get("dense", block_q=bq, block_k=bk),
      "block_sparse~10%": P.get(
        "block_sparse", block_q=bq, block_k=bk, top_k_blocks=max(1, math.ceil(0.05 * t / bk))
      ),
      "vertical_slash": P.get(
        "vertical_slash", block_q=bq, block_k=bk, vertical_size=1000, slash_size=256
      ),
    }
    for name, pol in pols.items():
      plan = jax.jit(pol.plan)(q, k)
      f = jax.jit(functools.partial(_attend, opts=tuple(opts.items())))
      try:
        out = f(q, k, v, plan)
        ms = bench.timeit(f, q, k, v, plan, iters=args.iters)
      except Exception as e:  # report and go on with the next tile
        print(
          f"{name} {bq}x{bk} w{warps} s{stages}: FAILED {type(e).__name__}: {str(e)[:300]}",
          flush=True,
        )
        continue
      density = float(plan.density())
      if name == "dense":
        if ref is None:
          ref = bench.dense_baseline("cudnn")(q, k, v)
        err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
      else:
        err = float("nan")
      tf = flops_dense * density / ms / 1e9
      row = dict(
        name=name,
        bq=bq,
        bk=bk,
        warps=warps,
        stages=stages,
        ms=ms,
        tflops=tf,
        density=density,
        vs_cudnn_speed=base / ms,
        max_err_vs_cudnn=err,
      )
      rows.append(row)
      print(
        f"{name:18s} {bq}x{bk} w{warps} s{stages}: {ms:8.2f} ms  density {density:.3f}  "
        f"{tf:5.0f} TFLOP/s eff  speedup {base / ms:5.2f}x  err {err:.2e}",
        flush=True,
      )
      del plan
  # column gathers: chunk width sweep on the vertical-slash plan (128x64 tiles).
  pol = P.get("vertical_slash", block_q=128, block_k=64, vertical_size=1000, slash_size=256)
  plan = jax.jit(pol.plan)(q, k)
  density = float(plan.density())
  for chunk in (16, 32, 64, 128):
    f = jax.jit(functools.partial(_attend, opts=(("col_chunk", chunk),)))
    ms = bench.timeit(f, q, k, v, plan, iters=args.iters)
    tf = flops_dense * density / ms / 1e9
    rows.append(
      dict(
        name="vertical_slash",
        bq=128,
        bk=64,
        col_chunk=chunk,
        ms=ms,
        tflops=tf,
        density=density,
        vs_cudnn_speed=base / ms,
      )
    )
    print(
      f"vertical_slash col_chunk {chunk:3d}: {ms:8.2f} ms density {density:.3f} "
      f"{tf:5.0f} TFLOP/s eff speedup {base / ms:5.2f}x",
      flush=True,
    )
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(
        dict(rows=rows, device=jax.devices()[0].device_kind, jax=jax.__version__, length=t),
        fh,
        indent=2,
      )


if __name__ == "__main__":
  main()
