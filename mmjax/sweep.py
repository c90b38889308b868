"""Reproducible sweeps: a base config, a list of override items, one workdir per item.

A sweep config module (see configs/sweep_budget.py) defines `get_config(arg)`, the base
config, whose key `runner` names what runs each item (a key of `RUNNERS`), and
`sweep(arg)`, a list of items: flat dicts of dotted overrides such as
`{"policies": ("a_shape",), "policy_kwargs.a_shape.local_tokens": 512, "seed": 1}`.

`run` gives every item its own directory `<workdir>/items/<name>` holding `config.json`,
`manifest.json`, the runner's files and, written atomically last, `DONE`. A sweep started
again skips the items with `DONE` and clears and re-runs the others, so a killed sweep
loses nothing and each item is run exactly once in the final state. When every item is
done, `summary.csv` and `summary.md` hold one row per (item, metrics row): the item's
name, its override values and the runner's deterministic metric columns (no timings), so
the same config and seeds give byte-identical summaries.

Spreading items over devices or hosts: `shard_index` / `num_shards` take every n-th item
(names are computed from the whole sweep, so shards agree on them); any process that finds
every item done writes the summary. Shards share the workdir safely: every file more than
one process writes (sweep.json, the workdir's config.json / manifest.json, the summaries)
is written whole to a uniquely named temporary file and renamed into place, and the files
sweep.json and the summaries get are the same from every process; each item (and its DONE)
is written by its own shard only.

- One machine: `launch` starts `workers` processes of experiments/sweep.py, worker i with
  `--shard_index=i --num_shards=workers`, each pinned to its own `devices_per_worker`
  GPUs through CUDA_VISIBLE_DEVICES (the GPUs are counted with `nvidia-smi -L`, or taken
  from the launcher's CUDA_VISIBLE_DEVICES; the launcher itself never starts jax's
  backend); on the CPU the workers are not pinned. Logs go to
  `<workdir>/workers/worker_<i>.log`; the launcher waits for all, raises `WorkerError`
  naming the failed ones, and writes the summary.
- Several hosts: every host runs experiments/sweep.py with `--shard_by_process` on a
  workdir they all share: `distributed_shard` calls `jax.distributed.initialize`
  (coordinator address, number of processes, this process's id; or, left out, jax's
  auto-detection on SLURM, Open MPI, TPU pods, ...) and takes shard `jax.process_index()`
  of `jax.process_count()` (`process_shard`). Or give host h `--shard_index=h
  --num_shards=H` and `--workers`: its workers split that shard further (`plan_workers`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from tqdm import tqdm

from mmjax import ablation, policies, runinfo

DONE = "DONE"
SWEEP_FILE = "sweep.json"
ITEMS_DIR = "items"
MAX_NAME = 96  # longer names end in a hash of the overrides
WORKERS_DIR = "workers"  # the local workers' logs
PLATFORMS = ("cpu", "gpu")


# ----------------------------------------------------------------------------------------
# runners
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Runner:
  """What runs one item and how its deterministic metric rows are read back.

  Attributes:
    run: `run(cfg, workdir)` runs one item's config and writes its files into workdir.
    read_rows: `read_rows(workdir)` -> list of metric rows (dicts) from those files; the
      values must be the same across reruns with the same config and seed (no timings).
    columns: the metric columns of the summary, in order (each row must have them).
  """

  run: Callable[[ml_collections.ConfigDict, str], object]
  read_rows: Callable[[str], list[dict]]
  columns: tuple[str, ...]


ABLATE_COLUMNS = ("policy", "seq_len", "density", "recall", "min_head_recall", "rel_error")


def _run_ablate(cfg, workdir: str) -> None:
  ablation.run(cfg, workdir, progress=False)


def _read_ablate(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"ablate runner: {path} does not exist")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# Others register theirs here ("bench_attention", "search", ...).
RUNNERS: dict[str, Runner] = {
  "ablate": Runner(run=_run_ablate, read_rows=_read_ablate, columns=ABLATE_COLUMNS),
}


def get_runner(name: str, runners: dict[str, Runner] | None = None) -> Runner:
  """The runner registered as `name`.

  Args:
    name: a key of `runners`.
    runners: the registry (default `RUNNERS`).

  Returns:
    The Runner.
  """
  runners = RUNNERS if runners is None else runners
  if name not in runners:
    raise ValueError(f"config.runner: unknown runner {name!r}; known: {sorted(runners)}")
  return runners[name]


# ----------------------------------------------------------------------------------------
# building items
# ----------------------------------------------------------------------------------------
def product(**axes) -> list[dict]:
  """The cartesian product of axes, first axis slowest, in the order the axes are given.

  An axis is a list of values (its name is then the dotted key they override; pass dotted
  names as `**{"layout.frames": [8, 16]}`) or a list of dicts of overrides zipped together
  (its name is then only a label), e.g.
  `product(budget=[{"policy_kwargs.grid.top_k_blocks": 4}, ...], seed=[0, 1])`.

  Args:
    **axes: axis name -> non-empty list of values, or of override dicts.

  Returns:
    A list of items (flat dicts of dotted overrides).
  """
  if not axes:
    raise ValueError("product: give at least one axis")
  expanded = []
  for name, values in axes.items():
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
      raise ValueError(f"product: axis {name!r} must be a list of values, got {values!r}")
    if not values:
      raise ValueError(f"product: axis {name!r} is empty")
    dicts = [isinstance(v, dict) for v in values]
    if any(dicts) and not all(dicts):
      raise ValueError(f"product: axis {name!r} mixes override dicts and plain values")
    expanded.append([dict(v) for v in values] if all(dicts) else [{name: v} for v in values])
  items = []
  for combo in itertools.product(*expanded):
    item = {}
    for part in combo:
      clash = sorted(set(item) & set(part))
      if clash:
        raise ValueError(f"product: key(s) {clash} are set by more than one axis")
      item.update(part)
    items.append(item)
  return items


def add_policy_defaults(cfg: ml_collections.ConfigDict, name: str, *fields: str) -> None:
  """Declares `cfg.policy_kwargs.<name>.<field>` at the policy's default values.

  Overrides may only set keys the base config has (as with `lock_config`): a sweep config
  declares the policy options it sweeps with this.

  Args:
    cfg: an unlocked config with a `policy_kwargs` ConfigDict.
    name: a policy name (`mmjax.policies.names()`).
    *fields: dataclass fields of that policy.
  """
  pol = policies.get(name)
  known = {f.name for f in dataclasses.fields(pol)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"policy {name!r} has no option(s) {unknown}; options: {sorted(known)}")
  if name not in cfg.policy_kwargs:
    cfg.policy_kwargs[name] = ml_collections.ConfigDict({})
  for field in fields:
    if field not in cfg.policy_kwargs[name]:
      cfg.policy_kwargs[name][field] = getattr(pol, field)


def _check_value(key: str, value) -> None:
  if value is None or isinstance(value, (bool, int, float, str)):
    return
  if isinstance(value, (tuple, list)):
    for v in value:
      _check_value(key, v)
    return
  raise ValueError(
    f"override {key!r}: value {value!r} must be None, bool, int, float, str or a tuple of them"
  )


def check_items(items) -> list[dict]:
  """Checks a sweep's items: a non-empty list of flat dicts of dotted keys, no duplicates.

  Args:
    items: what a config's `sweep(arg)` returned.

  Returns:
    The items as a list of dicts.
  """
  if isinstance(items, dict) or not isinstance(items, Sequence) or not items:
    raise ValueError(f"sweep items must be a non-empty list of dicts, got {items!r}")
  seen = {}
  out = []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise ValueError(f"sweep item {i} must be a dict of dotted overrides, got {item!r}")
    for key, value in item.items():
      if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise ValueError(f"sweep item {i}: bad override key {key!r}")
      if key == "runner":
        raise ValueError(f"sweep item {i}: items may not override 'runner'")
      _check_value(key, value)
    canon = _canonical(item)
    if canon in seen:
      raise ValueError(f"sweep items {seen[canon]} and {i} have the same overrides {item}")
    seen[canon] = i
    out.append(dict(item))
  return out


def _canonical(overrides: dict) -> str:
  return json.dumps(overrides, sort_keys=True, separators=(",", ":"))


def _plain(overrides: dict) -> dict:
  """The overrides as JSON gives them back (tuples as lists), in their order."""
  return json.loads(json.dumps(overrides))


def _hash(overrides: dict) -> str:
  return hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:10]


def format_value(value) -> str:
  """An override value as text: tuples joined by '+', None as 'none'."""
  if isinstance(value, (tuple, list)):
    return "+".join(format_value(v) for v in value)
  if value is None:
    return "none"
  if isinstance(value, bool):
    return str(value).lower()
  return str(value)


def short_keys(keys) -> dict[str, str]:
  """Each dotted key -> its shortest dotted suffix that no other key ends with.

  Args:
    keys: dotted keys.

  Returns:
    key -> short name (the whole key when no suffix is unique).
  """
  keys = list(dict.fromkeys(keys))
  parts = {k: k.split(".") for k in keys}
  out = {}
  for k in keys:
    for n in range(1, len(parts[k]) + 1):
      suffix = parts[k][-n:]
      if not any(o != k and parts[o][-n:] == suffix for o in keys):
        out[k] = ".".join(suffix)
        break
    else:
      out[k] = k
  return out


def _sanitize(text: str) -> str:
  safe = "".join(c if c.isascii() and (c.isalnum() or c in "._,=+-") else "_" for c in text)
  return safe if safe.strip(".") else "_" + safe


def _name(overrides: dict, short: dict[str, str]) -> str:
  if not overrides:
    return "base"
  name = _sanitize(",".join(f"{short[k]}={format_value(v)}" for k, v in overrides.items()))
  if len(name) > MAX_NAME:
    name = name[: MAX_NAME - 11] + "-" + _hash(overrides)
  return name


def item_names(items: list[dict]) -> list[str]:
  """Short, filesystem-safe, deterministic, unique directory names for the items.

  Keys are shortened to their last dotted parts (unique within the item); items whose
  names would clash use suffixes unique across the sweep, then a hash of the overrides;
  names longer than MAX_NAME end in that hash.

  Args:
    items: checked items (see `check_items`).

  Returns:
    One name per item, e.g. `local_tokens=512,frames=8,seed=1`.
  """
  names = [_name(item, short_keys(item)) for item in items]
  global_short = short_keys(k for item in items for k in item)
  for attempt in ("global", "hash", None):
    counts = {}
    for n in names:  # case-insensitive: some filesystems are
      counts[n.lower()] = counts.get(n.lower(), 0) + 1
    clashing = [i for i, n in enumerate(names) if counts[n.lower()] > 1]
    if not clashing:
      return names
    if attempt is None:
      break
    for i in clashing:
      names[i] = _name(items[i], global_short)
      if attempt == "hash":
        names[i] = names[i][: MAX_NAME - 11] + "-" + _hash(items[i])
  raise AssertionError(f"item names still clash: {names}")  # distinct overrides, distinct hashes


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A locked copy of `base` with dotted overrides applied.

  As with `lock_config`, every key must already exist in `base`, and values must fit the
  type of the value they replace (ints become floats, lists tuples).

  Args:
    base: the sweep's base config.
    overrides: dotted key -> value.

  Returns:
    The item's config (base is not modified).
  """
  cfg = copy.deepcopy(base)
  cfg.lock()
  for key, value in overrides.items():
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "the config"
        have = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(
          f"override {key!r}: {where} has no key {part!r} (overrides may only set keys the "
          f"base config has; keys there: {have})"
        )
      if i < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
      raise ValueError(f"override {key!r}: names a sub-config; override its leaves instead")
    if isinstance(value, bool) != isinstance(old, bool) and old is not None:
      raise ValueError(f"override {key!r}: {value!r} does not fit the base value {old!r}")
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"override {key!r}: {value!r} does not fit the base value {old!r}") from e
  return cfg


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------
def load_items(config_file: str) -> list[dict]:
  """The items of a sweep config module, from `path.py` or `path.py:arg`.

  Args:
    config_file: the `--config` value (its first ':' splits off the arg).

  Returns:
    The checked items of `sweep(arg)`.
  """
  path, _, arg = config_file.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"sweep config {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(
    "mmjax_sweep_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8], path
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"sweep config {path!r} defines no sweep(arg) function")
  return check_items(module.sweep(arg))


