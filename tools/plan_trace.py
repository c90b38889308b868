"""Where a policy's plan spends its device time: one profiled call per policy, its kernels'
time summed by the source line (jax's op metadata) of the HLO op that launched them.

  python tools/plan_trace.py --length 1048576 --policies vertical_slash,2d_boundary

Prints, per policy, the plan's wall time and the top source lines by kernel time, and
writes them to --out (JSON) if given. GPU or CPU (on the CPU the "kernels" are thunks).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import bench_attention as bench_config
from mmjax import bench, planning
from mmjax import policies as P

_META = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_TABLE = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')


def _tables(hlo_text: str) -> dict[str, dict[int, object]]:
  """The module's FileNames / FunctionNames / FileLocations / StackFrames tables."""
  tables, cur = {}, None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      cur = tables.setdefault(line, {})
      continue
    m = _TABLE.match(line)
    if cur is None or not m:
      cur = None if not line.strip() or not m else cur
      continue
    if m.group(2) is not None:
      cur[int(m.group(1))] = m.group(2)
    else:
      cur[int(m.group(1))] = dict(kv.split("=") for kv in m.group(3).split())
  return tables


def op_sources(hlo_text: str, package: str = "mmjax") -> dict[str, str]:
  """HLO instruction name -> "file:line function" of the innermost stack frame in a file
  under `package` (the planner's own line, not jax's), from the ops' metadata."""
  t = _tables(hlo_text)
  files, funcs = t.get("FileNames", {}), t.get("FunctionNames", {})
  locs, frames = t.get("FileLocations", {}), t.get("StackFrames", {})

  def where(frame_id):
    first, seen = None, set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locs[int(frames[frame_id]["file_location_id"])]
      fname = files[int(loc["file_name_id"])]
      text = f"{os.path.basename(fname)}:{loc['line']} {funcs[int(loc['function_name_id'])]}"
      first = first or text
      if f"/{package}/" in fname:
        return text
      frame_id = int(frames[frame_id]["parent_frame_id"])
    return first or "?"

  out = {}
  for line in hlo_text.splitlines():
    m = _META.match(line)
    if not m:
      continue
    meta = m.group(2)
    sf = re.search(r"stack_frame_id=(\d+)", meta)
    name = re.search(r'op_name="([^"]*)"', meta)
    tail = name.group(1).split("/")[-1] if name else "?"
    out[m.group(1)] = (where(int(sf.group(1))) if sf else m.group(1)) + f" [{tail}]"
  return out


def profile_events(fn, *args) -> list[dict]:
  """The trace events (perfetto JSON) of one profiled call of jitted `fn`, after a warm-up."""
  jax.block_until_ready(fn(*args))
  d = tempfile.mkdtemp(prefix="plantrace_")
  with jax.profiler.trace(d, create_perfetto_trace=True):
    jax.block_until_ready(fn(*args))
  path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def kernel_times(fn, *args, counts=None, names=None, events=None):
  """Device time (us) per HLO op of one profiled call of jitted `fn` (or of `events`, its
  trace), and the total; `counts` (a Counter), if given, gets the number of kernels each
  op launched, `names` (a dict) each op's kernel name."""
  if events is None:
    events = profile_events(fn, *args)
  times = collections.Counter()
  for e in events:
    a = e.get("args") or {}
    if e.get("ph") == "X" and "hlo_op" in a and not e["name"].startswith("end:"):
      times[a["hlo_op"]] += float(e.get("dur", 0.0))
      if counts is not None:
        counts[a["hlo_op"]] += 1
      if names is not None:
        names[a["hlo_op"]] = e["name"]
  return dict(times), sum(times.values())


