"""Offline per-head pattern search (the paper's "kernel-aware" search, simplified).

For every layer and head, each candidate (a pattern at one budget) is planned on the
calibration q/k and scored by its attention recall against dense and its density.
Recall: the share of each query's dense softmax mass inside the plan, exp(lse_sparse -
lse_dense), averaged over the scored queries of each modality, then over modalities (the
scored queries: the last `last_q` and `sample_blocks` query blocks drawn with a fixed
seed). Density: computed causal pairs / all causal pairs, per head. Patterns are compared
at one compute budget (`max_density`): each pattern's recall there is interpolated
between its budgets; the best pattern wins unless a simpler one is within `tie` of it
(see `choose`). The result is an `mminference` table: a JSON file with, per layer and
head, the policy, its recall and density.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mmjax import policies
from mmjax.attention import masked_attention
from mmjax.policies import Policy

# Simpler patterns first: cheaper to plan, and what a tie should go to.
SIMPLICITY = ("a_shape", "block_sparse", "vertical_slash", "grid", "q_boundary", "2d_boundary")

# The budget fields a scale multiplies, per pattern (composites scale their parts).
BUDGET_FIELDS = {
  "a_shape": ("local_tokens",),
  "vertical_slash": ("vertical_size", "slash_size"),
  "block_sparse": ("top_k_blocks",),
  "grid": ("top_k_blocks", "band_tokens"),
}


def scale_budget(policy: Policy, scale: float) -> Policy:
  """The policy with every budget field multiplied by `scale` (at least 1)."""
  if scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  name = policy.name
  if name in BUDGET_FIELDS:
    kw = {f: max(1, int(round(getattr(policy, f) * scale))) for f in BUDGET_FIELDS[name]}
    return dataclasses.replace(policy, **kw)
  if name == "q_boundary":
    return dataclasses.replace(
      policy,
      patterns=tuple((m, scale_budget(p, scale)) for m, p in policy.patterns),
      default=scale_budget(policy.default, scale),
    )
  if name == "2d_boundary":
    return dataclasses.replace(
      policy,
      patterns=tuple((m, scale_budget(p, scale)) for m, p in policy.patterns),
      default=scale_budget(policy.default, scale),
      cross=scale_budget(policy.cross, scale),
    )
  if name == "dense":
    return policy
  raise ValueError(f"scale_budget: no budget fields known for policy {name!r}")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One pattern at one budget."""

  pattern: str
  scale: float
  policy: Policy

  def label(self) -> str:
    return f"{self.pattern}@{self.scale:g}"


def candidates(
  patterns: Sequence[str], scales: Sequence[float], overrides: Mapping[str, Mapping] | None = None
) -> list[Candidate]:
  """Every pattern at every budget scale; `overrides[pattern]` are `policies.get` kwargs
  (block sizes, heads_per_step, ...) applied before scaling."""
  overrides = overrides or {}
  bad = sorted(set(overrides) - set(patterns))
  if bad:
    raise ValueError(f"candidate overrides name patterns not searched: {bad}")
  out = []
  for name in patterns:
    if name in ("mminference", "dense"):
      raise ValueError(f"pattern {name!r} cannot be a search candidate; use {SIMPLICITY}")
    base = policies.get(name, **dict(overrides.get(name, {})))
    for s in scales:
      out.append(Candidate(name, float(s), scale_budget(base, s)))
  if not out:
    raise ValueError("no candidates: give at least one pattern and one scale")
  return out


def _scored_rows(t: int, last_q: int, sample_blocks: int, block: int, seed: int) -> np.ndarray:
  """The query rows recall is measured on: the last `last_q` and `sample_blocks` random
  query blocks (fixed seed), sorted, unique."""
  rows = set(range(max(0, t - last_q), t))
  n_blocks = t // block
  if sample_blocks and n_blocks:
    rng = np.random.default_rng(seed)
    pick = rng.choice(n_blocks, size=min(sample_blocks, n_blocks), replace=False)
    for b in pick:
      rows.update(range(b * block, (b + 1) * block))
  return np.asarray(sorted(rows), np.int32)


@jax.jit
def _dense_lse(q, k, rows):
  """[B, N, R] log-sum-exp of the causal scores of the scored rows."""
  causal = jnp.arange(q.shape[1])[None, :] <= rows[:, None]  # [R, S]
  mask = jnp.broadcast_to(causal[None, None], (q.shape[0], q.shape[2], *causal.shape))
  return masked_attention(q[:, rows], k, k, mask)[1]


