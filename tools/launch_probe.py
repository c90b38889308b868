"""Where a plan call's host time goes before the device starts (GPU): the call's dispatch
(until fn(*args) returns, the device idle before it) and its wall, for the benchmark's
compile options and variants of XLA's command-buffer options, and, with --vlog, which
calls re-record ("update") the plan's CUDA graph.

  python3 tools/launch_probe.py --out $OUT/probe.json
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 \\
    python3 tools/launch_probe.py --vlog > vlog.txt 2>&1

--vlog: the calls in phases, each marked on stderr ("PHASE <name> <i>") before XLA's log
lines of that call: "timeit" (results dropped at once, as `bench.timeit`), "kept" (each
result kept alive until the end: new output buffers every call), "timeit2" (dropped
again). XLA logs "Updated command buffer in N us" for a call whose buffers moved.
"""

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import bench_attention as bench_config
from mmjax import bench
from mmjax import policies as P
from tools import plan_trace as pt

# name -> the XLA options added to (or, as None, removed from) the benchmark's
OPTION_VARIANTS = {
  "base": {},
  "no_graphs": {"xla_gpu_enable_command_buffer": ""},
  "default_types": {"xla_gpu_enable_command_buffer": None},
  "lhs": {"xla_gpu_command_buffer_scheduling_mode": "LHS"},
  "base2": {},
}


def _plan_fn(policy, length, extra):
  cfg = bench_config.get_config("")
  copts = dict(bench.plan_compiler_options(cfg, length, policy) or {})
  for k, v in extra.items():
    if v is None:
      copts.pop(k, None)
    else:
      copts[k] = v
  hps = bench.heads_per_step(cfg, length, 28)
  pol = P.get(policy, block_q=cfg.block_q, block_k=cfg.block_k, heads_per_step=hps)
  return jax.jit(lambda q, k, m: pol.plan(q, k, m), compiler_options=copts or None), copts


def _vlog(fn, args, n):
  jax.block_until_ready(fn(*args))
  for phase in ("timeit", "kept", "timeit2"):
    kept = []
    for i in range(n):
      print(f"PHASE {phase} {i}", file=sys.stderr, flush=True)
      t0 = time.perf_counter()
      out = fn(*args)
      t1 = time.perf_counter()
      jax.block_until_ready(out)
      t2 = time.perf_counter()
      print(
        f"CALL {phase} {i} dispatch {1e3 * (t1 - t0):.3f} wall {1e3 * (t2 - t0):.3f}",
        file=sys.stderr,
        flush=True,
      )
      if phase == "kept":
        kept.append(out)
      del out
    del kept


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  ap.add_argument("--length", type=int, default=131072)
  ap.add_argument("--policies", default="2d_boundary,block_sparse,a_shape")
  ap.add_argument("--variants", default=",".join(OPTION_VARIANTS))
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--vlog", action="store_true")
  args = ap.parse_args()
  q, k, mod = pt.plan_inputs(args.length)
  if args.vlog:
    fn, _ = _plan_fn(args.policies.split(",")[0], args.length, {})
    _vlog(fn, (q, k, mod), 8)
    return
  rows = []
  for policy in args.policies.split(","):
    ref = None
    for name in args.variants.split(","):
      fn, copts = _plan_fn(policy, args.length, OPTION_VARIANTS[name])
      wall = bench.timeit(fn, q, k, mod, warmup=3, iters=args.iters)
      disp = bench.dispatch_ms(fn, q, k, mod, iters=args.iters)
      pipe = bench.pipelined_ms(fn, q, k, mod)
      wall2 = statistics.median(
        [bench.timeit(fn, q, k, mod, warmup=0, iters=args.iters) for _ in range(2)]
      )
      plan = fn(q, k, mod)
      same = True if ref is None else pt.same_plans(plan, ref)
      ref = plan if ref is None else ref
      row = dict(
        policy=policy, variant=name, wall=wall, wall2=wall2, dispatch=disp, pipelined=pipe,
        same=same, options=copts,
      )  # fmt: skip
      rows.append(row)
      print(
        f"{policy:13s} {name:14s} wall {wall:.3f} / {wall2:.3f} ms  dispatch {disp:.3f}"
        f"  pipelined {pipe:.3f}  same {same}",
        flush=True,
      )
  bench.write_report(args.out, rows)


if __name__ == "__main__":
  main()
