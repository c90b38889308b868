"""One policy's plan under variants of the planner, compiled as the attention benchmark
compiles it (its compile options at that length), timed in one process: an A/B of planner
changes without the benchmark's noise between runs. GPU.

  python3 tools/plan_variants.py --out $OUT/v --variants base,noearly,div32 [--rounds 10]

Per variant: the plan's wall (two medians of --iters calls), the kernel time summed over
one profiled call ("ops"; kernels overlap under concurrent scheduling), the kernel count,
the profiled call's device busy and idle time, and whether the plan equals the first
variant's, and the profiled call's three longest device idle gaps with the host events in
them. Each variant's kernels are listed in time order in <out>/timeline_<variant>.txt
(start and duration in us, "*" where the device was idle before it, the stream).

Variants (each against the planner as it is; names in VARIANTS): base (base2: the same,
another time); noearly (no vertical-slash estimate in the view before the grid permutation);
tiles1 / tiles2 (attn_mass's first pass with 1 or 2 key tiles per program, not 8); div32
(estimates over one modality group with L / 128 / 32 programs per head, `mass_range_div`);
p16 (`mass_p_dtype` float16); noopt (no fallback pairs for ids the 2D boundary never names:
not a valid plan where such ids occur); tsort (`score_topk_sort`); st32 / st16
(pooled_topk's tile with 32 / 16 query blocks); pg1 (`pool_group` 1); wscan (the split rows'
window picked by jnp.searchsorted's scan, a while loop, as before); nosplit (`split_rows`
False: no lax.switch over window sizes); spare (col_select's output with a spare slot per
row, then sliced, as before); noskip (`skip_empty_work` False: the planner's conds that skip
work no head needs gone: the short lists' merge's); noskip_nosplit (and `split_rows` False);
gsort / gsort2 (`group_count_ids` 0: the group sort by a sort, not counts); nocond (every
lax.cond of the plan replaced by the branch the benchmark's input takes, `_TAKEN`: what the
conds cost; `same` says whether the input takes them), nocond_w1 ... nocond_w10 (and the
split rows' lax.switch by its j-th window of `planning_lists.ROW_WINDOWS`); pow2win (the
split rows' windows nQ / 32, nQ / 16, ..., nQ, as before); nc_group, nc_merge, nc_fits,
nc_pool (one kind of cond static: the group sort's, the short lists' merge's, the
compaction's, the optional selectors' means); rstats8 (attn_mass's pass 1 over a key range
in programs of 8 tiles of L, not laid over the range: `STATS_SHARE_RANGE` False; rstats8b:
the same again); noconc (LHS command-buffer scheduling added to the plan's compile options);
mw8 / mw2 (attn_mass with 8 / 2 warps); ms1, ms3, ms311, ms211 (attn_mass's pipeline stages
of passes 1-3: 1,1,1 / 3,3,2 / 3,1,1 / 2,1,1), ms311_t64, ms311_mw8 (and key tiles of 64 / 8
warps); pt1 / pt3 (pooled_topk with 1 / 3 stages); tile64 / tile256 (the estimates' key
tile, `planning.MASS_TILE`); sw3 (the split rows' switch alone replaced by its 3rd branch);
rw4 / rw3 (`ROW_WINDOWS` (3, 8, 16, 32) / (3, 12, 32)), rw4_ms311; oldwin / old (the
windows, and attn_mass's stages 3,2,1, as before h200_2026-12-03g); bw8 (block_mean with 8
warps); ts / ts2 (the estimates by attn_mass's two passes, `mass_tile_stats`); poolapart
(the optional selectors' means in a lax.cond of their own, `planning.POOL_OPTIONAL_APART`,
as before); stacked (block_mean's selections in one output array, sliced by XLA, as before);
ts_noskip (ts and noskip); loop3 / ts_loop3 (the split rows by a loop over windows of 3 / 32
of nQ, `planning_lists.ROW_LOOP`, not a lax.switch; and ts).
Also per variant: "pipelined", the ms per call of calls dispatched back to back (each
call's outputs kept: new output buffers every call, so XLA re-records the plan's graph
each time, about 0.3 ms of host time; h200_2026-12-03g), and "dispatch", the ms until a
call returns with the device idle before it (`bench.dispatch_ms`).
With --rounds R, the compiled variants are then timed in turn, R rounds of --round_iters
calls each: the walls of variants measured one after the other drift by up to 0.1 ms in
a run (base against base2), which this spreads over all of them; it prints each
variant's median and its paired difference from the first variant.
"""

