"""Attention benchmark: sparse policies (plan + kernel) against dense attention, same run.

For each length and policy it times, with warm-up and `block_until_ready`, medians of
`iters` runs:
  baseline   dense causal attention (cuDNN on the GPU via jax.nn.dot_product_attention;
             XLA's on the CPU),
  dense_ours the `dense` plan through our backend,
  plan       the policy's plan alone,
  kernel     the backend on a precomputed plan,
  total      plan + backend in one jitted call,
and reports the speedup of `total` over the baseline, the density, and the effective
TFLOP/s of the kernel: 4 * computed (query, key) pairs * H / time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mmjax import planning, plotting, policies, runinfo
from mmjax.attention import pallas_kernel, sparse_attention


def video_text_modality(length: int, frame_tokens: int, text_between: int, prefix: int):
  """[1, T] ids: a text prefix, then frames (text_between text tokens + frame_tokens vision)
  until the last 5% of tokens, which are text (the question)."""
  mod = np.zeros(length, np.int32)
  end = int(length * 0.95)
  pos = prefix
  while pos < end:
    pos += text_between
    mod[pos : min(pos + frame_tokens, end)] = 1
    pos += frame_tokens
  return jnp.asarray(mod[None])


def timeit(fn, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median wall time in ms of fn(*args), synchronised with block_until_ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def pipelined_ms(fn, *args, calls: int = 20) -> float:
  """ms per call of `calls` calls of fn(*args) dispatched back to back, one wait at the end (the
  host's launch of a call overlaps the device's work on the one before), median of 5."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) * 1e3 / calls)
  return statistics.median(times)


def dispatch_ms(fn, *args, iters: int = 20) -> float:
  """Median ms until fn(*args) returns, the device idle before each call: the host's part
  of a call before it can overlap the device (dispatch, XLA's command-buffer work, the
  graph's launch)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = fn(*args)
    times.append((time.perf_counter() - t0) * 1e3)
    jax.block_until_ready(out)
    del out
  return statistics.median(times)


def write_report(path: str, rows: list) -> None:
  """A tool's results as JSON at `path` (nothing if empty): the rows, the device, jax's
  version and the run's manifest (git commit, versions, command)."""
  if not path:
    return
  report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows)
  runinfo.write_atomic(path, json.dumps(report | dict(manifest=runinfo.manifest()), indent=2))