def _union(intervals):
  """Sorted, merged [start, end) intervals."""
  out = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def timeline(events, gaps: int = 8, min_gap_us: float = 5.0) -> dict:
  """Where one profiled call's wall time goes, from its trace `events`: the call's window
  (from the jitted function's dispatch on the host to the end of its last device event),
  the device's busy time (the union of its kernels and copies), its idle time before the
  first kernel and between kernels, the longest idle gaps (the first one included), each
  with the host events running through it (the shortest first: the thunk the host was in
  while the device waited), and the host events that start before the first kernel.
  Times in us. Needs the device's events (a GPU trace)."""
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
  dev = {p for p, n in procs.items() if n.startswith("/device:")}
  spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
  dev_ev = [e for e in spans if e["pid"] in dev and not e["name"].startswith("end:")]
  host_ev = [e for e in spans if e["pid"] not in dev]
  if not dev_ev:
    raise ValueError("timeline: the trace has no device events (a GPU trace is needed)")
  calls = [e for e in host_ev if e["name"].startswith("PjitFunction")]
  start = min(e["ts"] for e in calls) if calls else min(e["ts"] for e in dev_ev)
  busy = _union((e["ts"], e["ts"] + e["dur"]) for e in dev_ev if e["ts"] >= start)
  end = busy[-1][1]
  idle = [(start, busy[0][0])] + [(a[1], b[0]) for a, b in zip(busy[:-1], busy[1:], strict=True)]
  long_gaps = sorted((g for g in idle if g[1] - g[0] >= min_gap_us), key=lambda g: g[0] - g[1])
  rows = []
  for a, b in long_gaps[:gaps]:
    inside = [
      e for e in host_ev if e["ts"] < b and e["ts"] + e["dur"] > a and e["dur"] < (end - start)
    ]
    inside.sort(key=lambda e: e["dur"])
    rows.append(
      {
        "at_us": a - start,
        "gap_us": b - a,
        "host": [f"{e['name'][:70]} ({e['dur']:.0f} us)" for e in inside[:4]],
      }
    )
  busy_us = sum(b - a for a, b in busy)
  # what the host ran before the device's first kernel (the call's start-up), in order
  startup = sorted(
    (e for e in host_ev if start <= e["ts"] < busy[0][0] and e["dur"] >= min_gap_us),
    key=lambda e: e["ts"],
  )
  return {
    "startup": [
      f"{e['ts'] - start:7.0f} +{e['dur']:6.0f} us  {e['name'][:80]}" for e in startup[:40]
    ],
    "window_us": end - start,
    "busy_us": busy_us,
    "first_kernel_us": busy[0][0] - start,
    "idle_between_us": sum(b - a for a, b in idle[1:]),
    "idle_gaps": len([g for g in idle[1:] if g[1] - g[0] >= min_gap_us]),
    "dispatch_us": max((e["dur"] for e in calls), default=0.0),
    "gaps": rows,
  }


def print_timeline(t: dict) -> None:
  print(
    f"  timeline: {t['window_us'] / 1e3:.2f} ms from dispatch to the last kernel;"
    f" device busy {t['busy_us'] / 1e3:.2f} ms; first kernel after {t['first_kernel_us']:.0f}"
    f" us (dispatch {t['dispatch_us']:.0f} us); idle between kernels"
    f" {t['idle_between_us'] / 1e3:.2f} ms ({t['idle_gaps']} gaps >= 5 us)"
  )
  for g in t["gaps"]:
    print(f"    gap {g['gap_us']:7.0f} us at {g['at_us']:7.0f} us: " + "; ".join(g["host"]))
  print("    host events before the first kernel (start, duration):")
  for line in t["startup"]:
    print("      " + line)


def top_kernels(fn, *args, n=5) -> list[tuple[str, float]]:
  """The n costliest HLO ops (us) of one profiled call of jitted `fn`."""
  times, _ = kernel_times(fn, *args)
  return sorted(times.items(), key=lambda kv: -kv[1])[:n]


def temp_gib(compiled) -> float:
  """A compiled program's temporary buffers (XLA's memory plan), GiB; -1 if unknown."""
  temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
  return -1.0 if temp is None else temp / 2**30