import argparse
import collections
import contextlib
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import bench_attention as bench_config
from mmjax import bench, planning, planning_lists
from mmjax import policies as P
from pallas_kernels.attn_mass import kernel as mass_kernel
from pallas_kernels.block_pool import block_mean
from pallas_kernels.col_select import kernel as col_select_kernel
from pallas_kernels.pooled_topk import kernel as topk_kernel
from tools import plan_trace as pt


@contextlib.contextmanager
def _patch(obj, name, val):
  old = getattr(obj, name)
  setattr(obj, name, val)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _mass_tiles(n):
  return _patch(planning, "attention_mass", functools.partial(planning.attention_mass, tiles=n))


def _no_optional():
  comps = P.TwoDBoundary.components

  def components(self):
    return tuple(c for c in comps(self) if not planning._optional(c))

  return _patch(P.TwoDBoundary, "components", components)


# The branches each lax.cond of the 2D boundary's 128k plan takes on the benchmark's input
# (`nocond`): the counting group sort, the short lists' sort and merge, the compaction of
# rows that fit, no optional selectors' means (no unnamed id).
_TAKEN = {"_count_sort", "sort_merge", "compact", "zeros"}


def _static_conds(window=None, taken=_TAKEN):
  """jax.lax.cond (and with `window`, `_wide_rows`' lax.switch: that branch) replaced by
  the branch named in `taken`, picked when traced: a measure of what the conditionals
  cost, valid only where the input takes those branches (`same` says)."""
  real_cond, real_switch = jax.lax.cond, jax.lax.switch

  def name(f):
    return getattr(getattr(f, "func", f), "__name__", "")

  def cond(pred, true_fun, false_fun, *ops, **kw):
    if name(true_fun) in taken:
      return true_fun(*ops)
    if name(false_fun) in taken:
      return false_fun(*ops)
    return real_cond(pred, true_fun, false_fun, *ops, **kw)

  def switch(index, branches, *ops, **kw):
    if window is not None and len(branches) == 1 + len(planning_lists.ROW_WINDOWS):
      return branches[window](*ops)
    return real_switch(index, branches, *ops, **kw)

  stack = contextlib.ExitStack()
  stack.enter_context(_patch(jax.lax, "cond", cond))
  stack.enter_context(_patch(jax.lax, "switch", switch))
  return stack


def _scan_window():
  def count_below(sizes, x):
    return jnp.searchsorted(jnp.asarray(sizes, jnp.int32), x)

  return _patch(planning_lists, "_count_below", count_below)


def _both(*contexts):
  stack = contextlib.ExitStack()
  for c in contexts:
    stack.enter_context(c)
  return stack


def _stages(stages):  # attn_mass's pipeline stages of passes 1-3
  return _patch(mass_kernel, "NUM_STAGES", stages)


def _mass_kw(**kw):
  return _patch(planning, "attention_mass", functools.partial(planning.attention_mass, **kw))


_OLD_WINDOWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

# Variants that change the plan program's XLA options (added to the benchmark's).
# (XLA's command-buffer update modes are not among them: jax 0.11.2's XLA rejects
# CAPTURE_CMD_NEVER_UPDATE, and NEVER_UPDATE keeps the first call's buffer addresses in
# the graph, wrong once a call's outputs move; h200_2026-12-03g/1_launch.)
COPT_VARIANTS = {
  "noconc": {"xla_gpu_command_buffer_scheduling_mode": "LHS"},
}