def shard(n_items: int, shard_index: int, num_shards: int) -> list[int]:
  """The item indices one shard runs: every num_shards-th, starting at shard_index.

  Args:
    n_items: how many items the sweep has.
    shard_index: this shard, 0 <= shard_index < num_shards.
    num_shards: how many shards share the sweep.

  Returns:
    Indices into the items.
  """
  if not isinstance(num_shards, int) or num_shards < 1:
    raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
  if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index!r}")
  return list(range(shard_index, n_items, num_shards))


def _spec(base, items, names) -> dict:
  return {
    "runner": base.runner,
    "config": ablation.config_to_dict(base),
    "items": [{"name": n, "overrides": _plain(o)} for n, o in zip(names, items, strict=True)],
  }


def _check_or_write_spec(workdir: str, spec: dict) -> None:
  path = os.path.join(workdir, SWEEP_FILE)
  text = json.dumps(spec, indent=2) + "\n"  # unsorted: items keep their keys' order
  # Shards starting together may all find no file and all write it: the same text,
  # atomically, so any of them wins and every reader sees a whole file.
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(text):
      raise ValueError(
        f"{workdir} holds a different sweep (its {SWEEP_FILE} has another config or other "
        "items); use another --workdir or delete that one"
      )
    return
  runinfo.write_atomic(path, text)