def same_plans(a, b) -> bool:
  """Whether two plans are equal (block lists compared up to their counts: the slots
  past a count are unspecified)."""
  if not bool(jnp.array_equal(a.block_count, b.block_count)):
    return False
  used = jnp.arange(a.block_idx.shape[-1]) < a.block_count[..., None]
  if not bool(jnp.array_equal(jnp.where(used, a.block_idx, -1), jnp.where(used, b.block_idx, -1))):
    return False
  rest = [(a.col_idx, b.col_idx), (a.col_count, b.col_count), (a.q_perm, b.q_perm)]
  rest += [(a.k_perm, b.k_perm)] + [(a.aux[key], b.aux[key]) for key in a.aux]
  return all(
    (x is None and y is None) or (x is not None and y is not None and bool(jnp.array_equal(x, y)))
    for x, y in rest
  )


# the planner's implementation settings given as flags: (flag, what it chooses); flag
# "x" sets planning.settings(x_impl=...)
IMPL_FLAGS = (
  ("topk", "the planner's per-row top-k"),
  ("score", "the pooled scores"),
  ("score_topk", "the pooled-score picks in one kernel or scores + top-k"),
)
# the planner's on/off settings (planning.SWITCH_SETTINGS) given as 0/1 flags: what 1
# turns on
SWITCH_HELP = {
  "mass_heads_inner": "the last-query estimates with the heads innermost",
  "pool_heads_inner": "the pooled means with the heads innermost",
  "score_topk_sort": "pooled_topk sorts grid views' blocks by their limits",
  "mass_tile_stats": "the last-query estimates by attn_mass's two passes",
}
SWITCH_FLAGS = tuple((name, SWITCH_HELP[name]) for name in planning.SWITCH_SETTINGS)
# on / off settings whose default depends on the backend: 0 / 1 flags, "" for the default
DEFAULT_FLAGS = (
  ("split_rows", "the widest query modality's intervals only in a window of rows (on a GPU)"),
  (
    "skip_empty_topk",
    "each scored component's top-k in a lax.cond that skips it when empty (off on a GPU)",
  ),
)