VARIANTS = {
  "base": contextlib.nullcontext,
  **{n: contextlib.nullcontext for n in COPT_VARIANTS},
  "mw8": lambda: _mass_kw(num_warps=8),
  "mw2": lambda: _mass_kw(num_warps=2),
  "ms1": lambda: _stages((1, 1, 1)),
  "ms3": lambda: _stages((3, 3, 2)),
  "ms311": lambda: _stages((3, 1, 1)),
  "ms211": lambda: _stages((2, 1, 1)),
  "ms311_t64": lambda: _both(_stages((3, 1, 1)), _patch(planning, "MASS_TILE", 64)),
  "ms311_mw8": lambda: _both(_stages((3, 1, 1)), _mass_kw(num_warps=8)),
  "pt1": lambda: _patch(topk_kernel, "NUM_STAGES", 1),
  "pt3": lambda: _patch(topk_kernel, "NUM_STAGES", 3),
  "tile64": lambda: _patch(planning, "MASS_TILE", 64),
  # (the split rows' lax.switch alone replaced by its 3rd window, 3/32 of nQ: the 80
  # text rows of the 128k input; the other conds kept)
  "sw3": functools.partial(_static_conds, 3, frozenset()),
  "rw4": lambda: _patch(planning_lists, "ROW_WINDOWS", (3, 8, 16, 32)),
  # (the split rows' windows and attn_mass's stages as before h200_2026-12-03g)
  "oldwin": lambda: _patch(planning_lists, "ROW_WINDOWS", _OLD_WINDOWS),
  "old": lambda: _both(
    _patch(planning_lists, "ROW_WINDOWS", _OLD_WINDOWS),
    _stages((3, 2, 1)),
  ),
  "ts": lambda: planning.settings(mass_tile_stats=True),
  "poolapart": lambda: _patch(planning, "POOL_OPTIONAL_APART", True),
  "stacked": lambda: _patch(
    planning, "block_mean", lambda *a, **kw: block_mean(*a, **(kw | {"stacked": True}))
  ),
  "ts_noskip": lambda: planning.settings(mass_tile_stats=True, skip_empty_work=False),
  "loop3": lambda: _patch(planning_lists, "ROW_LOOP", 3),
  # (as before h200_2026-12-04: the three-pass estimates, the rows' switch)
  "mass3": lambda: planning.settings(mass_tile_stats=False),
  "switch": lambda: _patch(planning_lists, "ROW_LOOP", 0),
  "pre04": lambda: _both(
    planning.settings(mass_tile_stats=False), _patch(planning_lists, "ROW_LOOP", 0)
  ),
  "ts_loop3": lambda: _both(
    planning.settings(mass_tile_stats=True), _patch(planning_lists, "ROW_LOOP", 3)
  ),
  "ts2": lambda: planning.settings(mass_tile_stats=True),  # (ts again)
  "bw8": lambda: _patch(
    planning, "block_mean", functools.partial(planning.block_mean, num_warps=8)
  ),
  "rw3": lambda: _patch(planning_lists, "ROW_WINDOWS", (3, 12, 32)),
  "rw4_ms311": lambda: _both(
    _patch(planning_lists, "ROW_WINDOWS", (3, 8, 16, 32)),
    _stages((3, 1, 1)),
  ),
  "tile256": lambda: _patch(planning, "MASS_TILE", 256),
  "base2": contextlib.nullcontext,  # (base again, later in the run: the drift)
  "noearly": lambda: _patch(planning, "early_estimates", lambda layout, components: ()),
  "tiles2": lambda: _mass_tiles(2),
  "tiles1": lambda: _mass_tiles(1),
  "div32": lambda: planning.settings(mass_range_div=32),
  "p16": lambda: planning.settings(mass_p_dtype="float16"),
  "noopt": _no_optional,
  "tsort": lambda: planning.settings(score_topk_sort=True),
  "st32": lambda: _patch(planning, "SCORE_TILES", (32, 128, 4)),
  "st16": lambda: _patch(planning, "SCORE_TILES", (16, 128, 4)),
  "pg1": lambda: planning.settings(pool_group=1),
  "wscan": _scan_window,
  "nosplit": lambda: planning.settings(split_rows=False),
  "noskip": lambda: planning.settings(skip_empty_work=False),
  "noskip_nosplit": lambda: planning.settings(skip_empty_work=False, split_rows=False),
  "gsort": lambda: planning.settings(group_count_ids=0),
  "gsort2": lambda: planning.settings(group_count_ids=0),
  "spare": lambda: _patch(col_select_kernel, "SPARE_SLOT", True),
  "nocond": _static_conds,
  # (and the split rows' window statically the j-th branch of ROW_WINDOWS: 1 = nQ / 32)
  **{f"nocond_w{j}": functools.partial(_static_conds, j) for j in range(1, 11)},
  # (one kind of cond static: the group sort's, the merge's, the compaction's, the pooling's)
  **{
    f"nc_{kind}": functools.partial(_static_conds, None, {fun})
    for kind, fun in (
      ("group", "_count_sort"),
      ("merge", "sort_merge"),
      ("fits", "compact"),
      ("pool", "zeros"),
    )
  },  # fmt: skip
  "rstats8b": lambda: _patch(mass_kernel, "STATS_SHARE_RANGE", False),  # (again)
  "rstats8": lambda: _patch(mass_kernel, "STATS_SHARE_RANGE", False),
  "pow2win": lambda: _patch(planning_lists, "ROW_WINDOWS", (1, 2, 4, 8, 16, 32)),
}