def item_dir(workdir: str, name: str) -> str:
  """The directory of item `name` in a sweep's workdir."""
  return os.path.join(workdir, ITEMS_DIR, name)


def is_done(workdir: str, name: str) -> bool:
  """Whether item `name` finished (its DONE marker exists)."""
  return os.path.exists(os.path.join(item_dir(workdir, name), DONE))


@dataclasses.dataclass
class SweepResult:
  """What `run` did.

  Attributes:
    names: every item's name, in sweep order.
    ran: the names this call ran.
    skipped: the names of this shard it found done.
    missing: the names (any shard's) still without DONE at the end.
    summary: the path of summary.csv, or None while items are missing.
  """

  names: list[str]
  ran: list[str]
  skipped: list[str]
  missing: list[str]
  summary: str | None


def run(
  base: ml_collections.ConfigDict,
  items,
  workdir: str,
  shard_index: int = 0,
  num_shards: int = 1,
  progress: bool = True,
  runners: dict[str, Runner] | None = None,
  log: Callable[[str], object] | None = None,
) -> SweepResult:
  """Runs a sweep's items (this shard's share) and, once all are done, its summary.

  Other shards may run at the same time on the same workdir (see the module docstring):
  their items missing at the end only mean no summary yet.

  Args:
    base: the base config; `base.runner` names the runner.
    items: a list of dicts of dotted overrides (see `product`).
    workdir: the sweep's directory (created); holds sweep.json, items/, the summaries.
    shard_index: this process's shard (see `shard`).
    num_shards: how many processes share the items.
    progress: show a progress bar over the items.
    runners: the runner registry (default `RUNNERS`).
    log: if given, called with a line per item done (`item <name> done in <s> s ...`),
      e.g. `print` where there is no terminal for the progress bar.

  Returns:
    A SweepResult.
  """
  if "runner" not in base:
    raise ValueError("the sweep's base config needs a key 'runner' naming a runner")
  runner = get_runner(base.runner, runners)
  items = check_items(items)
  names = item_names(items)
  mine = shard(len(items), shard_index, num_shards)
  all_configs = [apply_overrides(base, item) for item in items]  # bad overrides fail up front
  configs = [all_configs[i] for i in mine]
  os.makedirs(os.path.join(workdir, ITEMS_DIR), exist_ok=True)
  _check_or_write_spec(workdir, _spec(base, items, names))
  runinfo.write_run_files(workdir, ablation.config_to_dict(base), base.get("seed"))
  ran, skipped = [], []
  bar = tqdm(list(zip(mine, configs, strict=True)), desc="sweep items", disable=not progress)
  for i, cfg in bar:
    name = names[i]
    bar.set_postfix_str(name)
    if is_done(workdir, name):
      skipped.append(name)
      continue
    path = item_dir(workdir, name)
    if os.path.exists(path):  # an earlier run stopped inside this item
      shutil.rmtree(path)
    start = time.perf_counter()
    runinfo.write_run_files(path, ablation.config_to_dict(cfg), cfg.get("seed"))
    runner.run(cfg, path)
    done = {"name": name, "overrides": _plain(items[i])}
    runinfo.write_atomic(os.path.join(path, DONE), json.dumps(done) + "\n")
    ran.append(name)
    runinfo.release_compiled()  # a long sweep compiles many programs (see runinfo)
    if log is not None:
      log(
        f"item {name} done in {time.perf_counter() - start:.1f} s "
        f"({len(ran) + len(skipped)}/{len(mine)} of shard {shard_index}/{num_shards})"
      )
  missing = [n for n in names if not is_done(workdir, n)]
  summary = None
  if not missing:
    summary = write_summary(workdir, runners)
  return SweepResult(names=names, ran=ran, skipped=skipped, missing=missing, summary=summary)


