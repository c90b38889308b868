"""Ablation of sparsity policies against dense attention on the synthetic VLM suite.

For each policy: density (fraction of causal pairs computed), attention recall (the share
of each query's dense softmax mass that falls inside the plan, exp(lse_sparse - lse_dense),
averaged over queries), the output's relative error against dense, and wall times of the
plan and of the attention. Dense numbers come from the `dense` plan through the same
backend, in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mmjax import plotting, policies, synthetic
from mmjax.attention import sparse_attention

METRIC_KEYS = ("policy", "density", "recall", "min_head_recall", "rel_error", "plan_s", "attn_s")


def oracle_table(head_kinds) -> tuple:
  """A one-layer mminference table giving every planted head the policy made for it.

  It stands in for the offline search's table on planted inputs (whose answer is known).
  """
  return ((tuple(policies.get(kind) for kind in head_kinds)),)


def build_policy(name: str, kwargs: dict, head_kinds) -> policies.Policy:
  kwargs = dict(kwargs)
  if name == "mminference" and kwargs.get("table") == "oracle":
    kwargs["table"] = oracle_table(head_kinds)
  return policies.get(name, **kwargs)


def _timed(fn, *args):
  out = fn(*args)
  jax.block_until_ready(out)  # compile + first run
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def evaluate(policy, batch, backend="xla", dense=None):
  """Metrics of one policy on a SyntheticBatch; `dense` = (out, lse) to reuse."""
  q, k, v, mod = batch.q, batch.k, batch.v, batch.modality
  if dense is None:
    dense = sparse_attention(q, k, v, policies.Dense(), mod, backend=backend, return_lse=True)
  out_d, lse_d = dense
  plan, plan_s = _timed(lambda: policy.plan(q, k, mod))
  (out, lse), attn_s = _timed(
    lambda: sparse_attention(q, k, v, plan=plan, backend=backend, return_lse=True)
  )
  head_recall = jnp.exp(lse - lse_d).mean(axis=(0, 2))  # [N]
  rel = jnp.linalg.norm((out - out_d).astype(jnp.float32)) / jnp.linalg.norm(
    out_d.astype(jnp.float32)
  )
  return {
    "density": float(plan.density()),
    "recall": float(head_recall.mean()),
    "min_head_recall": float(head_recall.min()),
    "head_recall": [round(float(x), 6) for x in head_recall],
    "head_density": [round(float(x), 6) for x in plan.head_density().mean(0)],
    "rel_error": float(rel),
    "plan_s": plan_s,
    "attn_s": attn_s,
    "aux": {key: np.asarray(val).tolist() for key, val in plan.aux.items()},
  }


def run(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Runs the ablation described by `cfg` (see configs/ablate_policies.py)."""
  layout = synthetic.VideoLayout(**dict(cfg.layout))
  batch = synthetic.make_batch(
    seed=cfg.seed,
    layout=layout,
    head_kinds=tuple(cfg.head_kinds),
    batch=cfg.batch,
    head_dim=cfg.head_dim,
    dtype=jnp.dtype(cfg.dtype),
  )
  unknown = sorted(set(cfg.policy_kwargs) - set(policies.names()))
  if unknown:
    raise ValueError(f"policy_kwargs names unknown policies {unknown}; known: {policies.names()}")
  unknown = sorted(set(cfg.policies) - set(policies.names()))
  if unknown:
    raise ValueError(f"policies: unknown {unknown}; known: {policies.names()}")
  dense = sparse_attention(
    batch.q,
    batch.k,
    batch.v,
    policies.Dense(),
    batch.modality,
    backend=cfg.backend,
    return_lse=True,
  )
  rows = []
  it = tqdm(cfg.policies, desc="policies", disable=not progress)
  for name in it:
    it.set_postfix_str(name)
    pol = build_policy(name, dict(cfg.policy_kwargs.get(name, {})), cfg.head_kinds)
    row = {"policy": name, "seq_len": layout.seq_len, **evaluate(pol, batch, cfg.backend, dense)}
    rows.append(row)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for row in rows:  # timings apart, these lines are identical across reruns
        f.write(
          json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}, sort_keys=True) + "\n"
        )
    with open(os.path.join(workdir, "timings.jsonl"), "w") as f:
      for row in rows:
        f.write(
          json.dumps({"policy": row["policy"], "plan_s": row["plan_s"], "attn_s": row["attn_s"]})
          + "\n"
        )
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(format_table(rows, layout, cfg) + "\n")
    plot(rows, os.path.join(workdir, "recall_vs_density.png"))
    for spec in cfg.get("attention_maps", ()):
      name, heads = spec["policy"], tuple(spec["heads"])
      pol = build_policy(name, dict(cfg.policy_kwargs.get(name, {})), cfg.head_kinds)
      attention_maps(batch, pol, heads, os.path.join(workdir, f"attention_{name}.png"))
  return rows


