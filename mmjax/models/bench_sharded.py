"""Sharded prefill benchmark: the Qwen2.5-VL decoder's sparse prefill on a mesh of devices
against one device, per length: time, and memory per device.

Each (length, mesh) item runs in a fresh process by default (`isolate`), so that a
device's peak memory belongs to that item alone and an out-of-memory item is recorded
as such instead of ending the run. What is timed is the decoder prefill from embeddings
(all layers, final norm, last-token logits), as in `mmjax.models.bench`; the vision tower
is not run (vision tokens get random embeddings).

Memory per device, two ways:
  compiled: XLA's plan for one device of the compiled prefill (`memory_analysis()`):
    arguments (params + inputs), outputs and temporaries. Available on every backend.
  peak: the device allocator's `peak_bytes_in_use` after the item (GPU only), the max
    over the mesh's devices; it includes the parameters' creation.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from mmjax import runinfo
from mmjax.plotting import pyplot

RESULT_TAG = "BENCH_SHARDED_RESULT "
STAGE_TAG = "stage "


def _items(cfg) -> list[tuple[int, dict]]:
  from mmjax.distributed import MeshShape  # noqa: PLC0415

  meshes = [dataclasses.asdict(MeshShape.parse(m)) for m in cfg.meshes]
  if not meshes:
    raise ValueError("bench_sharded: `meshes` is empty")
  return [(int(length), m) for length in cfg.lengths for m in meshes]


def _stage(t_start: float, what: str) -> None:
  """A progress line of a child (the parent's per-item log keeps it when a timeout hits)."""
  print(f"{STAGE_TAG}{time.perf_counter() - t_start:7.1f} s  {what}", flush=True)


def measure(cfg, length: int, mesh_dict: dict) -> dict:
  """One item in this process: builds the mesh, random params placed on it, the prompt,
  and times the jitted prefill. Returns the row."""
  t_start = time.perf_counter()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from mmjax import distributed, policies  # noqa: PLC0415
  from mmjax.bench import timeit  # noqa: PLC0415
  from mmjax.models.bench import MODELS, video_prompt  # noqa: PLC0415
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, init_params  # noqa: PLC0415

  if cfg.model not in MODELS:
    raise ValueError(f"model={cfg.model!r} is not one of {sorted(MODELS)}")
  mc = MODELS[cfg.model]()
  dtype = jnp.dtype(cfg.dtype)
  shape = distributed.MeshShape.parse(mesh_dict)
  shape.check(
    seq_len=length, num_heads=mc.text.num_heads, num_kv_heads=mc.text.num_kv_heads, batch=1
  )
  mesh = distributed.make_mesh(shape)
  _stage(t_start, f"jax {jax.__version__} started on {len(jax.devices())} device(s)")
  one = shape.size == 1
  pol = policies.get(
    cfg.policy,
    block_q=cfg.block_q,
    block_k=cfg.block_k,
    heads_per_step=cfg.heads_per_step,
    **dict(cfg.policy_kwargs),
  )
  model = Qwen2_5_VL(
    mc,
    policy=pol,
    backend=cfg.backend,
    dtype=dtype,
    param_dtype=dtype,
    mesh=None if one else mesh,
    mlp_chunk=cfg.mlp_chunk,
  )
  row = dict(length=length, mesh=mesh_dict, devices=shape.size, policy=cfg.policy)
  t0 = time.perf_counter()
  params = init_params(mc, seed=cfg.seed, dtype=dtype, mesh=None if one else mesh)
  jax.block_until_ready(params)
  _stage(t_start, "params made")
  ids, pos, mod, grid = video_prompt(mc, length, tuple(cfg.frame_hw), tuple(cfg.text), cfg.seed)
  row["frames"] = int(grid[0, 0])
  tokens = distributed.NamedSharding(mesh, distributed.TOKENS)
  bt = distributed.NamedSharding(mesh, distributed.BATCH_TOKENS)

  @functools.partial(jax.jit, out_shardings=tokens)
  def embeds(params, ids):
    x = model.apply(params, ids, method="embed")
    noise = jax.random.normal(jax.random.key(cfg.seed), x.shape, jnp.float32).astype(x.dtype)
    return jnp.where((ids == mc.video_token_id)[..., None], noise, x)

  x = embeds(params, jax.device_put(jnp.asarray(ids), bt))
  on = functools.partial(distributed.NamedSharding, mesh)
  posj = jax.device_put(jnp.asarray(pos), on(distributed.P(None, "data", "seq")))
  modj = jax.device_put(jnp.asarray(mod), on(distributed.P("data", None)))

  @jax.jit
  def prefill(params, x, pos, mod):
    logits, _ = model.apply(params, x, pos, mod, method="prefill_embeds")
    return logits

  _stage(t_start, "prompt and embeddings made")
  compiled = prefill.lower(params, x, posj, modj).compile()
  row["setup_s"] = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  if ma is not None:
    row["compiled_gb"] = {
      k: getattr(ma, f"{k}_size_in_bytes", 0) / 2**30
      for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    c = row["compiled_gb"]
    row["compiled_total_gb"] = c["argument"] + c["output"] + c["temp"] - c["alias"]
  mem = f" ({row['compiled_total_gb']:.2f} GB/device planned)" if "compiled_total_gb" in row else ""
  _stage(t_start, "prefill compiled" + mem)
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(params, x, posj, modj))
  row["first_call_s"] = time.perf_counter() - t0
  _stage(t_start, f"first call done ({row['first_call_s']:.1f} s)")
  row["ms"] = timeit(compiled, params, x, posj, modj, warmup=cfg.warmup, iters=cfg.iters)
  peaks = []
  for d in mesh.devices.flat:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"] / 2**30)
  if peaks:
    row["peak_gb_per_device"] = peaks
    row["peak_gb"] = max(peaks)
  row["device"] = jax.devices()[0].device_kind
  return row


def _child_env(cfg, size: int) -> dict:
  env = dict(os.environ)
  if cfg.platform == "gpu" and cfg.get("mem_fraction"):
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(cfg.mem_fraction)
  if cfg.get("xla_flags"):
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {cfg.xla_flags}".strip()
  if cfg.platform == "cpu":  # fake devices: one per mesh slot
    env["XLA_FLAGS"] = runinfo.xla_flags_with_device_count(env.get("XLA_FLAGS", ""), size)
    env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  return env


def _item_name(length: int, mesh_dict: dict) -> str:
  return f"T{length}_mesh{_mesh_str(mesh_dict)}"


def _run_isolated(cfg, length: int, mesh_dict: dict, timeout: float | None, logdir: str) -> dict:
  """Runs one item in a child process whose output streams to `logdir/<item>.log` (kept,
  so a timeout or crash still says how far the item got)."""
  payload = json.dumps(
    {"cfg": cfg.to_dict(), "length": length, "mesh": mesh_dict}, default=lambda o: o.to_dict()
  )
  size = int(np.prod(list(mesh_dict.values())))
  os.makedirs(logdir, exist_ok=True)
  log_path = os.path.join(logdir, _item_name(length, mesh_dict) + ".log")
  error = None
  with open(log_path, "w") as log:
    try:
      proc = subprocess.run(
        [sys.executable, "-m", "mmjax.models.bench_sharded", payload],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=_child_env(cfg, size),
        timeout=timeout,
        check=False,
      )
    except subprocess.TimeoutExpired:
      error = f"timeout after {timeout} s"
  with open(log_path) as log:
    lines = log.read().splitlines()
  for line in lines:
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG) :])
  if error is not None:
    stages = [ln[len(STAGE_TAG) :].strip() for ln in lines if ln.startswith(STAGE_TAG)]
    error += "; last stage: " + (stages[-1] if stages else "none (before jax started)")
  else:
    error = f"exit {proc.returncode}: " + " | ".join(t[:300] for t in lines[-3:])
  return dict(length=length, mesh=mesh_dict, devices=size, error=error)


