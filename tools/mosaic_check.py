"""The Mosaic GPU block-sparse kernel on the GPU: correctness against the reference, then
dense-plan and ~10%-density speed against cuDNN and the Triton kernel, in one run.

python tools/mosaic_check.py --lengths 32768 131072 --out mosaic.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import bench
from pallas_kernels import sparse_flash
from pallas_kernels.sparse_flash import mosaic


def causal_plan(length, n, block_q, block_k, density=1.0, seed=0, b=1):
  """Ascending block lists per query block: every causal block (density 1) or a random
  share of them plus the blocks on the diagonal. Returns (idx, count, computed pairs)."""
  rng = np.random.default_rng(seed)
  nq, nk = length // block_q, length // block_k
  idx = np.zeros((b, n, nq, nk), np.int32)
  cnt = np.zeros((b, n, nq), np.int32)
  pairs = 0
  for i in range(nq):
    last = ((i + 1) * block_q - 1) // block_k
    js = np.arange(last + 1)
    diag = js >= (i * block_q) // block_k
    qs = np.arange(i * block_q, (i + 1) * block_q)
    for bb in range(b):
      for hh in range(n):
        keep = js[diag | (rng.random(last + 1) < density)]
        idx[bb, hh, i, : len(keep)] = keep
        cnt[bb, hh, i] = len(keep)
        # causal pairs of the kept blocks: per query, the keys <= it inside each block
        pairs += int(np.clip(qs[None, :] - keep[:, None] * block_k + 1, 0, block_k).sum())
  mb = int(cnt.max())
  return jnp.asarray(idx[..., :mb]), jnp.asarray(cnt), pairs


def check(dtype, block_k, seed):
  b, length, n, kh, h, block_q = 2, 1024, 4, 2, 128, 128
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (b, length, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, length, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, length, kh, h), jnp.float32).astype(dtype)
  out = {}
  for density in (1.0, 0.3):
    idx, cnt, _ = causal_plan(length, n, block_q, block_k, density, seed, b)
    cnt = cnt.at[0, 1, 3].set(0)  # a query block with nothing listed: zeros
    got = mosaic.sparse_attention(q, k, v, idx, cnt, block_q=block_q, block_k=block_k, debug=True)
    pos_q = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, n, length))
    pos_k = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, kh, length))
    none = jnp.zeros((b, n, length // block_q, 0), jnp.int32)
    want = sparse_flash.sparse_attention_reference(
      q, k, v, pos_q, pos_k, idx, cnt, none, jnp.zeros_like(cnt), block_q=block_q, block_k=block_k
    )
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    zero_rows = float(jnp.max(jnp.abs(got[0, 3 * block_q : 4 * block_q, 1].astype(jnp.float32))))
    out[f"density_{density}"] = dict(max_abs_err=err, empty_block_max_abs=zero_rows)
  return out


def timeit(fn, *args, iters):
  return bench.timeit(fn, *args, warmup=2, iters=iters)


def speed(length, iters, block_ks):
  n, kh, h, block_q = 28, 4, 128, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, length, n, h), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, length, kh, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, length, kh, h), jnp.bfloat16)
  flops = lambda pairs: 4.0 * pairs * h  # noqa: E731
  rows = []
  base = timeit(bench.dense_baseline("cudnn"), q, k, v, iters=iters)
  dense_pairs = length * (length + 1) / 2 * n
  rows.append(dict(T=length, kernel="cudnn", density=1.0, ms=base))
  pos_q = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (1, n, length))
  pos_k = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (1, kh, length))
  for density in (1.0, 0.1):
    for bk in block_ks:
      idx, cnt, pairs = causal_plan(length, 1, block_q, bk, density, seed=1)
      idx = jnp.broadcast_to(idx, (1, n) + idx.shape[2:])
      cnt = jnp.broadcast_to(cnt, (1, n) + cnt.shape[2:])
      pairs *= n
      mg = jax.jit(
        lambda q, k, v, i, c, bk=bk: mosaic.sparse_attention(q, k, v, i, c, block_q=128, block_k=bk)
      )
      ms = timeit(mg, q, k, v, idx, cnt, iters=iters)
      rows.append(dict(T=length, kernel=f"mosaic 128x{bk}", density=pairs / dense_pairs, ms=ms))
      if bk == 64:
        none = jnp.zeros(idx.shape[:3] + (0,), jnp.int32)
        tr = jax.jit(
          lambda q, k, v, i, c, none=none: sparse_flash.sparse_attention(
            q, k, v, pos_q, pos_k, i, c, none, jnp.zeros_like(c), block_q=128, block_k=64
          )
        )
        ms = timeit(tr, q, k, v, idx, cnt, iters=iters)
        rows.append(dict(T=length, kernel="triton 128x64", density=pairs / dense_pairs, ms=ms))
      for r in rows[-2:]:
        r.setdefault("tflops", flops(pairs) / r["ms"] / 1e9)
  rows[0]["tflops"] = flops(dense_pairs) / base / 1e9
  for r in rows:
    r["vs_cudnn"] = base / r["ms"]
    r["tflops_vs_cudnn"] = r["tflops"] / rows[0]["tflops"]
    print(
      f"T={r['T']} {r['kernel']:>16} density {r['density']:.3f}: {r['ms']:.2f} ms, "
      f"{r['tflops']:.0f} TFLOP/s ({r['tflops_vs_cudnn']:.2f} of cuDNN's), "
      f"{r['vs_cudnn']:.2f}x cuDNN's time",
      flush=True,
    )
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", type=int, nargs="*", default=[32768])
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--block_ks", type=int, nargs="*", default=[64, 128])
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  res = dict(
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    date=time.strftime("%Y-%m-%d"),
    command="python tools/mosaic_check.py "
    + " ".join(
      f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
      for k, v in vars(args).items()
      if k != "out"
    ),
  )
  checks = {}
  for dtype in (jnp.bfloat16, jnp.float16):
    for bk in args.block_ks:
      name = f"{jnp.dtype(dtype).name}_bk{bk}"
      checks[name] = check(dtype, bk, seed=bk)
      print(name, checks[name], flush=True)
  res["checks"] = checks
  res["speed"] = [r for t in args.lengths for r in speed(t, args.iters, args.block_ks)]
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
  assert all(
    c["max_abs_err"] < 3e-2 and c["empty_block_max_abs"] == 0.0
    for v in checks.values()
    for c in v.values()
  ), "the Mosaic GPU kernel differs from the reference"


if __name__ == "__main__":
  main()
