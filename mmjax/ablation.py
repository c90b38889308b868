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
      d,
      default=lambda o: (
        dataclasses.asdict(o)
        if dataclasses.is_dataclass(o)
        else o.to_dict()
        if hasattr(o, "to_dict")
        else str(o)
      ),
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


# ----------------------------------------------------------------------------------------
# the same metrics on a real model: per decoder layer, and on the end task
# ----------------------------------------------------------------------------------------
def run_model(cfg, workdir: str | None = None, progress: bool = True) -> list[dict]:
  """Ablation on a Qwen2.5-VL checkpoint (configs/ablate_model.py).

  Per policy and decoder layer, on the layer's own q/k/v from a dense prefill of the
  prompt (each layer fed the dense inputs, so errors do not compound): density, recall
  and the attention output's relative error against dense. Per policy, end to end: the
  last token's logits' relative error and the greedy answer (and whether it equals the
  dense answer).
  """
  from mmjax import search
  from mmjax.models import checkpoint, processing
  from mmjax.models.answer import load_frames
  from mmjax.models.generate import generate
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL, layer_policy

  if not cfg.checkpoint:
    raise ValueError("the model ablation needs --config.checkpoint (a Qwen2.5-VL dir)")
  unknown = sorted(set(cfg.policies) - set(policies.names()))
  if unknown:
    raise ValueError(f"policies: unknown {unknown}; known: {policies.names()}")
  dtype = jnp.dtype(cfg.dtype)
  config, params = checkpoint.load_hf_checkpoint(cfg.checkpoint, dtype=dtype)
  proc = processing.Processor.from_dir(cfg.checkpoint)
  if cfg.video:
    frames = load_frames(cfg.video)
  else:
    rng = np.random.default_rng(cfg.seed)
    frames = rng.integers(0, 256, (cfg.frames, *cfg.frame_size, 3), dtype=np.uint8)
  batch = proc(processing.chat_prompt(cfg.question, videos=1), videos=[frames], video_fps=cfg.fps)
  model = Qwen2_5_VL(config, backend=cfg.backend, dtype=dtype, param_dtype=dtype)
  qkv = search.model_qkv(model, params, batch)
  mod = jnp.asarray(batch["modality"])
  blocks = {"block_q": cfg.block_q, "block_k": cfg.block_k}
  dense_layers = [
    sparse_attention(q, k, v, policies.Dense(**blocks), mod, backend="xla", return_lse=True)
    for q, k, v in qkv
  ]
  # one prefill per policy: generate returns its last-token logits too
  tokens_d, logits_d = generate(
    model, params, batch, max_new_tokens=cfg.max_new_tokens, return_logits=True
  )
  answer_d = tokens_d[0].tolist()

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  rows = []
  for name in tqdm(cfg.policies, desc="policies", disable=not progress):
    pol = build_policy(name, {**blocks, **dict(cfg.policy_kwargs.get(name, {}))}, ())
    for li, ((q, k, v), (out_d, lse_d)) in enumerate(zip(qkv, dense_layers, strict=True)):
      plan = layer_policy(pol, li).plan(q, k, mod)
      out, lse = sparse_attention(q, k, v, plan=plan, backend="xla", return_lse=True)
      rows.append(
        {
          "policy": name,
          "layer": li,
          "density": round(float(plan.density()), 6),
          "recall": round(float(jnp.exp(lse - lse_d).mean()), 6),
          "rel_error": round(rel(out, out_d), 6),
        }
      )
    tokens, logits = generate(
      model.clone(policy=pol),
      params,
      batch,
      max_new_tokens=cfg.max_new_tokens,
      return_logits=True,
    )
    answer = tokens[0].tolist()
    rows.append(
      {
        "policy": name,
        "layer": "model",
        "density": round(float(np.mean([r["density"] for r in rows[-len(qkv) :]])), 6),
        "logits_rel_error": round(rel(logits, logits_d), 6),
        "answer": proc.tokenizer.decode(answer, skip_special_tokens=True),
        "answer_tokens": answer,
        "same_answer_as_dense": answer == answer_d,
      }
    )
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(format_model_table(rows, int(batch["input_ids"].shape[1])) + "\n")
    plot_layers(rows, os.path.join(workdir, "error_by_layer.png"))
  return rows


def format_model_table(rows, tokens: int) -> str:
  lines = [
    f"prompt: {tokens} tokens",
    "",
    "| policy | mean density | mean recall | mean layer rel. error | logits rel. error | "
    "same answer as dense |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r["layer"] != "model":
      continue
    layers = [x for x in rows if x["policy"] == r["policy"] and x["layer"] != "model"]
    lines.append(
      f"| {r['policy']} | {r['density']:.3f} | "
      f"{np.mean([x['recall'] for x in layers]):.4f} | "
      f"{np.mean([x['rel_error'] for x in layers]):.2e} | {r['logits_rel_error']:.2e} | "
      f"{r['same_answer_as_dense']} |"
    )
  return "\n".join(lines)


def plot_layers(rows, path: str) -> None:
  plt = plotting.pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r["policy"] for r in rows):
    pts = [
      (r["layer"], r["rel_error"]) for r in rows if r["policy"] == name and r["layer"] != "model"
    ]
    ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], marker="o", label=name)
  ax.set_yscale("log")
  ax.set_xlabel("decoder layer")
  ax.set_ylabel("attention output rel. error vs dense")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