def dense_baseline(impl: str | None):
  @jax.jit
  def f(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  return f


def _causal_flops(t, n, h):
  return 4.0 * t * (t + 1) / 2 * n * h


@dataclasses.dataclass
class Row:
  length: int
  policy: str
  density: float
  baseline_ms: float
  plan_ms: float
  kernel_ms: float
  total_ms: float
  speedup: float
  kernel_tflops: float
  baseline_tflops: float
  dense_ours_ms: float | None = None
  kernel: str = ""  # the kernel that ran the plan: mosaic / triton (pallas), xla
  plan_share: float = 0.0  # plan_ms / (plan_ms + kernel_ms)
  plan_options: str = ""  # the plan programs' XLA compile options (plan_compiler_options)


def run(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Runs the benchmark described by `cfg` (see configs/bench_attention.py), with the
  planner settings of `cfg.planner` (those not "" or None)."""
  check_policies(cfg)
  chosen = {name: v for name, v in cfg.get("planner", {}).items() if v not in ("", None)}
  with planning.settings(**chosen):
    return _run(cfg, workdir, progress)


def _run(cfg, workdir, progress):
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.dtype(cfg.dtype)
  cudnn_ok = on_gpu and dtype in (jnp.bfloat16, jnp.float16)  # cuDNN takes no f32
  impl = cfg.baseline_impl or ("cudnn" if cudnn_ok else "xla")
  baseline = dense_baseline(impl)
  rows = []
  dense_kernel = None  # set where the dense plan is timed
  if workdir:  # each row as it is timed, so that a run cut short keeps its finished rows
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, "rows.jsonl"), "w").close()
  for length in cfg.lengths:
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    shape_q = (1, length, cfg.num_heads, cfg.head_dim)
    shape_k = (1, length, cfg.num_kv_heads, cfg.head_dim)
    q = jax.random.normal(keys[0], shape_q, jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], shape_k, jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], shape_k, jnp.float32).astype(dtype)
    mod = video_text_modality(length, cfg.frame_tokens, cfg.text_between, cfg.text_prefix)
    base_ms = timeit(baseline, q, k, v, warmup=cfg.warmup, iters=cfg.iters)
    flops = _causal_flops(length, cfg.num_heads, cfg.head_dim)
    dense_ours = None
    if length <= cfg.dense_ours_max_len:
      dplan = policies.Dense(block_q=cfg.block_q, block_k=cfg.block_k).plan(q, k, mod)
      dense_ours = timeit(
        _kernel_fn(cfg.backend, _options(cfg)), q, k, v, dplan, warmup=cfg.warmup, iters=cfg.iters
      )
      dense_kernel = cfg.backend
      if cfg.backend == "pallas":
        dense_kernel = pallas_kernel(q, dplan, interpret=not on_gpu, options=_options(cfg))
      del dplan
    it = tqdm(cfg.policies, desc=f"T={length}", disable=not progress)
    for name in it:
      try:
        rows.append(_bench_policy(cfg, name, q, k, v, mod, base_ms, flops, dense_ours))
      except Exception as e:  # noqa: BLE001  (an OOM at 1M tokens: record it, go on)
        print(f"T={length} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        rows.append(dict(length=length, policy=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
      if workdir:
        with open(os.path.join(workdir, "rows.jsonl"), "a") as f:
          f.write(json.dumps(rows[-1]) + "\n")
    del q, k, v
  result = {
    "rows": rows,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "baseline": f"jax.nn.dot_product_attention(is_causal=True, implementation={impl!r})",
    "dense_ours_kernel": dense_kernel,
    "planner_settings": planning.kernel_settings_dict(),
    "manifest": runinfo.manifest(cfg.seed),
  }
  if workdir:  # (made above)
    with open(os.path.join(workdir, "bench.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(format_table(result) + "\n")
    plot(rows, os.path.join(workdir, "speedup.png"))
    plot_plan_share(rows, os.path.join(workdir, "plan_share.png"))
  return rows


def check_policies(cfg) -> None:
  """Raises a ValueError, before anything is timed, for names in `cfg.policies` that
  `policies.get` does not know (a flag's tuple of unquoted names arrives as one string)
  and for the cycle-table mminference without other names to cycle; likewise for
  `plan_command_buffers_policies`."""
  if not cfg.policies:
    raise ValueError("bench: policies must be a non-empty tuple of names; got none")
  unknown = [n for n in cfg.policies if n not in policies.names()]
  if unknown:
    raise ValueError(
      f"bench: unknown policies {unknown}; known: {policies.names()} (in a flag, quote "
      "each name: --config.policies=\"('q_boundary','mminference')\")"
    )
  cycle = tuple(cfg.get("mminference_cycle", ()))
  bad = [n for n in cycle if n not in policies.names() or n == "mminference"]
  if bad:
    raise ValueError(
      f"bench: mminference_cycle names {bad}; give policy names other than mminference"
      f" ({[n for n in policies.names() if n != 'mminference']}), or () for the other"
      " names of `policies`"
    )
  cycled = not cfg.policy_kwargs.get("mminference", {})
  if (
    "mminference" in cfg.policies and cycled and not cycle and set(cfg.policies) == {"mminference"}
  ):
    raise ValueError(
      "bench: mminference without policy_kwargs cycles the other names of `policies` over "
      "its heads (cycle_table_policy), and there are none: add them, or give "
      "policy_kwargs.mminference.table_path"
    )
  command_buffer_policies(cfg)


def command_buffer_policies(cfg) -> tuple[str, ...]:
  """`cfg.plan_command_buffers_policies` as a tuple of known policy names; a ValueError
  names unknown ones."""
  which = tuple(cfg.get("plan_command_buffers_policies", ()))
  unknown = sorted(set(which) - set(policies.names()))
  if unknown:
    raise ValueError(
      f"bench: plan_command_buffers_policies names unknown policies {unknown}; known:"
      f" {policies.names()}"
    )
  return which


def heads_per_step(cfg, length: int, num_heads: int) -> int:
  """The planner's heads per step at this length: `cfg.plan_step_tokens // length` when
  that is set (> 0; 0 = all heads at once when they fit), else `cfg.heads_per_step`. Fewer,
  larger steps launch fewer small kernels; the bound keeps the planner's memory flat."""
  tokens = cfg.get("plan_step_tokens", 0)
  if tokens <= 0:
    return cfg.heads_per_step
  per = max(1, tokens // length)
  return 0 if per >= num_heads else per


def cycle_table_policy(cfg, num_heads: int, length: int = 0) -> policies.Policy:
  """`mminference` with a one-layer table whose head i runs the i-th (cyclically) of
  `cfg.mminference_cycle` (if not empty) or else of `cfg.policies` other than
  mminference, each with its `cfg.policy_kwargs` (default budgets): the per-head mix a
  searched table gives, without a model to search."""
  names = list(cfg.get("mminference_cycle", ())) or [n for n in cfg.policies if n != "mminference"]
  if not names:
    raise ValueError("bench: the mminference cycle table needs other names in `policies`")
  per = {
    n: policies.get(n, block_q=cfg.block_q, block_k=cfg.block_k, **dict(cfg.policy_kwargs[n]))
    for n in names
  }
  row = tuple(per[names[i % len(names)]] for i in range(num_heads))
  return policies.get(
    "mminference",
    table=(row,),
    block_q=cfg.block_q,
    block_k=cfg.block_k,
    heads_per_step=heads_per_step(cfg, length, num_heads) if length else cfg.heads_per_step,
  )


def _bench_policy(cfg, name, q, k, v, mod, base_ms, flops, dense_ours):
  kwargs = dict(cfg.policy_kwargs.get(name, {}))
  hps = heads_per_step(cfg, q.shape[1], q.shape[2])
  if name == "mminference" and not kwargs:
    pol = cycle_table_policy(cfg, q.shape[2], q.shape[1])
  else:
    pol = policies.get(name, block_q=cfg.block_q, block_k=cfg.block_k, heads_per_step=hps, **kwargs)
  copts = plan_compiler_options(cfg, q.shape[1], name)
  plan_fn = jax.jit(lambda q, k, m: pol.plan(q, k, m), compiler_options=copts)
  plan_iters = max(cfg.iters, cfg.get("plan_iters", 0))
  plan_ms = timeit(plan_fn, q, k, mod, warmup=cfg.warmup, iters=plan_iters)
  plan = plan_fn(q, k, mod)
  opts = _options(cfg)
  kernel_fn = _kernel_fn(cfg.backend, opts)
  kernel_ms = timeit(kernel_fn, q, k, v, plan, warmup=cfg.warmup, iters=cfg.iters)
  density = float(plan.density())
  kernel = cfg.backend
  if cfg.backend == "pallas":
    kernel = pallas_kernel(q, plan, interpret=jax.default_backend() == "cpu", options=opts)
  del plan
  total_fn = jax.jit(
    lambda q, k, v, m: sparse_attention(q, k, v, pol, m, backend=cfg.backend, pallas_options=opts),
    compiler_options=copts,
  )
  total_ms = timeit(total_fn, q, k, v, mod, warmup=cfg.warmup, iters=cfg.iters)
  return dataclasses.asdict(
    Row(
      length=q.shape[1],
      policy=name,
      density=density,
      baseline_ms=base_ms,
      plan_ms=plan_ms,
      kernel_ms=kernel_ms,
      total_ms=total_ms,
      speedup=base_ms / total_ms,
      kernel_tflops=flops * density / kernel_ms / 1e9,
      baseline_tflops=flops / base_ms / 1e9,
      dense_ours_ms=dense_ours,
      kernel=kernel,
      plan_share=plan_ms / (plan_ms + kernel_ms),
      plan_options=",".join(f"{k}={v}" for k, v in sorted((copts or {}).items())),
    )
  )


# XLA's option for a program without command buffers (each kernel launched on its own)
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def parse_compiler_options(text: str, what: str = "compiler options") -> dict:
  """XLA compile options from 'name=value;name=value' text: values as bools ("true" /
  "false"), ints, or the text itself; "" gives {}. A ValueError names a malformed pair."""
  pairs = [kv.split("=", 1) for kv in text.split(";") if kv]
  bad = [kv for kv in pairs if len(kv) != 2 or not kv[0]]
  if bad:
    raise ValueError(f"{what}: 'name=value;name=value' expected, got {bad}")
  return {k: _option_value(v) for k, v in pairs}


def _option_value(text: str):
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def plan_compiler_options(cfg, length: int, policy: str = "") -> dict | None:
  """The XLA compile options of the programs that build a plan (plan alone, plan +
  kernel): `planning.PLAN_COMPILER_OPTIONS` up to `cfg.concurrent_plan_max_len` tokens
  (their temp memory grows with the length); from `cfg.plan_no_command_buffers_from`
  tokens on (if > 0) no command buffers (`NO_COMMAND_BUFFERS`); else None (XLA's
  defaults). With concurrent scheduling, `cfg.plan_command_buffers` (if not "") sets the
  command-buffer types of `policy`'s plans if `cfg.plan_command_buffers_policies` names
  it or is empty (a list such as "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,
  WHILE"), and those plans also get `cfg.plan_command_buffer_options` ("name=value;...")."""
  off_from = cfg.get("plan_no_command_buffers_from", 0)
  if off_from > 0 and length >= off_from:
    if length <= cfg.concurrent_plan_max_len:
      raise ValueError(
        f"bench: length {length} is both <= concurrent_plan_max_len "
        f"({cfg.concurrent_plan_max_len}: concurrent command buffers) and >= "
        f"plan_no_command_buffers_from ({off_from}: none); make the ranges disjoint"
      )
    return dict(NO_COMMAND_BUFFERS)
  if length <= cfg.concurrent_plan_max_len:
    opts = dict(planning.PLAN_COMPILER_OPTIONS)
    which = command_buffer_policies(cfg)
    if cfg.get("plan_command_buffers", "") and (not which or policy in which):
      opts["xla_gpu_enable_command_buffer"] = cfg.plan_command_buffers
      extra = cfg.get("plan_command_buffer_options", "")
      opts |= parse_compiler_options(extra, "bench: plan_command_buffer_options")
    return opts
  return None


def _options(cfg):
  return {"kernel": cfg.pallas_kernel} if cfg.backend == "pallas" else None


def _kernel_fn(backend, options=None):
  @jax.jit
  def f(q, k, v, plan):
    return sparse_attention(q, k, v, plan=plan, backend=backend, pallas_options=options)

  return f


def format_table(result) -> str:
  lines = [
    f"device: {result['device']}, jax {result['jax']}, {result['date']}; "
    f"baseline: {result['baseline']}"
    + (
      f"; ours dense: the {result['dense_ours_kernel']} kernel on the dense plan"
      if result.get("dense_ours_kernel")
      else ""
    ),
    "",
    "| T | policy | density | baseline ms | ours dense ms | plan ms | kernel ms | "
    "plan+kernel ms | plan % | speedup | kernel TFLOP/s (eff.) | baseline TFLOP/s | kernel |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    if "error" in r:
      lines.append(f"| {r['length']} | {r['policy']} | failed: {r['error'][:80]} |" + " |" * 10)
      continue
    dense = f"{r['dense_ours_ms']:.2f}" if r["dense_ours_ms"] is not None else "-"
    lines.append(
      f"| {r['length']} | {r['policy']} | {r['density']:.3f} | {r['baseline_ms']:.2f} | "
      f"{dense} | {r['plan_ms']:.2f} | {r['kernel_ms']:.2f} | {r['total_ms']:.2f} | "
      f"{100 * r.get('plan_share', r['plan_ms'] / (r['plan_ms'] + r['kernel_ms'])):.1f} | "
      f"{r['speedup']:.2f}x | {r['kernel_tflops']:.0f} | {r['baseline_tflops']:.0f} | "
      f"{r.get('kernel', '')} |"
    )
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  """The speedup over the dense baseline (plan + kernel) vs length per policy."""
  _plot_by_policy(
    rows, path, lambda r: r["speedup"], "speedup over dense baseline (plan + kernel)", 1.0
  )


def plot_plan_share(rows, path: str, target: float = 0.10) -> None:
  """Plan building's share of plan + kernel (%) vs length per policy, with issue 3's target
  (at most `target` at 128k and beyond) as a dashed line."""
  _plot_by_policy(
    rows,
    path,
    lambda r: 100 * r["plan_ms"] / (r["plan_ms"] + r["kernel_ms"]),
    "plan building, % of plan + kernel",
    100 * target,
    dashed=True,
  )


def _plot_by_policy(rows, path, value, ylabel, hline, dashed=False):
  plt = plotting.pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name in sorted({r["policy"] for r in rows}):
    pts = sorted((r["length"], value(r)) for r in rows if r["policy"] == name and "error" not in r)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.axhline(hline, color="gray", lw=0.8, ls="--" if dashed else "-")
  ax.set_xlabel("tokens")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
