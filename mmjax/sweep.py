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
every item done writes the summary.
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
import shutil
from collections.abc import Callable, Sequence

import ml_collections
from tqdm import tqdm

from mmjax import ablation, policies, runinfo

DONE = "DONE"
SWEEP_FILE = "sweep.json"
ITEMS_DIR = "items"
MAX_NAME = 96  # longer names end in a hash of the overrides


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


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _spec(base, items, names) -> dict:
  return {
    "runner": base.runner,
    "config": ablation.config_to_dict(base),
    "items": [{"name": n, "overrides": _plain(o)} for n, o in zip(names, items, strict=True)],
  }


def _check_or_write_spec(workdir: str, spec: dict) -> None:
  path = os.path.join(workdir, SWEEP_FILE)
  text = json.dumps(spec, indent=2) + "\n"  # unsorted: items keep their keys' order
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(text):
      raise ValueError(
        f"{workdir} holds a different sweep (its {SWEEP_FILE} has another config or other "
        "items); use another --workdir or delete that one"
      )
    return
  _write_atomic(path, text)


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
) -> SweepResult:
  """Runs a sweep's items (this shard's share) and, once all are done, its summary.

  Args:
    base: the base config; `base.runner` names the runner.
    items: a list of dicts of dotted overrides (see `product`).
    workdir: the sweep's directory (created); holds sweep.json, items/, the summaries.
    shard_index: this process's shard (see `shard`).
    num_shards: how many processes share the items.
    progress: show a progress bar over the items.
    runners: the runner registry (default `RUNNERS`).

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
    runinfo.write_run_files(path, ablation.config_to_dict(cfg), cfg.get("seed"))
    runner.run(cfg, path)
    done = {"name": name, "overrides": _plain(items[i])}
    _write_atomic(os.path.join(path, DONE), json.dumps(done) + "\n")
    ran.append(name)
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
  _write_atomic(csv_path, format_csv(columns, rows))
  _write_atomic(os.path.join(workdir, "summary.md"), format_markdown(columns, rows, title))
  return csv_path
