"""What a `lax.cond` costs in a plan-sized program on the GPU: a chain of small kernels
(one reduction + elementwise step each, on [28, 4096] f32), some steps inside a
`lax.cond` whose predicate is read from the device, compiled with the plan's options
(concurrent command buffers with CONDITIONAL / WHILE, as `bench.plan_compiler_options`
gives 2d_boundary at 128k) and with XLA's defaults (the cond on the host).

  python3 tools/cond_cost.py --out $OUT/cond_cost.json

Per (options, conds): the wall (median of --iters block_until_ready calls), the time per
call of --pipe calls dispatched back to back (one wait at the end: the host's launches
overlap the device's work), and the increment per cond over the chain without one.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import bench_attention as bench_config
from mmjax import bench


def _step(x):
  # [28, 4096] -> [28, 4096]: one reduction and an elementwise pass (one kernel)
  return jnp.sin(x - jnp.mean(x, axis=1, keepdims=True))


def chain(x, steps: int, conds: int):
  """`steps` dependent kernels; `conds` of them (spread evenly) each inside a lax.cond on
  a value of x (always true, not known to XLA)."""
  every = steps // conds if conds else steps + 1
  for i in range(steps):
    if conds and i % every == 0 and i // every < conds:
      x = jax.lax.cond(x[0, 0] > -2.0, _step, lambda y: y * 0.5, x)
    else:
      x = _step(x)
  return x


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--conds", default="0,1,2,5,10")
  ap.add_argument("--iters", type=int, default=50)
  ap.add_argument("--pipe", type=int, default=20)
  args = ap.parse_args()
  cfg = bench_config.get_config("")
  options = {
    "plan": bench.plan_compiler_options(cfg, 131072, "2d_boundary"),
    "default": None,
  }
  x = jax.random.normal(jax.random.PRNGKey(0), (28, 4096), jnp.float32)
  rows = []
  for opt_name, copts in options.items():
    base = None
    for n in (int(c) for c in args.conds.split(",")):
      fn = jax.jit(lambda x, n=n: chain(x, args.steps, n), compiler_options=copts)
      wall = bench.timeit(fn, x, warmup=3, iters=args.iters)
      pipe = bench.pipelined_ms(fn, x, calls=args.pipe)
      base = (wall, pipe) if base is None else base
      per = ((wall - base[0]) * 1e3 / n, (pipe - base[1]) * 1e3 / n) if n else (0.0, 0.0)
      print(
        f"{opt_name:8s} conds {n:3d}: wall {wall:.3f} ms, pipelined {pipe:.3f} ms/call;"
        f" per cond {per[0]:+.1f} / {per[1]:+.1f} us",
        flush=True,
      )
      rows.append(
        dict(options=opt_name, conds=n, steps=args.steps, wall_ms=wall, pipelined_ms=pipe)
      )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