@jax.jit
def _sparse_lse(q, k, plan, rows):
  """[B, N, R] log-sum-exp of the scores the plan admits for the scored rows: the rows'
  own masks (`SparsePlan.mask_rows`), as `_dense_lse`, so no other query is computed."""
  return masked_attention(q[:, rows], k, k, plan.mask_rows(rows))[1]


def _balanced_recall(r, qmod) -> np.ndarray:
  """[B, N, R] per-query recall -> [N]: the mean over query modalities of each
  modality's mean, so the few text queries of a video prompt weigh as much as the many
  vision ones (the boundary patterns differ mostly in what text queries see)."""
  r = np.asarray(r, np.float64)
  if qmod is None:
    return r.mean(axis=(0, 2))
  per = [r.transpose(1, 0, 2)[:, qmod == m].mean(axis=1) for m in np.unique(qmod)]
  return np.mean(per, axis=0)


def score_candidates(q, k, modality, cands: Sequence[Candidate], rows) -> tuple[np.ndarray, ...]:
  """recall, density: [C, N] for every candidate on one layer's q/k (recall on `rows`)."""
  rows = jnp.asarray(rows)
  lse_d = _dense_lse(q, k, rows)
  qmod = None if modality is None else np.asarray(modality)[:, np.asarray(rows)]
  rec, den = [], []
  for c in cands:
    plan = c.policy.plan(q, k, modality)
    rec.append(_balanced_recall(jnp.exp(_sparse_lse(q, k, plan, rows) - lse_d), qmod))
    den.append(np.asarray(plan.head_density().mean(0), np.float64))
  return np.stack(rec), np.stack(den)


def recall_at_budget(recall: np.ndarray, density: np.ndarray, max_density: float) -> float:
  """A pattern's recall at exactly `max_density`, from its (density, recall) points at
  several budgets: piecewise linear between the budgets that bracket it, the best point
  under it when none is above, -inf when even the smallest budget costs more."""
  order = np.argsort(density)
  d, r = density[order], np.maximum.accumulate(recall[order])
  if d[0] > max_density:
    return -math.inf
  if d[-1] <= max_density:
    return float(r[-1])
  j = int(np.searchsorted(d, max_density, side="right"))  # d[j-1] <= D < d[j]
  w = (max_density - d[j - 1]) / max(d[j] - d[j - 1], 1e-12)
  return float(r[j - 1] + w * (r[j] - r[j - 1]))


def choose(
  recall: np.ndarray,
  density: np.ndarray,
  cands: Sequence[Candidate],
  max_density: float,
  tie: float,
) -> list[int]:
  """Per head, the index of the chosen candidate.

  Patterns are compared at the same cost: each pattern's recall at exactly
  `max_density` (`recall_at_budget` over its budgets). The best pattern wins, but a
  simpler one (`SIMPLICITY`) within `tie` of it is preferred. The head then gets that
  pattern's budget whose density is closest to `max_density`.
  """
  by_pattern: dict[str, list[int]] = {}
  for i, c in enumerate(cands):
    by_pattern.setdefault(c.pattern, []).append(i)
  out = []
  for h in range(recall.shape[1]):
    score = {
      p: recall_at_budget(recall[idx, h], density[idx, h], max_density)
      for p, idx in by_pattern.items()
    }
    best = max(score.values())
    if best == -math.inf:  # nothing fits the budget: the cheapest candidate
      out.append(int(np.argmin(density[:, h])))
      continue
    pattern = min((p for p in score if score[p] >= best - tie), key=SIMPLICITY.index)
    idx = by_pattern[pattern]
    out.append(min(idx, key=lambda i: (abs(density[i, h] - max_density), -recall[i, h])))
  return out


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  patterns: tuple[str, ...] = SIMPLICITY
  # (a grid's densest budget at 2.0 stays under 0.4 on the planted suite since its
  # sinks are columns: 4.0 lets every pattern reach the default budget)
  scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
  max_density: float = 0.4
  # (at 20a325f, 0.01 gave the planted 2D-boundary heads to grid, within 0.01 of their
  # recall once a grid's sinks were columns; since the grid estimate changed, f1b5bfa,
  # 0.005 and 0.01 both give 17 of 18: results/search_synthetic/sensitivity.md)
  tie: float = 0.005
  last_q: int = 64
  sample_blocks: int = 16
  block: int = 64
  seed: int = 0
  overrides: Any = None

  def __post_init__(self):
    if not 0 < self.max_density <= 1:
      raise ValueError(f"max_density must be in (0, 1], got {self.max_density}")
    if self.tie < 0:
      raise ValueError(f"tie must be >= 0, got {self.tie}")
    if self.last_q < 1 and self.sample_blocks < 1:
      raise ValueError("score some queries: last_q or sample_blocks must be >= 1")