def format_table(rows, layout=None, cfg=None) -> str:
  head = ""
  if layout is not None:
    head = (
      f"T={layout.seq_len} ({layout.frames} frames of {layout.height}x{layout.width}, "
      f"text {layout.text_prefix}+{layout.text_between}/frame+{layout.text_suffix}), "
      f"heads={list(cfg.head_kinds)}, backend={cfg.backend}\n\n"
    )
  lines = [
    "| policy | density | recall | min head recall | rel. error vs dense | plan s | attn s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['policy']} | {r['density']:.3f} | {r['recall']:.4f} | "
      f"{r['min_head_recall']:.4f} | {r['rel_error']:.2e} | {r['plan_s']:.3f} | "
      f"{r['attn_s']:.3f} |"
    )
  return head + "\n".join(lines)


def plot(rows, path: str) -> None:
  """Recall vs density, one point per policy (skipped with a note without matplotlib)."""
  plt = plotting.pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in rows:
    ax.scatter(r["density"], r["recall"], s=40)
    ax.annotate(
      r["policy"],
      (r["density"], r["recall"]),
      fontsize=8,
      xytext=(4, 4),
      textcoords="offset points",
    )
  ax.set_xlabel("density (fraction of causal pairs computed)")
  ax.set_ylabel("attention recall (mean over heads, queries)")
  ax.set_xlim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.set_title("Policies on the synthetic VLM suite")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def config_to_dict(cfg) -> dict:
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return json.loads(
    json.dumps(
      d, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)
    )
  )


def _pool(x: np.ndarray, bins: int, how: str) -> np.ndarray:
  """[T, T] -> [bins, bins] by max or any over equal tiles (T cropped to a multiple)."""
  bins = min(bins, x.shape[0])
  t = (x.shape[0] // bins) * bins
  x = x[:t, :t].reshape(bins, t // bins, bins, t // bins)
  return x.max(axis=(1, 3)) if how == "max" else x.any(axis=(1, 3))


def attention_maps(batch, policy, heads, path: str, bins: int = 256) -> None:
  """For each head: its dense causal attention (log scale, max-pooled to bins x bins) with
  the plan's mask over it, in original token order (top) and in the plan's view order,
  i.e. after the permutation (bottom): the paper's grid and boundary figures."""
  plt = plotting.pyplot(path)
  if plt is None:
    return
  q, k, mod = batch.q, batch.k, batch.modality
  t, n = q.shape[1], q.shape[2]
  bad = [h for h in heads if not 0 <= h < n]
  if bad:
    raise ValueError(f"attention map heads {bad} are not in [0, {n})")
  from matplotlib.colors import ListedColormap  # noqa: PLC0415  (pyplot imported it)

  plan = policy.plan(q, k, mod)
  mask = np.asarray(plan.to_dense_mask()[0])  # [N, T, T]
  qpos = np.asarray(plan.q_positions()[0])  # [N, L]
  kpos = np.asarray(plan.k_positions()[0])
  g = n // k.shape[2]
  fig, axes = plt.subplots(2, len(heads), figsize=(max(4.4, 3.4 * len(heads)), 6.6), squeeze=False)
  for j, h in enumerate(heads):
    qh = np.asarray(q[0, :, h], np.float64)
    kh = np.asarray(k[0, :, h // g], np.float64)
    s = qh @ kh.T / np.sqrt(qh.shape[-1])
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    qv, kv = qpos[h][qpos[h] < t], kpos[h][kpos[h] < t]
    for row, (pp, mm, title) in enumerate(
      (
        (p, mask[h], "original order"),
        (p[np.ix_(qv, kv)], mask[h][np.ix_(qv, kv)], "view order (permuted)"),
      )
    ):
      ax = axes[row][j]
      ax.imshow(np.log10(_pool(pp, bins, "max") + 1e-6), cmap="magma", vmin=-4, vmax=0)
      ax.imshow(
        np.ma.masked_where(~(pm := _pool(mm, bins, "any")), np.ones(pm.shape)),
        cmap=ListedColormap(["#39ff14"]),
        alpha=0.3,
      )
      ax.set_title(f"head {h} ({policy.name}): {title}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle("log10 attention (max-pooled); plan mask in green", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