def _add_unset_flags(ap, table, choices, setting, describe):
  """A flag per (name, what) of `table`, one of `choices` or "" (the planner's own default);
  setting(name): its key in planning.SETTING_NAMES; describe(what): the help's start."""
  for name, what in table:
    ap.add_argument(
      f"--{name}",
      default="",
      choices=["", *choices],
      help=f"{describe(what)} (planning.{planning.SETTING_NAMES[setting(name)]}); default: the"
      " planner's",
    )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--length", type=int, default=131072)
  ap.add_argument("--heads", type=int, default=28)
  ap.add_argument("--kv_heads", type=int, default=4)
  ap.add_argument(
    "--policies",
    default="a_shape,vertical_slash,block_sparse,grid,q_boundary,2d_boundary,mminference",
  )
  ap.add_argument(
    "--heads_per_step", type=int, default=-1, help="-1: the attention benchmark's choice"
  )
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--iters", type=int, default=3, help="timed calls of each plan (median)")
  ap.add_argument(
    "--by",
    default="line",
    choices=["line", "function", "kernel"],
    help="sum the kernel time by source line, by the planner's function, or by function"
    " with each Pallas kernel (mmjax_*) on its own",
  )
  ap.add_argument("--out", default="")
  ap.add_argument(
    "--timeline",
    action="store_true",
    help="also where the profiled call's wall time goes: device busy and idle, the longest"
    " idle gaps and the host events in them (GPU)",
  )
  ap.add_argument("--hlo_dir", default="", help="write each plan's compiled HLO text here")
  ap.add_argument("--planner", default="lists", choices=["lists", "dense"])
  ap.add_argument(
    "--check", action="store_true", help="also compare each plan with the other planner's"
  )
  _add_unset_flags(ap, IMPL_FLAGS, ("pallas", "xla"), lambda n: n + "_impl", lambda w: w)
  for name, what in SWITCH_FLAGS:
    setting = planning.SETTING_NAMES[name]
    ap.add_argument(
      f"--{name}",
      type=int,
      default=int(getattr(planning, setting)),
      help=f"1: {what} (planning.{setting})",
    )
  ap.add_argument(
    "--mass_p_dtype",
    default=planning.MASS_P_DTYPE,
    choices=["float32", "float16"],
    help="how the last-query estimates store p between passes (planning.MASS_P_DTYPE)",
  )
  ap.add_argument(
    "--concurrent",
    type=int,
    default=0,
    help="1: compile the plans with planning.PLAN_COMPILER_OPTIONS (concurrent scheduling)",
  )
  ap.add_argument(
    "--compiler_options",
    default="",
    help="more XLA compile options for the plans, 'name=value;name=value' (e.g."
    " 'xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE')",
  )
  ap.add_argument(
    "--score_topk_max_k",
    type=int,
    default=planning.SCORE_TOPK_MAX_K,
    help="pooled_topk (--score_topk pallas) only for top k <= this (0: every k)",
  )
  ap.add_argument(
    "--mass_range_div",
    type=int,
    default=planning.MASS_RANGE_DIV,
    help="an estimate over one modality group launches L / 128 / this programs per head"
    " (planning.MASS_RANGE_DIV)",
  )
  ap.add_argument(
    "--pool_group",
    type=int,
    default=planning.POOL_GROUP,
    help="blocks per block_pool program for sampled means (planning.POOL_GROUP, 16; 1 or >= 16)",
  )
  ap.add_argument(
    "--score_dtype",
    default="",
    choices=["", *planning.SCORE_DTYPES],
    help="the pooled means' dtype in the score dot (planning.SCORE_DTYPE); default: the planner's",
  )
  ap.add_argument(
    "--score_tiles",
    default="",
    help="the pooled_scores / pooled_topk tile 'block_m,block_n,warps' (planning.SCORE_TILES)",
  )
  _add_unset_flags(ap, DEFAULT_FLAGS, ("0", "1"), lambda n: n, lambda w: f"1: {w}, 0: not")
  args = ap.parse_args()
  if args.score_tiles:
    planning.SCORE_TILES = tuple(int(x) for x in args.score_tiles.split(","))
  settings = {f"{flag}_impl": getattr(args, flag) or None for flag, _ in IMPL_FLAGS}
  settings["score_dtype"] = args.score_dtype or planning.SCORE_DTYPE
  settings["score_topk_max_k"] = args.score_topk_max_k
  settings["mass_p_dtype"] = args.mass_p_dtype
  settings["pool_group"] = args.pool_group
  settings["mass_range_div"] = args.mass_range_div
  settings |= {
    n: bool(int(getattr(args, n))) if getattr(args, n) else None for n, _ in DEFAULT_FLAGS
  }
  settings |= {name: bool(getattr(args, name)) for name, _ in SWITCH_FLAGS}
  with planning.settings(**settings):
    trace(args)