# ----------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------
def load_spec(workdir: str) -> dict:
  """A sweep workdir's sweep.json: runner, base config and items (name, overrides)."""
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} is not a sweep's workdir: {path} does not exist")
  with open(path) as f:
    return json.load(f)


def collect(
  workdir: str, runners: dict[str, Runner] | None = None, allow_missing: bool = False
) -> tuple[dict, list[str], list[dict]]:
  """The summary rows of a sweep: one per (done item, runner metrics row).

  Args:
    workdir: a sweep's workdir.
    runners: the runner registry (default `RUNNERS`).
    allow_missing: leave out items without DONE instead of raising.

  Returns:
    (spec, columns, rows): sweep.json's content, the column names ("item", the override
    keys, the runner's columns) and the rows (dicts; items lacking an override have None).
  """
  spec = load_spec(workdir)
  runner = get_runner(spec["runner"], runners)
  missing = [it["name"] for it in spec["items"] if not is_done(workdir, it["name"])]
  if missing and not allow_missing:
    raise ValueError(f"{len(missing)} item(s) of the sweep in {workdir} are not done: {missing}")
  keys = list(dict.fromkeys(k for it in spec["items"] for k in it["overrides"]))
  clash = sorted(set(keys) & set(runner.columns) | ({"item"} & set(keys)))
  if clash:
    raise ValueError(f"override keys {clash} clash with the summary's columns")
  columns = ["item", *keys, *runner.columns]
  rows = []
  for it in spec["items"]:
    if it["name"] in missing:
      continue
    for metrics in runner.read_rows(item_dir(workdir, it["name"])):
      absent = [c for c in runner.columns if c not in metrics]
      if absent:
        raise ValueError(f"item {it['name']}: the runner's rows lack column(s) {absent}")
      row = {"item": it["name"], **{k: it["overrides"].get(k) for k in keys}}
      row.update({c: metrics[c] for c in runner.columns})
      rows.append(row)
  return spec, columns, rows


