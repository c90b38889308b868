"""The paper's ablation tables and plots from a sweep's workdir (see mmjax/sweep.py).

Rows are grouped by (policy, budget, length) and averaged over seeds. A row's budget is the
item's overrides other than `policies`, `seed`, `layout.*` and the options of other policies
(e.g. `local_tokens=512`, or `block_q=32,block_k=32` in a block-size sweep); its length is
the runner's `seq_len`. `write_report` writes:

  recall_vs_density.png  one panel per length: a policy's budgets as points joined by a line
  error_vs_length.png    one panel per policy: output error vs length, a line per budget
  report.md              both tables, linking the plots (tables only without matplotlib)
"""

from __future__ import annotations

import math
import os

from mmjax import plotting, sweep

REQUIRED = ("policy", "seq_len", "density", "recall", "min_head_recall", "rel_error")
METRICS = ("density", "recall", "min_head_recall", "rel_error")
RECALL_PNG = "recall_vs_density.png"
ERROR_PNG = "error_vs_length.png"


def _budget_keys(overrides: dict, policy: str) -> list[str]:
  keys = []
  for key in overrides:
    parts = key.split(".")
    if key in ("policies", "seed") or parts[0] == "layout":
      continue
    if parts[0] == "policy_kwargs" and len(parts) > 2 and parts[1] != policy:
      continue
    keys.append(key)
  return keys


def budget_label(overrides: dict, policy: str) -> str:
  """The budget part of an item's overrides for one policy's row.

  Args:
    overrides: the item's dotted overrides.
    policy: the row's policy.

  Returns:
    e.g. "local_tokens=512", or "default" when the item sets no budget.
  """
  keys = _budget_keys(overrides, policy)
  short = sweep.short_keys(keys)
  return ",".join(f"{short[k]}={sweep.format_value(overrides[k])}" for k in keys) or "default"


def _budget_values(overrides: dict, policy: str) -> str:
  keys = _budget_keys(overrides, policy)
  return ",".join(sweep.format_value(overrides[k]) for k in keys) or "default"


def aggregate(spec: dict, rows: list[dict]) -> list[dict]:
  """Means over seeds per (policy, budget, length).

  Args:
    spec: the sweep's spec (`sweep.load_spec`).
    rows: its summary rows (`sweep.collect`), with the REQUIRED columns.

  Returns:
    Groups (dicts: policy, budget, values, seq_len, seeds, and the METRICS' means), by
    policy and budget in the order they first appear, then by length.
  """
  overrides = {it["name"]: it["overrides"] for it in spec["items"]}
  groups: dict[tuple, dict] = {}
  for row in rows:
    ov = overrides[row["item"]]
    pol = row["policy"]
    key = (pol, budget_label(ov, pol), row["seq_len"])
    g = groups.setdefault(
      key,
      {
        "policy": pol,
        "budget": key[1],
        "values": _budget_values(ov, pol),
        "seq_len": row["seq_len"],
        "seeds": 0,
        **{m: 0.0 for m in METRICS},
      },
    )
    g["seeds"] += 1
    for m in METRICS:
      g[m] += float(row[m])
  order = {}
  for pol, budget, _ in groups:
    order.setdefault((pol, budget), len(order))
  pol_order = {}
  for pol, _ in order:
    pol_order.setdefault(pol, len(pol_order))
  out = []
  for key in sorted(groups, key=lambda k: (pol_order[k[0]], order[k[:2]], k[2])):
    g = groups[key]
    for m in METRICS:
      g[m] /= g["seeds"]
    out.append(g)
  return out