def kernel_timeline(events) -> list[str]:
  """The device kernels of one profiled call in start order: start (us from the first),
  duration, "*" where no kernel ran just before it, the stream id, the kernel's name."""
  dev = sorted(
    (e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})),
    key=lambda e: e["ts"],
  )
  if not dev:
    return []
  t0, end, lines = dev[0]["ts"], 0.0, []
  for e in dev:
    s = e["ts"] - t0
    idle = "*" if s > end else " "
    lines.append(f"{s:8.1f} {e['dur']:7.1f} {idle} tid{e.get('tid')} {e['name']}")
    end = max(end, s + e["dur"])
  return lines


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--length", type=int, default=131072)
  ap.add_argument("--policy", default="2d_boundary")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--iters", type=int, default=40)
  ap.add_argument(
    "--rounds", type=int, default=0,
    help="then time the variants in turn: this many rounds (0: not)",
  )  # fmt: skip
  ap.add_argument("--round_iters", type=int, default=20, help="calls per variant and round")
  ap.add_argument(
    "--layout", default="576,16",
    help="FRAME,TEXT: the input's frames of FRAME vision tokens with TEXT text tokens before"
    " each (the benchmark's: 576,16; text-heavy, e.g. 64,448)",
  )  # fmt: skip
  args = ap.parse_args()
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
  try:
    frame, text = (int(x) for x in args.layout.split(","))
    if frame < 1 or text < 0:
      raise ValueError
  except ValueError:
    raise ValueError(f"--layout: want FRAME,TEXT (ints, FRAME >= 1), got {args.layout!r}") from None
  os.makedirs(args.out, exist_ok=True)
  t = args.length
  q, k, mod = pt.plan_inputs(t, frame_tokens=frame, text_between=text)
  text_share = float(jnp.mean(mod == 0))
  print(f"layout {frame},{text}: {text_share:.1%} text tokens", flush=True)
  cfg = bench_config.get_config("")
  copts = bench.plan_compiler_options(cfg, t, args.policy)
  hps = bench.heads_per_step(cfg, t, 28)
  print(f"compile options {copts}; heads per step {hps}", flush=True)
  ref, report = None, {"length": t, "policy": args.policy, "compiler_options": copts}
  report |= {"layout": [frame, text], "text_share": text_share}
  compiled = {}
  for name in names:
    jax.clear_caches()  # (a monkeypatch is not part of the plan's jit key)
    with VARIANTS[name]():
      pol = P.get(args.policy, block_q=cfg.block_q, block_k=cfg.block_k, heads_per_step=hps)
      vopts = (copts or {}) | COPT_VARIANTS.get(name, {})
      fn = jax.jit(lambda q, k, m, pol=pol: pol.plan(q, k, m), compiler_options=vopts or None)
      fn = fn.lower(q, k, mod).compile()  # (kept for --rounds, past the next clear_caches)
      compiled[name] = fn
      ms = bench.timeit(fn, q, k, mod, warmup=3, iters=args.iters)
      ms2 = bench.timeit(fn, q, k, mod, warmup=0, iters=args.iters)
      pipe = bench.pipelined_ms(fn, q, k, mod)
      disp = bench.dispatch_ms(fn, q, k, mod, iters=60)
      plan = fn(q, k, mod)
      same = True if ref is None else pt.same_plans(plan, ref)
      ref = plan if ref is None else ref
      events = pt.profile_events(fn, q, k, mod)
      counts = collections.Counter()
      _, total = pt.kernel_times(fn, counts=counts, events=events)
      try:
        tl = pt.timeline(events)
      except ValueError:  # (no device events: the CPU)
        tl = dict(busy_us=0.0, idle_between_us=0.0, window_us=0.0)
    n = sum(counts.values())
    print(
      f"{name:8s} wall {ms:.3f} / {ms2:.3f} ms  pipelined {pipe:.3f}  dispatch {disp:.3f}"
      f"  ops {total / 1e3:.3f}"
      f"  kernels {n}  busy {tl['busy_us'] / 1e3:.3f} idle {tl['idle_between_us'] / 1e3:.3f} window"
      f" {tl['window_us'] / 1e3:.3f}  same {same}",
      flush=True,
    )
    report[name] = dict(
      wall=ms, wall2=ms2, pipelined=pipe, dispatch=disp, ops=total / 1e3, kernels=n, same=same,
      busy=tl["busy_us"], idle=tl["idle_between_us"],
    )  # fmt: skip
    for g in tl.get("gaps", [])[:3]:
      print(f"   gap {g['gap_us']:6.0f} us at {g['at_us']:6.0f} us: {'; '.join(g['host'][:2])}")
    cb = collections.defaultdict(list)  # the profiled call's command-buffer host events
    for e in events:
      if e.get("ph") == "X" and e.get("name", "").startswith(("command_buffer", "cuGraph")):
        cb[e["name"].split(" ")[0]].append(e.get("dur", 0.0))
    print("   host: " + "; ".join(f"{k} x{len(v)} {sum(v):.0f} us" for k, v in sorted(cb.items())))
    with open(os.path.join(args.out, f"timeline_{name}.txt"), "w") as f:
      f.write("\n".join(kernel_timeline(events)) + "\n")
  if args.rounds:
    report["rounds"] = interleaved(compiled, (q, k, mod), args.rounds, args.round_iters)
  with open(os.path.join(args.out, "variants.json"), "w") as f:
    json.dump(report, f, indent=1)