def _csv_cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return repr(value)
  return format_value(value)


def _md_cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return _csv_cell(value)


def format_csv(columns, rows) -> str:
  """The summary as CSV text (floats at full precision)."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_csv_cell(row[c]) for c in columns])
  return buf.getvalue()


def format_markdown(columns, rows, title: str = "") -> str:
  """The summary as a markdown table (floats to 4 significant digits)."""
  lines = [f"# {title}", ""] if title else []
  lines.append("| " + " | ".join(columns) + " |")
  lines.append("|" + "---|" * len(columns))
  for row in rows:
    lines.append("| " + " | ".join(_md_cell(row[c]) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_summary(workdir: str, runners: dict[str, Runner] | None = None) -> str:
  """Writes summary.csv and summary.md of a finished sweep (every item done).

  Args:
    workdir: a sweep's workdir.
    runners: the runner registry (default `RUNNERS`).

  Returns:
    The path of summary.csv.
  """
  spec, columns, rows = collect(workdir, runners)
  title = f"Sweep summary: runner {spec['runner']}, {len(spec['items'])} items"
  csv_path = os.path.join(workdir, "summary.csv")
  runinfo.write_atomic(csv_path, format_csv(columns, rows))
  runinfo.write_atomic(os.path.join(workdir, "summary.md"), format_markdown(columns, rows, title))
  return csv_path


# ----------------------------------------------------------------------------------------
# spreading a sweep: local worker processes, hosts
# ----------------------------------------------------------------------------------------
def _script() -> str:
  return os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "sweep.py"
  )


def parse_nvidia_smi(text: str) -> list[str]:
  """The GPU ids `nvidia-smi -L` lists (`GPU 0: NVIDIA H100 ... (UUID: ...)` lines)."""
  return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, flags=re.MULTILINE)]


def local_devices(platform: str) -> list[str]:
  """This machine's devices a launcher can give its workers, without starting jax.

  Args:
    platform: "gpu": the entries of CUDA_VISIBLE_DEVICES when it is set, else the GPUs
      `nvidia-smi -L` lists (none without nvidia-smi); "cpu": one per usable CPU core.

  Returns:
    Device ids as strings (for GPUs what CUDA_VISIBLE_DEVICES takes).
  """
  if platform == "cpu":
    try:
      cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
      cores = os.cpu_count() or 1
    return [str(i) for i in range(cores)]
  if platform != "gpu":
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    return [] if ids[:1] == ["-1"] else ids
  try:
    out = subprocess.run(
      ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return parse_nvidia_smi(out)


def default_platform() -> str:
  """ "cpu" or "gpu": JAX_PLATFORMS's first entry when set, else "gpu" if there are GPUs."""
  names = [p.strip().lower() for p in os.environ.get("JAX_PLATFORMS", "").split(",")]
  names = [p for p in names if p]
  if names:
    if names[0] in ("cuda", "gpu"):
      return "gpu"
    if names[0] == "cpu":
      return "cpu"
    raise ValueError(
      f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']!r}: local workers spread over CPUs or "
      "NVIDIA GPUs only; on other accelerators start one process per host with "
      "--shard_by_process"
    )
  return "gpu" if local_devices("gpu") else "cpu"