def search(
  layers: Callable[[int], tuple] | Sequence[tuple],
  num_layers: int,
  cfg: SearchConfig,
  progress: bool = True,
  meta: Mapping | None = None,
) -> dict:
  """Searches every layer and head.

  Args:
    layers: per layer, (q [B, T, N, H], k [B, T, K, H], modality [B, T] or None), as a
      sequence or a function of the layer index (to compute them lazily).
    num_layers: how many layers.
    cfg: the search settings.
    progress: a progress bar over layers.
    meta: extra JSON-able fields for the table (model name, data, ...).

  Returns:
    The table JSON (`policies.table_from_json` reads its "layers"; `mminference`
    policies load it through `table_path`), with per head: pattern, scale, recall, density.
  """
  cands = candidates(cfg.patterns, cfg.scales, cfg.overrides)
  get = layers if callable(layers) else (lambda i: layers[i])
  table, heads = [], []
  for li in tqdm(range(num_layers), desc="search layers", disable=not progress):
    q, k, mod = get(li)
    rows = _scored_rows(q.shape[1], cfg.last_q, cfg.sample_blocks, cfg.block, cfg.seed + li)
    recall, density = score_candidates(q, k, mod, cands, rows)
    pick = choose(recall, density, cands, cfg.max_density, cfg.tie)
    table.append([cands[i].policy for i in pick])
    heads.append(
      [
        {
          "pattern": cands[i].pattern,
          "scale": cands[i].scale,
          "recall": round(float(recall[i, h]), 6),
          "density": round(float(density[i, h]), 6),
        }
        for h, i in enumerate(pick)
      ]
    )
  cfg_d = dataclasses.asdict(cfg)
  cfg_d["overrides"] = {k: dict(v) for k, v in (cfg.overrides or {}).items()}
  return policies.table_to_json(
    table,
    **dict(meta or {}),
    search_config=cfg_d,
    heads=heads,
    candidates=[c.label() for c in cands],
    date=datetime.datetime.now(datetime.UTC).date().isoformat(),
  )