def recall_table(groups: list[dict]) -> str:
  """Markdown: per length, policy and budget, density, recall and error (seed means)."""
  lines = [
    "| T | policy | budget | density | recall | min head recall | rel. error vs dense | seeds |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for g in sorted(groups, key=lambda g: g["seq_len"]):  # stable: policy order kept
    lines.append(
      f"| {g['seq_len']} | {g['policy']} | {g['budget']} | {g['density']:.3f} | "
      f"{g['recall']:.4f} | {g['min_head_recall']:.4f} | {g['rel_error']:.2e} | "
      f"{g['seeds']} |"
    )
  return "\n".join(lines)


def error_table(groups: list[dict]) -> str:
  """Markdown: a row per (policy, budget), a column per length: error (density)."""
  lengths = sorted({g["seq_len"] for g in groups})
  cells: dict[tuple, dict] = {}
  for g in groups:
    cells.setdefault((g["policy"], g["budget"]), {})[g["seq_len"]] = g
  lines = [
    "| policy | budget | " + " | ".join(f"T={t}" for t in lengths) + " |",
    "|---|---|" + "---|" * len(lengths),
  ]
  for (pol, budget), by_len in cells.items():
    row = [
      f"{by_len[t]['rel_error']:.2e} ({by_len[t]['density']:.3f})" if t in by_len else "-"
      for t in lengths
    ]
    lines.append(f"| {pol} | {budget} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def _colors(plt, pols):
  cmap = plt.get_cmap("tab10")
  return {p: cmap(i % 10) for i, p in enumerate(pols)}


def _grid(plt, n, size=(4.2, 3.6)):
  ncols = min(n, 3)
  nrows = math.ceil(n / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
  flat = [ax for row in axes for ax in row]
  for ax in flat[n:]:
    ax.set_visible(False)
  return fig, flat[:n]


def plot_recall_vs_density(groups: list[dict], path: str) -> bool:
  """One panel per length; per policy its budgets' points joined by a line.

  Args:
    groups: `aggregate`'s output.
    path: the PNG to write.

  Returns:
    Whether the plot was written (False without matplotlib).
  """
  plt = plotting.pyplot(path)
  if plt is None:
    return False
  lengths = sorted({g["seq_len"] for g in groups})
  pols = list(dict.fromkeys(g["policy"] for g in groups))
  colors = _colors(plt, pols)
  fig, axes = _grid(plt, len(lengths))
  for ax, t in zip(axes, lengths, strict=True):
    for pol in pols:
      pts = sorted(
        (g for g in groups if g["seq_len"] == t and g["policy"] == pol),
        key=lambda g: (g["density"], g["recall"]),
      )
      if not pts:
        continue
      ax.plot(
        [g["density"] for g in pts],
        [g["recall"] for g in pts],
        "-o",
        color=colors[pol],
        label=pol,
        ms=4,
      )
      for g in pts:
        ax.annotate(
          g["values"],
          (g["density"], g["recall"]),
          fontsize=6,
          xytext=(3, 3),
          textcoords="offset points",
        )
    ax.set_title(f"T = {t}", fontsize=9)
    ax.set_xlabel("density")
    ax.set_ylabel("attention recall")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Recall vs density (points: budgets, mean over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_error_vs_length(groups: list[dict], path: str) -> bool:
  """One panel per policy; output error vs length, a line per budget.

  Args:
    groups: `aggregate`'s output.
    path: the PNG to write.

  Returns:
    Whether the plot was written (False without matplotlib).
  """
  plt = plotting.pyplot(path)
  if plt is None:
    return False
  pols = list(dict.fromkeys(g["policy"] for g in groups))
  fig, axes = _grid(plt, len(pols))
  for ax, pol in zip(axes, pols, strict=True):
    mine = [g for g in groups if g["policy"] == pol]
    for budget in dict.fromkeys(g["budget"] for g in mine):
      pts = sorted((g for g in mine if g["budget"] == budget), key=lambda g: g["seq_len"])
      ax.plot([g["seq_len"] for g in pts], [g["rel_error"] for g in pts], "-o", ms=4, label=budget)
    if all(g["rel_error"] > 0 for g in mine):
      ax.set_yscale("log")
    ax.set_title(pol, fontsize=9)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("rel. output error vs dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle("Output error vs length (mean over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(workdir: str, out_dir: str | None = None, allow_missing: bool = False) -> str:
  """Writes report.md and the two plots of a sweep.

  Args:
    workdir: a sweep's workdir (its runner's rows must have the REQUIRED columns).
    out_dir: where to write (default: workdir).
    allow_missing: report the finished items only (listing the others) instead of raising.

  Returns:
    The path of report.md.
  """
  spec, columns, rows = sweep.collect(workdir, allow_missing=allow_missing)
  absent = [c for c in REQUIRED if c not in columns]
  if absent:
    raise ValueError(f"report: runner {spec['runner']!r} gives no column(s) {absent}")
  if not rows:
    raise ValueError(f"report: no finished items in {workdir}")
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  groups = aggregate(spec, rows)
  done = {r["item"] for r in rows}
  missing = [it["name"] for it in spec["items"] if it["name"] not in done]
  swept = list(dict.fromkeys(k for it in spec["items"] for k in it["overrides"]))
  layout = spec["config"].get("layout", {})
  lines = [
    f"# Sweep report: runner {spec['runner']}",
    "",
    f"{len(spec['items'])} items ({len(rows)} metric rows), swept: "
    + ", ".join(f"`{k}`" for k in swept)
    + ". Base config: `sweep.json`; every row: `summary.csv`. Means over seeds; recall is "
    "the share of dense softmax mass inside the plan, averaged over heads and queries.",
  ]
  if layout:
    lines.append(
      f"Layout: frames of {layout.get('height')}x{layout.get('width')} patches, text "
      f"{layout.get('text_prefix')}+{layout.get('text_between')}/frame+"
      f"{layout.get('text_suffix')}; heads {spec['config'].get('head_kinds')}, backend "
      f"{spec['config'].get('backend')}, dtype {spec['config'].get('dtype')}."
    )
  if missing:
    lines += ["", f"**Not done ({len(missing)}):** " + ", ".join(missing)]
  plotted_r = plot_recall_vs_density(groups, os.path.join(out_dir, RECALL_PNG))
  plotted_e = plot_error_vs_length(groups, os.path.join(out_dir, ERROR_PNG))
  lines += ["", "## Recall vs density", ""]
  if plotted_r:
    lines += [f"![recall vs density]({RECALL_PNG})", ""]
  lines += [recall_table(groups), "", "## Output error vs length", ""]
  if plotted_e:
    lines += [f"![output error vs length]({ERROR_PNG})", ""]
  lines += ["Cells: relative output error vs dense (density).", "", error_table(groups)]
  if not (plotted_r and plotted_e):
    lines += ["", "(No plots: matplotlib is not installed; `pip install 'mmjax[plot]'`.)"]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