def worker_log(workdir: str, index: int) -> str:
  """The log file of local worker `index` of a sweep."""
  return os.path.join(workdir, WORKERS_DIR, f"worker_{index}.log")


@dataclasses.dataclass(frozen=True)
class Worker:
  """One local worker process of a launched sweep.

  Attributes:
    index: the worker's number, 0 <= index < workers.
    shard_index: the shard it runs (`--shard_index`).
    num_shards: of how many (`--num_shards`).
    devices: the device ids it gets (GPU ids in its CUDA_VISIBLE_DEVICES; on the CPU the
      cores it is counted on, not pinned).
    env: the environment variables set for it on top of the launcher's.
    command: its command line.
    log: its log file (stdout and stderr).
  """

  index: int
  shard_index: int
  num_shards: int
  devices: tuple[str, ...]
  env: dict[str, str]
  command: tuple[str, ...]
  log: str


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def plan_workers(
  config_file: str,
  workdir: str,
  *,
  workers: int,
  devices_per_worker: int = 1,
  platform: str | None = None,
  devices: int | Sequence[int | str] | None = None,
  extra_flags: Sequence[str] = (),
  shard_index: int = 0,
  num_shards: int = 1,
  script: str | None = None,
) -> list[Worker]:
  """The worker processes `launch` starts: shards, devices, environment, command, log.

  Worker i of W runs shard `shard_index + num_shards * i` of `num_shards * W`: with the
  defaults (0, 1) that is shard i of W; a host given shard h of H (by hand) splits its
  share over its own workers the same way, so all hosts' workers together partition the
  items.

  Args:
    config_file: the sweep config, `path.py` or `path.py:arg`.
    workdir: the sweep's workdir.
    workers: how many processes; -1: as many as there are devices for devices_per_worker.
    devices_per_worker: consecutive devices each worker gets (on the GPU its
      CUDA_VISIBLE_DEVICES; on the CPU, when > 1, as many XLA host devices through
      `--xla_force_host_platform_device_count`).
    platform: "gpu" or "cpu"; None: `default_platform()`.
    devices: the devices to spread over: a count (ids 0..n-1) or a list of ids (e.g. GPU
      UUIDs); None: `local_devices(platform)`.
    extra_flags: more arguments for every worker, e.g. `--config.seed=1` overrides.
    shard_index: this launcher's shard of the sweep (several hosts by hand), see above.
    num_shards: how many launchers share the sweep.
    script: the worker's script (default experiments/sweep.py of this checkout).

  Returns:
    One Worker per process.
  """
  if workers != -1:
    _check_int("workers", workers, 1)  # 0 (run in this process) is `run`'s job
  _check_int("devices_per_worker", devices_per_worker, 1)
  shard(0, shard_index, num_shards)  # checks them
  platform = default_platform() if platform is None else platform
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
  if devices is None:
    devices = local_devices(platform)
  elif isinstance(devices, int) and not isinstance(devices, bool):
    _check_int("devices", devices, 1)
    devices = [str(i) for i in range(devices)]
  elif isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
    raise ValueError(f"devices must be a count or a list of device ids, got {devices!r}")
  devices = [str(d) for d in devices]
  what = "GPU(s)" if platform == "gpu" else "CPU core(s)"
  if not devices:
    raise ValueError(
      f"no local {what} found (nvidia-smi -L lists none and CUDA_VISIBLE_DEVICES is unset "
      "or empty); use platform='cpu' or pass devices"
    )
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices lists a device twice: {devices}")
  if workers == -1:
    workers = len(devices) // devices_per_worker
    if workers == 0:
      raise ValueError(
        f"workers=-1: {len(devices)} {what} {devices} cannot give one worker "
        f"{devices_per_worker} device(s)"
      )
  if workers * devices_per_worker > len(devices):
    raise ValueError(
      f"{workers} worker(s) x {devices_per_worker} device(s) each need "
      f"{workers * devices_per_worker} devices; there are {len(devices)} {what}: {devices}"
    )
  path = config_file.partition(":")[0]
  if not os.path.exists(path):
    raise ValueError(f"sweep config {path!r} does not exist")
  script = _script() if script is None else script
  if not os.path.exists(script):
    raise ValueError(f"the worker script {script!r} does not exist")
  if isinstance(extra_flags, str):
    raise ValueError(f"extra_flags must be a list of arguments, got the string {extra_flags!r}")
  out = []
  for i in range(workers):
    mine = tuple(devices[i * devices_per_worker : (i + 1) * devices_per_worker])
    env = {"PYTHONUNBUFFERED": "1"}
    if platform == "gpu":
      env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    else:
      env["JAX_PLATFORMS"] = "cpu"  # no worker grabs a GPU it was not given
      if devices_per_worker > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = runinfo.xla_flags_with_device_count(flags, devices_per_worker)
    index, count = shard_index + num_shards * i, num_shards * workers
    command = (
      sys.executable,
      script,
      f"--config={config_file}",
      f"--workdir={workdir}",
      *extra_flags,
      f"--shard_index={index}",  # last: these win over anything in extra_flags
      f"--num_shards={count}",
      "--workers=0",
      "--noshard_by_process",
    )
    out.append(Worker(i, index, count, mine, env, command, worker_log(workdir, i)))
  return out