def run(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Runs the benchmark of `cfg` (configs/bench_sharded.py)."""
  if cfg.platform not in ("cpu", "gpu"):
    raise ValueError(f"platform={cfg.platform!r}: use 'cpu' or 'gpu'")
  items = _items(cfg)
  rows: list[dict] = []
  for length, mesh_dict in tqdm(items, desc="items", disable=not progress):
    if cfg.isolate:
      logdir = os.path.join(workdir, "items") if workdir else tempfile.mkdtemp(prefix="bsh_")
      row = _run_isolated(cfg, length, mesh_dict, cfg.timeout_s or None, logdir)
    else:
      try:
        row = measure(cfg, length, mesh_dict)
      except Exception as e:  # noqa: BLE001  (record, go on)
        row = dict(length=length, mesh=mesh_dict, error=f"{type(e).__name__}: {str(e)[:300]}")
    if "error" in row:
      print(f"T={length} mesh={mesh_dict}: FAILED {row['error']}", flush=True)
    rows.append(row)
    _ratios(rows)
    if workdir:
      _write(workdir, rows, cfg, final=False)
  if workdir:
    _write(workdir, rows, cfg, final=True)
  return rows


def _ratios(rows):
  """Speedup and memory ratio of each row against the one-device row of its length."""
  base = {r["length"]: r for r in rows if r.get("devices") == 1 and "ms" in r}
  for r in rows:
    b = base.get(r["length"])
    if b is None or "ms" not in r:
      continue
    r["speedup_vs_one"] = b["ms"] / r["ms"]
    if "compiled_total_gb" in r and b.get("compiled_total_gb"):
      r["compiled_ratio_vs_one"] = r["compiled_total_gb"] / b["compiled_total_gb"]


def _write(workdir, rows, cfg, final):
  # the parent must not start a jax backend before its children ran (on a GPU it would
  # take most of a device's memory): the device name comes from the rows, and the
  # manifest (which lists the devices) is written at the end.
  import jax  # noqa: PLC0415  (the version only)

  from mmjax.ablation import config_to_dict  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  devices = sorted({r["device"] for r in rows if "device" in r})
  result = {
    "rows": rows,
    "model": cfg.model,
    "policy": cfg.policy,
    "backend": cfg.backend,
    "device": ", ".join(devices) or "?",
    "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "timed": "decoder prefill from embeddings: all layers + final norm + last-token logits",
    "complete": final,
  }
  with open(os.path.join(workdir, "bench.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(format_table(result) + "\n")
  if final:
    runinfo.write_run_files(workdir, config_to_dict(cfg), cfg.seed)
    plot(rows, os.path.join(workdir, "sharded.png"))


def _mesh_str(m: dict) -> str:
  return f"{m['data']}x{m['heads']}x{m['seq']}"


def format_table(result) -> str:
  lines = [
    f"{result['model']} sharded prefill ({result['policy']}, {result['backend']}) on "
    f"{result['device']}, jax {result['jax']}, {result['date']}; timed: {result['timed']}",
    "",
    "mesh = data x heads x seq. compiled GB: XLA's per-device plan (arguments + outputs + "
    "temporaries); peak GB: the allocator's peak, max over devices (GPU only).",
    "",
    "| T | mesh | devices | ms | speedup vs 1 device | compiled GB/device | "
    "temp GB/device | peak GB/device | first call (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    m = _mesh_str(r["mesh"])
    if "error" in r:
      lines.append(f"| {r['length']} | {m} | {r.get('devices', '')} | {r['error']} ||||||")
      continue
    sp = f"{r['speedup_vs_one']:.2f}x" if "speedup_vs_one" in r else "-"
    comp = f"{r['compiled_total_gb']:.2f}" if "compiled_total_gb" in r else "-"
    temp = f"{r['compiled_gb']['temp']:.2f}" if "compiled_gb" in r else "-"
    peak = f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
    lines.append(
      f"| {r['length']} | {m} | {r['devices']} | {r['ms']:.1f} | {sp} | {comp} | {temp} | "
      f"{peak} | {r['first_call_s']:.1f} |"
    )
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  plt = pyplot(path)
  if plt is None:
    return
  ok = [r for r in rows if "ms" in r]
  if not ok:
    return
  lengths = sorted({r["length"] for r in ok})
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for length in lengths:
    rs = [r for r in ok if r["length"] == length]
    labels = [_mesh_str(r["mesh"]) for r in rs]
    axes[0].plot(labels, [r["ms"] for r in rs], "o-", label=f"T={length}")
    axes[1].plot(
      labels, [r.get("compiled_total_gb", np.nan) for r in rs], "o-", label=f"T={length}"
    )
  axes[0].set_ylabel("prefill ms")
  axes[1].set_ylabel("GB per device (compiled plan)")
  for ax in axes:
    ax.set_xlabel("mesh (data x heads x seq)")
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _main(argv):
  """Child process: argv[1] is {"cfg", "length", "mesh"} JSON; prints the row."""
  import ml_collections  # noqa: PLC0415

  d = json.loads(argv[1])
  cfg = ml_collections.ConfigDict(d["cfg"])
  try:
    row = measure(cfg, d["length"], d["mesh"])
  except Exception as e:  # noqa: BLE001  (the parent records it)
    row = dict(
      length=d["length"],
      mesh=d["mesh"],
      devices=int(np.prod(list(d["mesh"].values()))),
      error=f"{type(e).__name__}: {str(e)[:300]}",
    )
  print(RESULT_TAG + json.dumps(row), flush=True)


if __name__ == "__main__":
  _main(sys.argv)