def save_table(table_json: Mapping, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(table_json, f, indent=1, sort_keys=True)
    f.write("\n")


def pattern_counts(table_json: Mapping) -> dict[str, int]:
  out: dict[str, int] = {}
  for row in table_json["heads"]:
    for h in row:
      out[h["pattern"]] = out.get(h["pattern"], 0) + 1
  return dict(sorted(out.items()))


def mean_density(table_json: Mapping) -> float:
  d = [h["density"] for row in table_json["heads"] for h in row]
  return float(np.mean(d)) if d else math.nan


# ----------------------------------------------------------------------------------------
# calibration sources and the runner behind experiments/search_patterns.py
# ----------------------------------------------------------------------------------------
def synthetic_layers(layout, head_kinds, num_layers: int, seed: int, head_dim: int = 128):
  """The planted suite as calibration "layers" (one seed each): a function of the layer
  index -> (q, k, modality)."""
  from mmjax import synthetic

  def get(li):
    b = synthetic.make_batch(
      seed=seed + li, layout=layout, head_kinds=tuple(head_kinds), batch=1, head_dim=head_dim
    )
    return b.q, b.k, b.modality

  return get


def model_qkv(model, params, batch):
  """Per decoder layer (q [B, T, N, H], k, v [B, T, K, H]) of a dense prefill of `batch`
  (a processor output) through a `Qwen2_5_VL` model."""
  from mmjax.models.generate import check_batch
  from mmjax.models.qwen2_5_vl import vision_inputs

  check_batch(model, batch)
  dense = model.clone(policy=None, backend="xla")
  _, state = dense.apply(
    params,
    jnp.asarray(batch["input_ids"]),
    jnp.asarray(batch["position_ids"]),
    **vision_inputs(batch),
    method="calibration_qk",
    mutable=["calib"],
  )
  return [
    state["calib"][f"layers_{li}"]["self_attn"]["qkv"][0]
    for li in range(model.config.text.num_layers)
  ]


def model_layers(model, params, batch):
  """Per decoder layer (q, k, modality) of a dense prefill of `batch` through a
  `Qwen2_5_VL` model: a list, one entry per layer (the search's calibration)."""
  mod = jnp.asarray(batch["modality"])
  return [(q, k, mod) for q, k, _ in model_qkv(model, params, batch)]


def run(cfg, workdir: str | None = None, progress: bool = True) -> dict:
  """Runs the search of `cfg` (configs/search_patterns.py); writes pattern_table.json,
  table.md and (for the synthetic suite) the planted-pattern accuracy to the workdir."""
  scfg = SearchConfig(
    patterns=tuple(cfg.patterns),
    scales=tuple(cfg.scales),
    max_density=cfg.max_density,
    tie=cfg.tie,
    last_q=cfg.last_q,
    sample_blocks=cfg.sample_blocks,
    block=cfg.block_q,
    seed=cfg.seed,
    overrides={
      p: {"block_q": cfg.block_q, "block_k": cfg.block_k, **dict(cfg.policy_kwargs.get(p, {}))}
      for p in cfg.patterns
    },
  )
  planted = None
  if cfg.source == "synthetic":
    from mmjax import synthetic

    layout = synthetic.VideoLayout(**dict(cfg.layout))
    layers = synthetic_layers(layout, cfg.head_kinds, cfg.num_layers, cfg.seed)
    n_layers = cfg.num_layers
    planted = list(cfg.head_kinds)
    meta = {"model": "synthetic", "layout": dict(cfg.layout), "head_kinds": planted}
  elif cfg.source == "model":
    layers, meta = _model_source(cfg)
    n_layers = len(layers)
  else:
    raise ValueError(f"source={cfg.source!r}: use 'synthetic' or 'model'")
  table = search(layers, n_layers, scfg, progress=progress, meta=meta)
  if planted is not None:
    hits = [h["pattern"] == planted[i] for row in table["heads"] for i, h in enumerate(row)]
    table["planted_accuracy"] = float(np.mean(hits))
  if workdir:
    save_table(table, os.path.join(workdir, "pattern_table.json"))
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(format_table(table) + "\n")
  if cfg.save_to:
    save_table(table, cfg.save_to)
  return table


def _model_source(cfg):
  from mmjax.models import checkpoint, processing
  from mmjax.models.answer import load_frames
  from mmjax.models.qwen2_5_vl import Qwen2_5_VL

  if not cfg.checkpoint:
    raise ValueError("source='model' needs --config.checkpoint (a Qwen2.5-VL checkpoint dir)")
  config, params = checkpoint.load_hf_checkpoint(cfg.checkpoint, dtype=jnp.dtype(cfg.dtype))
  proc = processing.Processor.from_dir(cfg.checkpoint)
  if cfg.video:
    frames = load_frames(cfg.video)
  else:  # seeded random frames: a structure-free calibration clip
    rng = np.random.default_rng(cfg.seed)
    frames = rng.integers(0, 256, (cfg.frames, *cfg.frame_size, 3), dtype=np.uint8)
  batch = proc(processing.chat_prompt(cfg.question, videos=1), videos=[frames], video_fps=cfg.fps)
  model = Qwen2_5_VL(config, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.dtype))
  layers = model_layers(model, params, batch)
  meta = {
    "model": os.path.basename(os.path.normpath(cfg.checkpoint)),
    "calibration": {"video": cfg.video or "random", "tokens": int(batch["input_ids"].shape[1])},
  }
  return layers, meta


def format_table(table: Mapping) -> str:
  lines = [
    f"model: {table.get('model')}; candidates: {', '.join(table['candidates'])}",
    f"budget: max_density={table['search_config']['max_density']}, "
    f"tie={table['search_config']['tie']}; mean density {mean_density(table):.3f}; "
    f"patterns {pattern_counts(table)}",
  ]
  if "planted_accuracy" in table:
    lines.append(f"planted-pattern accuracy: {table['planted_accuracy']:.3f}")
  lines += [
    "",
    "| layer | head | pattern | scale | recall | density |",
    "|---|---|---|---|---|---|",
  ]
  for li, row in enumerate(table["heads"]):
    for h, e in enumerate(row):
      lines.append(
        f"| {li} | {h} | {e['pattern']} | {e['scale']:g} | {e['recall']:.4f} | {e['density']:.3f} |"
      )
  return "\n".join(lines)