class WorkerError(RuntimeError):
  """Local sweep workers exited with an error; `failed` holds (worker, exit code)."""

  def __init__(self, message: str, failed: list[tuple[Worker, int]]):
    super().__init__(message)
    self.failed = failed


@dataclasses.dataclass
class LaunchResult:
  """What `launch` did.

  Attributes:
    names: every item's name, in sweep order.
    workers: the worker processes it ran.
    seconds: each worker's wall time.
    missing: the names (any shard's) still without DONE at the end.
    summary: the path of summary.csv, or None while items are missing (other hosts).
  """

  names: list[str]
  workers: list[Worker]
  seconds: list[float]
  missing: list[str]
  summary: str | None


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError as e:
    return f"(cannot read it: {e})"


def launch(
  config_file: str,
  workdir: str,
  *,
  runners: dict[str, Runner] | None = None,
  log: Callable[[str], object] = print,
  poll_s: float = 0.2,
  **worker_args,
) -> LaunchResult:
  """Runs a sweep in local worker processes (see `plan_workers`), then its summary.

  Each worker is `python experiments/sweep.py --config=<config_file> --workdir=<workdir>
  <extra_flags> --shard_index=i --num_shards=W` with its own devices, its stdout and stderr
  in `<workdir>/workers/worker_<i>.log`. This process never starts jax's backend, so it
  holds no GPU memory. Finished items are skipped, as by `run`: launching again after a
  failure runs only what is left.

  Args:
    config_file: the sweep config, `path.py` or `path.py:arg`.
    workdir: the sweep's directory.
    **worker_args: `plan_workers`' keyword arguments (`workers` is required;
      devices_per_worker, platform, devices, extra_flags, shard_index, num_shards, script).
    runners: the runner registry for the summary (default `RUNNERS`).
    log: called with the progress lines (one per started and per finished worker).
    poll_s: how often the workers are polled, in seconds.

  Returns:
    A LaunchResult.

  Raises:
    WorkerError: a worker exited with an error (all are waited for first); the message
      names each failed worker, its exit code, its log and the log's last lines.
  """
  names = item_names(load_items(config_file))  # a broken config fails here, once
  plan = plan_workers(config_file, workdir, **worker_args)
  os.makedirs(os.path.join(workdir, WORKERS_DIR), exist_ok=True)
  procs, starts = [], []
  try:
    for w in plan:
      with open(w.log, "w") as f:
        procs.append(
          subprocess.Popen(
            w.command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **w.env}
          )
        )
      starts.append(time.perf_counter())
      n_items = len(shard(len(names), w.shard_index, w.num_shards))
      log(
        f"worker {w.index}: shard {w.shard_index}/{w.num_shards} ({n_items} item(s)), "
        + (
          f"CUDA_VISIBLE_DEVICES={w.env['CUDA_VISIBLE_DEVICES']}"
          if "CUDA_VISIBLE_DEVICES" in w.env
          else "CPU (not pinned)"
        )
        + f", log {w.log}"
      )
    seconds = [0.0] * len(plan)
    codes: list[int | None] = [None] * len(plan)
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        if codes[i] is None and p.poll() is not None:
          codes[i], seconds[i] = p.returncode, time.perf_counter() - starts[i]
          n_done = sum(c is not None for c in codes)
          state = "finished" if codes[i] == 0 else f"FAILED (exit code {codes[i]})"
          log(
            f"worker {i} {state} in {seconds[i]:.1f} s ({n_done}/{len(plan)} workers done)"
            + ("" if codes[i] == 0 else f"; log {plan[i].log}")
          )
      if any(c is None for c in codes):
        time.sleep(poll_s)
  finally:  # interrupted (Ctrl-C, an error here): stop the workers still running
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  failed = [(w, c) for w, c in zip(plan, codes, strict=True) if c != 0]
  if failed:
    parts = [f"worker {w.index} (exit code {c}, log {w.log})" for w, c in failed]
    tails = "\n".join(f"--- the end of {w.log}:\n{_tail(w.log)}" for w, _ in failed)
    raise WorkerError(
      f"{len(failed)} of {len(plan)} sweep worker(s) failed: {', '.join(parts)}; the "
      f"items they finished are kept, launch again to run the rest\n{tails}",
      failed,
    )
  missing = [n for n in names if not is_done(workdir, n)]
  host_shard = (worker_args.get("shard_index", 0), worker_args.get("num_shards", 1))
  ours = set(shard(len(names), *host_shard))
  lost = [n for i, n in enumerate(names) if i in ours and n in missing]
  if lost:
    raise RuntimeError(
      f"every worker exited 0 but {len(lost)} of their item(s) have no {DONE}: {lost} "
      f"(logs in {os.path.join(workdir, WORKERS_DIR)})"
    )
  summary = None if missing else write_summary(workdir, runners)
  return LaunchResult(names, plan, seconds, missing, summary)