def interleaved(compiled, args, rounds, iters):
  """The variants' walls timed in turn (`rounds` rounds of `iters` calls each, the order
  rotated every round), so that a drift of the machine in the run meets every variant
  alike: per variant the median of all its calls, and the median over rounds of its
  round's median minus the first variant's (the paired difference)."""
  names = list(compiled)
  times = {n: [] for n in names}
  per_round = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      jax.block_until_ready(compiled[n](*args))  # (one warm-up call)
      ts = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[n](*args))
        ts.append((time.perf_counter() - t0) * 1e3)
      times[n] += ts
      per_round[n].append(statistics.median(ts))
  out = {}
  print(f"interleaved: {rounds} rounds of {iters} calls (ms)", flush=True)
  for n in names:
    diffs = [a - b for a, b in zip(per_round[n], per_round[names[0]], strict=True)]
    out[n] = dict(
      median=statistics.median(times[n]),
      vs_first=statistics.median(diffs),
      round_medians=per_round[n],
    )
    print(
      f"  {n:10s} median {out[n]['median']:.3f}  vs {names[0]} {out[n]['vs_first']:+.3f}"
      f"  (rounds {min(per_round[n]):.3f} .. {max(per_round[n]):.3f})",
      flush=True,
    )
  return out


if __name__ == "__main__":
  main()
