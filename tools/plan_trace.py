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


def kernel_times(fn, *args, counts=None, names=None) -> tuple[dict[str, float], float]:
  """Device time (us) per HLO op of one profiled call of jitted `fn`, and the total;
  `counts` (a Counter), if given, gets the number of kernels each op launched, `names` (a
  dict) each op's kernel name."""
  jax.block_until_ready(fn(*args))
  d = tempfile.mkdtemp(prefix="plantrace_")
  with jax.profiler.trace(d, create_perfetto_trace=True):
    jax.block_until_ready(fn(*args))
  path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
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
}
SWITCH_FLAGS = tuple((name, SWITCH_HELP[name]) for name in planning.SWITCH_SETTINGS)


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
  ap.add_argument(
    "--by",
    default="line",
    choices=["line", "function", "kernel"],
    help="sum the kernel time by source line, by the planner's function, or by function"
    " with each Pallas kernel (mmjax_*) on its own",
  )
  ap.add_argument("--out", default="")
  ap.add_argument("--hlo_dir", default="", help="write each plan's compiled HLO text here")
  ap.add_argument("--planner", default="lists", choices=["lists", "dense"])
  ap.add_argument(
    "--check", action="store_true", help="also compare each plan with the other planner's"
  )
  for flag, what in IMPL_FLAGS:
    ap.add_argument(
      f"--{flag}",
      default="",
      choices=["", "pallas", "xla"],
      help=f"{what} (planning.{planning.SETTING_NAMES[flag + '_impl']}); default: the planner's",
    )
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
    "--pool_group",
    type=int,
    default=planning.POOL_GROUP,
    help="blocks per block_pool program for sampled means (planning.POOL_GROUP, 16; 1 or >= 16)",
  )
  ap.add_argument(
    "--split_rows",
    default="",
    choices=["", "0", "1"],
    help="1: the widest query modality's intervals only in a window of rows (planning."
    "SPLIT_ROWS); default: the planner's (on a GPU)",
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
  args = ap.parse_args()
  if args.score_tiles:
    planning.SCORE_TILES = tuple(int(x) for x in args.score_tiles.split(","))
  settings = {f"{flag}_impl": getattr(args, flag) or None for flag, _ in IMPL_FLAGS}
  settings["score_dtype"] = args.score_dtype or planning.SCORE_DTYPE
  settings["score_topk_max_k"] = args.score_topk_max_k
  settings["mass_p_dtype"] = args.mass_p_dtype
  settings["pool_group"] = args.pool_group
  settings["split_rows"] = bool(int(args.split_rows)) if args.split_rows else None
  settings |= {name: bool(getattr(args, name)) for name, _ in SWITCH_FLAGS}
  with planning.settings(**settings):
    trace(args)


def _option_value(text: str):
  """A compile option's value from its text: a bool, an int, or the string itself."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def trace(args):
  """The plans of `args.policies` traced (and checked) with the planner's settings now."""
  copts = dict(planning.PLAN_COMPILER_OPTIONS) if args.concurrent else None
  if args.compiler_options:
    pairs = [kv.split("=", 1) for kv in args.compiler_options.split(";") if kv]
    bad = [kv for kv in pairs if len(kv) != 2 or not kv[0]]
    if bad:
      raise ValueError(f"--compiler_options: 'name=value;name=value' expected, got {bad}")
    copts = (copts or {}) | {k: _option_value(v) for k, v in pairs}
  t, h = args.length, 128
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  q = jax.random.normal(keys[0], (1, t, args.heads, h), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, t, args.kv_heads, h), jnp.float32).astype(jnp.bfloat16)
  mod = bench.video_text_modality(t, 576, 16, 256)
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
    ms = bench.timeit(fn, q, k, mod, warmup=1, iters=3)
    compiled = fn.lower(q, k, mod).compile()
    hlo = compiled.as_text()
    temp = temp_gib(compiled)
    src = op_sources(hlo)
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(hlo)
    counts, names = collections.Counter(), {}
    times, total = kernel_times(fn, q, k, mod, counts=counts, names=names)
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
    report[name] = {
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