def process_shard() -> tuple[int, int]:
  """(shard_index, num_shards) of this process: `jax.process_index()` of `process_count()`.

  Call it after `jax.distributed.initialize()` (`distributed_shard` does both); without
  that every process is process 0 of 1 and runs every item.

  Returns:
    (jax.process_index(), jax.process_count()), checked.
  """
  index, count = jax.process_index(), jax.process_count()
  shard(0, index, count)
  return index, count


def distributed_shard(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> tuple[int, int]:
  """This host's shard of a sweep spread over hosts (one process per host).

  Runs `jax.distributed.initialize`, reads `process_shard()`, then shuts the distributed
  runtime down again: the hosts share nothing but the workdir, so from there on each runs
  its items alone. Left running, a host that finishes first would wait at exit for the
  others' (jax's shutdown barrier, 5 minutes) and then abort every host, and one host's
  crash would abort the others. The items use their own host's devices (after this,
  `jax.devices()` still lists every host's; `jax.local_devices()` are this host's).

  Args:
    coordinator_address: `host:port` of process 0, the same on every host; None: jax
      detects the cluster (SLURM, Open MPI, TPU pods, ...).
    num_processes: how many processes (hosts) in all; None: detected.
    process_id: this process's id, 0 <= process_id < num_processes; None: detected.

  Returns:
    (shard_index, num_shards) = (jax.process_index(), jax.process_count()).
  """
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  try:
    return process_shard()
  finally:
    jax.distributed.shutdown()


# flags of experiments/sweep.py a launcher sets for its workers itself
LAUNCHER_FLAGS = (
  "config",
  "workdir",
  "workers",
  "devices_per_worker",
  "shard_index",
  "num_shards",
  "shard_by_process",
  "coordinator_address",
  "num_processes",
  "process_id",
)


def worker_flags(
  argv: Sequence[str], flag_values, drop: Sequence[str] = LAUNCHER_FLAGS
) -> list[str]:
  """The arguments of a launcher's command line its workers get: all but `drop`'s flags.

  Config overrides (`--config.seed=1`, `--config.seed 1`, `--noconfig.flag`), --flagfile
  and other flags pass through as written; a flag's separate value goes with it.

  Args:
    argv: the launcher's arguments (without the program name).
    flag_values: absl's FlagValues (`flags.FLAGS`), which tell boolean flags apart.
    drop: names of flags to leave out, with their values.

  Returns:
    The arguments to pass on.
  """
  out = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg == "--":
      break
    if not arg.startswith("-") or arg == "-":
      out.append(arg)
      continue
    name, eq, _ = arg.lstrip("-").partition("=")
    base = name
    if name not in flag_values and name.startswith("no") and name[2:] in flag_values:
      base = name[2:]
    known = base in flag_values
    takes_value = not eq and (
      base == "flagfile" or (known and base == name and not flag_values[base].boolean)
    )
    args = [arg]
    if takes_value and i < len(argv):
      args.append(argv[i])
      i += 1
    if base not in drop:
      out += args
  return out