def plan_inputs(length, heads=28, kv_heads=4, frame_tokens=576, text_between=16):
  """(q [1, T, N, 128], k [1, T, K, 128] bf16 random, modality ids [1, T]): the
  benchmark's shapes and video + text layout (`bench.video_text_modality`: frames of
  frame_tokens vision tokens, text_between text tokens before each), the plans' inputs in
  the plan tools."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  q = jax.random.normal(keys[0], (1, length, heads, 128), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, length, kv_heads, 128), jnp.float32).astype(jnp.bfloat16)
  return q, k, bench.video_text_modality(length, frame_tokens, text_between, 256)


def trace(args):
  """The plans of `args.policies` traced (and checked) with the planner's settings now."""
  copts = dict(planning.PLAN_COMPILER_OPTIONS) if args.concurrent else None
  if args.compiler_options:
    copts = (copts or {}) | bench.parse_compiler_options(
      args.compiler_options, "--compiler_options"
    )
  t = args.length
  q, k, mod = plan_inputs(t, args.heads, args.kv_heads)
  report = {"length": t, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  report["topk"] = planning.topk_impl()
  report["kernel_settings"] = planning.kernel_settings_dict()
  cfg = bench_config.get_config("")
  hps = args.heads_per_step
  hps = bench.heads_per_step(cfg, t, args.heads) if hps < 0 else hps
  report["heads_per_step"] = hps
  report["compiler_options"] = copts
  for name in args.policies.split(","):
    if name == "mminference":  # as the attention benchmark runs it: one pattern per head
      cfg.heads_per_step, cfg.plan_step_tokens = hps, 0
      pol = bench.cycle_table_policy(cfg, args.heads)
    else:
      pol = P.get(name, block_q=128, block_k=64, heads_per_step=hps)
    fn = jax.jit(
      lambda q, k, m, pol=pol: pol.plan(q, k, m, planner=args.planner), compiler_options=copts
    )
    ms = bench.timeit(fn, q, k, mod, warmup=2, iters=args.iters)
    if args.timeline and "floor_ms" not in report:
      # the wall of a jitted call on the same inputs that launches almost nothing
      floor = jax.jit(lambda q, k, m: q[0, 0, 0, 0] + k[0, 0, 0, 0] + m[0, 0])
      report["floor_ms"] = bench.timeit(floor, q, k, mod, warmup=2, iters=20)
      print(f"dispatch floor (a jitted call of one fused kernel): {report['floor_ms']:.3f} ms")
    compiled = fn.lower(q, k, mod).compile()
    hlo = compiled.as_text()
    temp = temp_gib(compiled)
    src = op_sources(hlo)
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(hlo)
    counts, names = collections.Counter(), {}
    events = profile_events(fn, q, k, mod)
    times, total = kernel_times(fn, counts=counts, names=names, events=events)
    by_src, n_by_src = collections.Counter(), collections.Counter()
    for op, us in times.items():
      where = src.get(op, op)
      pallas = re.search(r"mmjax_\w+", names.get(op, ""))
      if args.by == "kernel" and pallas:
        where = pallas.group(0)
      elif args.by in ("function", "kernel"):  # "file:line func [op]" -> "file func"
        where = re.sub(r":\d+ ", " ", where).split(" [")[0]
      by_src[where] += us
      n_by_src[where] += counts[op]
    top = by_src.most_common(args.top)
    n_kernels = sum(counts.values())
    print(
      f"\n{name}: plan {ms:.2f} ms wall, {total / 1e3:.2f} ms in ops, {n_kernels} kernels,"
      f" {temp:.2f} GiB temp",
      flush=True,
    )
    for where, us in top:
      share = 100 * us / max(total, 1e-9)
      print(f"  {us / 1e3:9.2f} ms {share:5.1f}% {n_by_src[where]:5d}x  {where}")
    n_cond = len(re.findall(r"= [^=]*? conditional\(", hlo))
    n_while = len(re.findall(r"= [^=]*? while\(", hlo))
    # (command buffers are made after the HLO, from its thunks: this text never names them)
    print(f"  HLO: {n_cond} conditionals, {n_while} while loops")
    t = timeline(events) if args.timeline else None
    if t:
      print_timeline(t)
    report[name] = {
      "timeline": t,
      "wall_ms": ms,
      "conditionals": n_cond,
      "whiles": n_while,
      "ops_ms": total / 1e3,
      "kernels": n_kernels,
      "temp_gib": temp,
      "top": [[w, us / 1e3, n_by_src[w]] for w, us in top],
    }
    if args.check:
      other = "dense" if args.planner == "lists" else "lists"
      ref_fn = jax.jit(lambda q, k, m, pol=pol, o=other: pol.plan(q, k, m, planner=o))
      ref_temp = temp_gib(ref_fn.lower(q, k, mod).compile())
      print(f"  the {other} planner's temp: {ref_temp:.2f} GiB", flush=True)
      report[name][f"{other}_temp_gib"] = ref_temp
      ref = ref_fn(q, k, mod)
      report[name][f"same_as_{other}"] = same = same_plans(fn(q, k, mod), ref)
      del ref
      print(f"  plan identical to the {other} planner's: {same}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
