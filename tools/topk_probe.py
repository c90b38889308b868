"""Where pooled_topk's time goes: its loop on grid's 1M shapes, cut down stage by stage.

Each variant but the last is a Pallas kernel with pooled_topk's program shape (one
program per `block_m` query blocks, a loop over every key tile, vmapped over the heads)
that stops after one stage of the loop body and keeps a row maximum of what it made, so
that the stage is not optimised away. The time between two variants is one stage's:

  load:  the key tile and its limits loaded (no dot)
  dot:   + the tile's dot, s = qp kp^T * scale                      [block_m, block_n]
  pack:  + the mask and the packed int32 keys (pooled_topk's `_pack`)
  cond:  pack inside the `lax.cond` that skips a tile without an allowed pair
  full:  pooled_topk itself (cond + the insertion loop, `_insert_packed`)

The limits are those of a view grid-permuted by `--stride` (no tile is skipped: each
holds some allowed pair) or, with `--identity`, of a causal identity view (about half
the tiles skipped).

  python3 tools/topk_probe.py --out $OUT/topk_probe.json            # on the GPU
  python3 tools/topk_probe.py --n_k 512 --heads 2 --iters 1         # CPU (interpret)
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import bench
from pallas_kernels.pooled_topk import kernel as topk_kernel
from pallas_kernels.pooled_topk import pooled_top_k

STAGES = ("load", "dot", "pack", "cond", "full")


def limits(n_k, block_q, block_k, stride, identity):
  """(q_lim [nQ], k_lim [nK]) of a view of nK * block_k tokens: each query block's last
  original position and each key block's first, in identity or grid order."""
  length = n_k * block_k
  pos = np.arange(length)
  if not identity:  # (position mod stride, position): the grid permutation
    pos = np.lexsort((pos, pos % stride))
  q_lim = pos.reshape(-1, block_q).max(1)
  k_lim = pos.reshape(-1, block_k).min(1)
  return jnp.asarray(q_lim, jnp.int32), jnp.asarray(k_lim, jnp.int32)


def _probe_kernel(qp_ref, kp_ref, qlim_ref, klim_ref, out_ref, *, stage, scale, block_n, n_tiles):
  q, q_lim = qp_ref[...], qlim_ref[...]
  q_max = jnp.max(q_lim)

  def tile(t, acc):
    k_lim = klim_ref[pl.ds(t * block_n, block_n)]
    kp = kp_ref[pl.ds(t * block_n, block_n), :]
    if stage == "load":
      return acc + jnp.max(kp.astype(jnp.float32)) + jnp.min(k_lim).astype(jnp.float32)

    def body(acc):
      s = plgpu.dot(q, kp, trans_b=True, allow_tf32=True) * scale
      if stage == "dot":
        return jnp.maximum(acc, jnp.max(s, axis=1))
      cols = t * block_n + jnp.arange(block_n, dtype=jnp.int32)
      key = jnp.where(
        k_lim[None, :] <= q_lim[:, None],
        topk_kernel._pack(s, cols),
        topk_kernel._EMPTY,
      )
      return jnp.maximum(acc, jnp.max(key, axis=1).astype(jnp.float32))

    if stage == "cond":
      return jax.lax.cond(q_max >= jnp.min(k_lim), body, lambda a: a, acc)
    return body(acc)

  acc0 = jnp.full((q.shape[0],), -jnp.inf, jnp.float32)
  out_ref[...] = jax.lax.fori_loop(0, n_tiles, tile, acc0)


def probe(stage, qp, kp, q_lim, k_lim, *, scale, block_m, block_n, warps, interpret):
  """One head's variant `stage` (vmapped by the caller)."""
  if stage == "full":
    return pooled_top_k(
      qp, kp, q_lim, k_lim, k=8, scale=scale, block_m=block_m, block_n=block_n,
      num_warps=warps, interpret=interpret,
    )[0]  # fmt: skip
  n_q, h = qp.shape
  n_k = kp.shape[0]
  kernel = functools.partial(
    _probe_kernel, stage=stage, scale=scale, block_n=block_n, n_tiles=n_k // block_n
  )
  return pl.pallas_call(
    kernel,
    grid=(n_q // block_m,),
    in_specs=topk_kernel.input_specs(block_m, n_k, h),  # (pooled_topk's programs)
    out_specs=pl.BlockSpec((block_m,), lambda i: (i,)),
    out_shape=jax.ShapeDtypeStruct((n_q,), jnp.float32),
    compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
    interpret=interpret,
    name=f"mmjax_topk_probe_{stage}",
  )(qp, kp, q_lim, k_lim)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n_k", type=int, default=16384, help="key blocks (1M tokens / 64)")
  ap.add_argument("--heads", type=int, default=28)
  ap.add_argument("--stride", type=int, default=576)
  ap.add_argument("--identity", action="store_true", help="a causal identity view's limits")
  ap.add_argument("--tile", default="64,128,4", help="block_m,block_n,warps")
  ap.add_argument("--stages", default=",".join(STAGES))
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  block_m, block_n, warps = (int(x) for x in args.tile.split(","))
  interpret = jax.default_backend() == "cpu"
  q_lim, k_lim = limits(args.n_k, 128, 64, args.stride, args.identity)
  n_q, h = q_lim.shape[0], 128
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  qp = jax.random.normal(keys[0], (args.heads, n_q, h), jnp.float32).astype(jnp.bfloat16)
  kp = jax.random.normal(keys[1], (args.heads, args.n_k, h), jnp.float32).astype(jnp.bfloat16)
  kw = dict(scale=h**-0.5, block_m=block_m, block_n=block_n, warps=warps, interpret=interpret)
  view = "identity" if args.identity else f"grid stride {args.stride}"
  print(f"{args.heads} heads, {n_q} x {args.n_k} blocks, {view}, tile {args.tile}")
  rows, prev = [], None
  for stage in args.stages.split(","):
    fn = jax.jit(jax.vmap(functools.partial(probe, stage, **kw), in_axes=(0, 0, None, None)))
    ms = bench.timeit(fn, qp, kp, q_lim, k_lim, warmup=1, iters=args.iters)
    step = "" if prev is None else f" (+{ms - prev:.2f})"
    print(f"  {stage:5s} {ms:8.2f} ms{step}", flush=True)
    rows.append(dict(stage=stage, ms=ms, tile=args.tile, view=view, n_k=args.n_k))
    prev = ms
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
