"""Sparsity policies: frozen, hashable dataclasses (static under jit) that build a SparsePlan.

    policy = mmjax.policies.get("vertical_slash", vertical_size=512)
    plan = policy.plan(q, k, modality)      # q [B, T, N, H], k [B, S, K, H], modality [B, S]

Names: dense, a_shape, vertical_slash, block_sparse, grid, q_boundary, 2d_boundary,
mminference. Budgets are in tokens (or key blocks for top-k). From MInference's
vertical-slash estimate: last_q 64 queries, softmax, the first 30 keys always among the
vertical picks, blocks of 64. MInference always keeps the 100 nearest diagonals; mmjax's
default keeps 64 (one block diagonal) because its default slash budget (128) is sized for
tens of thousands of tokens, where every extra diagonal costs a whole block diagonal.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import planning, planning_lists
from mmjax.plan import SparsePlan

TEXT, VISION = 0, 1


# ----------------------------------------------------------------------------------------
# validation shared by plan() and the attention entry point
# ----------------------------------------------------------------------------------------
def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_qk(q, k, modality=None, v=None):
  """Raises ValueError for malformed prefill inputs. Returns (B, T, N, K, H)."""
  if getattr(q, "ndim", None) != 4:
    raise ValueError(f"q must be [B, T, N, H] (rank 4), got shape {getattr(q, 'shape', None)}")
  if getattr(k, "ndim", None) != 4:
    raise ValueError(f"k must be [B, S, K, H] (rank 4), got shape {getattr(k, 'shape', None)}")
  b, t, n, h = q.shape
  bk, s, kh, hk = k.shape
  if bk != b:
    raise ValueError(f"batch mismatch: q has B={b}, k has B={bk}")
  if s != t:
    raise ValueError(f"prefill is causal self-attention: need T == S, got T={t}, S={s}")
  if hk != h:
    raise ValueError(f"head_dim mismatch: q has H={h}, k has H={hk}")
  if kh == 0 or n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh} (GQA)")
  if t == 0:
    raise ValueError("empty sequence: T must be >= 1")
  if v is not None and tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
  if modality is not None:
    if getattr(modality, "ndim", None) != 2 or tuple(modality.shape) != (b, s):
      raise ValueError(
        f"modality must be [B, S] = {(b, s)} int ids (0 text, 1 vision), "
        f"got shape {getattr(modality, 'shape', None)}"
      )
    if not jnp.issubdtype(modality.dtype, jnp.integer):
      raise ValueError(f"modality must be an integer array, got dtype {modality.dtype}")
    if _is_concrete(modality) and bool(jnp.any(modality < 0)):
      raise ValueError("modality ids must be >= 0 (0 text, 1 vision, more ids allowed)")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x is not None and _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"{name} contains NaN or Inf")
  return b, t, n, kh, h


# ----------------------------------------------------------------------------------------
# the policies
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
  """Base class. Subclasses set `name` and their budget fields."""

  name: ClassVar[str] = ""
  block_q: int = 64
  block_k: int = 64
  # plan this many heads at a time (0: all at once); bounds the planner's memory, which
  # holds [nQ, nK] matrices per head in flight. Does not change the plan.
  heads_per_step: int = 0

  def __post_init__(self):
    for f in ("block_q", "block_k"):
      val = getattr(self, f)
      if not isinstance(val, int) or val <= 0 or val & (val - 1):
        raise ValueError(f"{self.name}: {f} must be a positive power of two, got {val!r}")
    if not isinstance(self.heads_per_step, int) or self.heads_per_step < 0:
      raise ValueError(
        f"{self.name}: heads_per_step must be an int >= 0, got {self.heads_per_step!r}"
      )

  # --- what subclasses describe --------------------------------------------------------
  def layout(self) -> planning.Layout:
    return planning.Layout("none")

  def components(self) -> tuple[planning.Component, ...]:
    return (planning.Component(None, None, self),)

  def max_blocks(self, n_k: int) -> int:
    """Static bound on the key blocks a query block keeps (self blocks included)."""
    raise NotImplementedError

  def max_cols(self) -> int:
    return 0

  def _self_blocks(self) -> int:
    return -(-self.block_q // self.block_k) + 1

  # --- building the plan ---------------------------------------------------------------
  def plan(self, q, k, modality=None, *, planner: str = "lists") -> SparsePlan:
    """Builds the plan for q [B, T, N, H], k [B, S, K, H], modality [B, S] or None.

    Checks the inputs (NaN only when they are concrete, i.e. outside a caller's jit), then
    runs the jitted planner: a second input of the same shapes does not retrace.
    planner: "lists" (per-query-block candidate lists; the default) or "dense" (the
    reference: dense [nQ, nK] priorities). Both give the same plan.
    """
    b, t, _, _, _ = check_qk(q, k, modality)
    if planner not in PLANNERS:
      raise ValueError(f"planner must be one of {sorted(PLANNERS)}, got {planner!r}")
    if modality is None:
      modality = jnp.zeros((b, t), jnp.int32)
    # the planner's kernel settings are part of the jit key: a plan traced with one is
    # not reused after they change (tests switch them)
    key = (*planning.kernel_settings(), SHARE_K_POOLS)
    return _plan_jit(self, q, k, modality.astype(jnp.int32), planner, key)

  def full_budget(self, seq_len: int) -> Policy:
    """The same policy with budgets large enough to reproduce dense attention."""
    raise NotImplementedError


# the per-head planners: candidate lists (default) and the dense reference
PLANNERS = {"lists": planning_lists.head_plan, "dense": planning.head_plan}

# the names of the (batch, head) axes the per-head planner is vmapped over
_PLAN_AXES = ("plan_batch", "plan_head")
# Pool a kv head's keys once for all its query heads where the key view is the same for
# each (`planning.shared_k_selectors`); tests turn it off to compare. The same plans.
SHARE_K_POOLS = True


def _plan_impl(policy: Policy, q, k, modality, planner="lists", kernel_settings=None):
  del kernel_settings  # only a jit key: the planner reads planning's settings when traced
  b, t, n, kh, h = q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]
  length = planning.padded_length(t, policy.block_q, policy.block_k)
  pad = length - t
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    modality = jnp.pad(modality, ((0, 0), (0, pad)), constant_values=-1)
  head_specs = policy.head_policies(n) if isinstance(policy, MMInference) else (policy,) * n
  n_k = length // policy.block_k
  mb = max(min(p.max_blocks(n_k), n_k) for p in head_specs)
  mc = max(min(p.max_cols(), length) for p in head_specs)
  scale = 1.0 / math.sqrt(h)
  group = n // kh

  view_kw = dict(seq_len=t, block_q=policy.block_q, block_k=policy.block_k, scale=scale)
  b_ids = jnp.arange(b, dtype=jnp.int32)
  # the views' group sorts, once per batch row rather than per head and step of heads
  layouts = {p.layout() for p in head_specs}
  modality = jax.vmap(
    functools.partial(
      planning.modality_row,
      seq_len=t,
      by_modality=any(lay.group != "none" for lay in layouts),
      whole=any(lay.group == "none" and lay.grid_groups for lay in layouts),
      axis_names=_PLAN_AXES[:1],
    ),
    axis_name=_PLAN_AXES[0],
  )(modality)

  def k_pools(spec):
    # the pooled keys of each (batch, kv head), when every query head of a kv head would
    # pool the same ones: computed once here, not once per query head
    if (
      group == 1
      or not SHARE_K_POOLS
      or not planning.shared_k_selectors(spec.layout(), spec.components())
    ):
      return None

    def one(b_id, kv_id, mod):
      src = planning.HeadSource(k, b_id, kv_id)
      return planning.shared_k_pools(spec.layout(), spec.components(), src, mod, **view_kw)

    kv_ids = jnp.arange(kh, dtype=jnp.int32)
    return jax.vmap(jax.vmap(one, (None, 0, None)), (0, None, 0))(b_ids, kv_ids, modality)

  def run(spec, pools, b_id, q_id, kv_id, mod):
    # each head is cut to its own policy's bounds (so an mminference head's plan does not
    # depend on the other heads of its table), then padded to the plan's (MB, MC).
    # q and k stay whole: the head's rows are read in place (planning.HeadSource).
    out = PLANNERS[planner](
      spec.layout(),
      spec.components(),
      planning.HeadSource(q, b_id, q_id),
      planning.HeadSource(k, b_id, kv_id),
      mod,
      max_blocks=min(spec.max_blocks(n_k), n_k),
      max_cols=min(spec.max_cols(), length),
      axis_names=_PLAN_AXES,
      k_pooled=jax.tree_util.tree_map(lambda x: x[b_id, kv_id], pools),
      **view_kw,
    )
    for key, size in (("block_idx", mb), ("col_idx", mc)):
      extra = size - out[key].shape[-1]
      out[key] = jnp.pad(out[key], ((0, 0), (0, extra))) if extra else out[key]
    if out["q_perm"] is None:
      out["q_perm"] = jnp.arange(length, dtype=jnp.int32)
    if out["k_perm"] is None:
      out["k_perm"] = jnp.arange(length, dtype=jnp.int32)
    return out

  identity = all(p.layout() == planning.Layout("none") for p in head_specs)
  q_only = all(p.layout().group == "q" for p in head_specs)
  keys = ["block_idx", "block_count", "col_idx", "col_count"]
  keys += [] if identity else ["q_perm"] if q_only else ["q_perm", "k_perm"]
  # heads grouped by spec (static); each group vmapped over (batch, head).
  by_spec: dict[Policy, list[int]] = {}
  for i, spec in enumerate(head_specs):
    by_spec.setdefault(spec, []).append(i)
  per_step = policy.heads_per_step
  stepped = bool(per_step) and any(len(hs) > per_step for hs in by_spec.values())
  head_aux = [None] * n  # each head's aux entries, [B] each
  groups, order = [], []  # (without steps) each group's plan [B, n_g, ...] and its heads
  bufs = None  # (with steps) the plan [B, N, ...], each step writing its heads
  for spec, heads in by_spec.items():
    f = jax.vmap(
      jax.vmap(
        functools.partial(run, spec, k_pools(spec)),
        in_axes=(None, 0, 0, None),
        axis_name=_PLAN_AXES[1],
      ),
      (0, None, None, 0),
      axis_name=_PLAN_AXES[0],
    )
    if stepped:
      if bufs is None:  # (run's outputs, per head)
        n_q = length // policy.block_q
        shapes = dict(block_idx=(n_q, mb), block_count=(n_q,), col_idx=(n_q, mc))
        shapes |= dict(col_count=(n_q,), q_perm=(length,), k_perm=(length,))
        bufs = {key: jnp.zeros((b, n, *shapes[key]), jnp.int32) for key in keys}
      bufs, aux_g = _map_head_steps(f, np.asarray(heads), group, modality, per_step, bufs)
    else:
      hs = jnp.asarray(heads, jnp.int32)
      out = f(b_ids, hs, hs // group, modality)
      groups.append({key: out[key] for key in keys})
      order.extend(heads)
      aux_g = out["aux"]
    for j, hd in enumerate(heads):
      head_aux[hd] = {key: x[:, j] for key, x in aux_g.items()}

  if not stepped:
    inv = np.argsort(np.asarray(order))  # the head axis in group order -> in head order
    # one gather of whole [nQ, MB] rows per head; a stack of the heads' slices moved the
    # same bytes 2.4x slower (an mminference plan at 1M on an H200: 2.27 -> 0.95 ms)
    cat = {key: jnp.concatenate([g[key] for g in groups], axis=1) for key in keys}
    same = np.array_equal(inv, np.arange(n))
    bufs = {key: x if same else jnp.take(x, inv, axis=1) for key, x in cat.items()}

  aux = {}
  for key in sorted({key for a in head_aux for key in a}):  # heads without it report -1
    aux[key] = jnp.stack([a.get(key, jnp.full((b,), -1, jnp.int32)) for a in head_aux], axis=1)
  return SparsePlan(
    block_idx=bufs["block_idx"],
    block_count=bufs["block_count"],
    col_idx=bufs["col_idx"],
    col_count=bufs["col_count"],
    q_perm=bufs.get("q_perm"),
    k_perm=bufs.get("k_perm"),
    aux=aux,
    seq_len=t,
    block_q=policy.block_q,
    block_k=policy.block_k,
  )


def _map_head_steps(f, heads, group, modality, per_step, bufs):
  """f(batch ids [B], query head ids [s], kv head ids [s], modality: a pytree of [B, ...]
  leaves) over the query heads `heads`, `per_step` heads at a time (lax.scan) to bound
  memory, each step writing its heads' plans into bufs {key: [B, N, ...]} in place.
  Returns (bufs, f's aux leaves as [B, n_g, ...]).

  Writing into the whole plan saves a pass over it: stacking the steps' outputs and then
  gathering the heads into order moved every byte twice. f reads each head's q and k
  rows in place (the planner's kernels take the whole [B, L, N, H] arrays and a (batch,
  head) index); slicing every head out first cost a pass over q and k per query head
  (4.5 ms at 1M tokens, 28 heads, on an H200).
  """
  n_g = len(heads)
  per_step = min(per_step, n_g)  # (a small group: one step of its own heads)
  b_ids = jnp.arange(jax.tree_util.tree_leaves(modality)[0].shape[0], dtype=jnp.int32)
  chunks = -(-n_g // per_step)
  padded = np.resize(heads, chunks * per_step)  # repeats heads to fill the last step
  ids = jnp.asarray(padded.reshape(chunks, per_step), jnp.int32)

  def step(bufs, hs):  # hs [per_step] head ids (a repeated head writes the same plan)
    out = f(b_ids, hs, hs // group, modality)
    bufs = dict(bufs)
    for key in bufs:
      for j in range(per_step):
        bufs[key] = jax.lax.dynamic_update_index_in_dim(bufs[key], out[key][:, j], hs[j], 1)
    return bufs, out["aux"]

  bufs, aux = jax.lax.scan(step, bufs, ids)

  def merge(x):  # [chunks, B, per_step] -> [B, n_g]
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], chunks * per_step, *x.shape[3:])[:, :n_g]

  return bufs, jax.tree_util.tree_map(merge, aux)


_plan_jit = jax.jit(_plan_impl, static_argnums=(0, 4, 5))


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
  """Every causal block: the baseline, as a plan like the others."""

  name: ClassVar[str] = "dense"

  def max_blocks(self, n_k):
    return n_k

  def full_budget(self, seq_len):
    return self


@dataclasses.dataclass(frozen=True)
class AShape(Policy):
  """Attention sinks (the first `sink_tokens` keys) plus a local window of `local_tokens`."""

  name: ClassVar[str] = "a_shape"
  sink_tokens: int = 128
  local_tokens: int = 1024

  def max_blocks(self, n_k):
    return (
      -(-self.sink_tokens // self.block_k)
      + -(-(self.local_tokens + self.block_q) // self.block_k)
      + 2
    )

  def full_budget(self, seq_len):
    return dataclasses.replace(self, local_tokens=seq_len)


@dataclasses.dataclass(frozen=True)
class VerticalSlash(Policy):
  """MInference's vertical-slash: from the last `last_q` queries' attention, the top
  `vertical_size` key columns and the top `slash_size` diagonals. The first `keep_first`
  keys and the `keep_local` nearest diagonals are always kept (and count in the budgets).
  Slash lines are run as key blocks, columns as single keys. Every selected diagonal
  costs a whole diagonal of key blocks, so the default slash budget is small;
  MInference's searched 128k budgets go up to thousands of diagonals, most of them next
  to the main one."""

  name: ClassVar[str] = "vertical_slash"
  last_q: int = 64
  vertical_size: int = 512
  slash_size: int = 128
  keep_first: int = 30
  keep_local: int = 64

  def max_blocks(self, n_k):
    per_line = -(-self.block_q // self.block_k) + 1
    return self.slash_size * per_line + self._self_blocks()

  def max_cols(self):
    return self.vertical_size

  def full_budget(self, seq_len):
    return dataclasses.replace(self, vertical_size=seq_len, slash_size=seq_len)


@dataclasses.dataclass(frozen=True)
class BlockSparse(Policy):
  """Top `top_k_blocks` key blocks per query block by mean-pooled q . k (+ the diagonal)."""

  name: ClassVar[str] = "block_sparse"
  top_k_blocks: int = 32

  def max_blocks(self, n_k):
    return self.top_k_blocks + self._self_blocks()

  def full_budget(self, seq_len):
    return dataclasses.replace(self, top_k_blocks=-(-seq_len // self.block_k))


@dataclasses.dataclass(frozen=True)
class Grid(Policy):
  """Video grid: lines every `stride` tokens (a frame, or a row of patches).

  The stride is estimated online (unless `stride` > 0) from the last `last_q` queries of
  `modality` (vision; any query when the input has none, or with modality=-1): the
  candidate in [min_stride, max_stride] whose first multiples stand out most from the
  diagonals half-way between them. Queries and keys are permuted by (index mod stride)
  so the grid lines become a band along the diagonal; the plan keeps that band
  (`band_tokens` wide in the permuted order), the first `sink_tokens` (as single key
  columns: the permutation scatters them over up to `sink_tokens` key blocks), and the
  `top_k_blocks` best pooled blocks.

  stride_norm: how the estimate's last queries are softmaxed. "all": over every key
  they see, as for the vertical-slash estimate. "window": over the keys the estimate
  looks at, those within its largest offset (about 4.5 max_stride) before the
  earliest of those queries; the rest of the sequence is never read. Rows are weighted
  by their local mass instead of their mass over all keys. The planted suite's grid and
  2D-boundary heads get the same strides, 16k-128k (`results/grid_estimate_cost_cpu/`),
  and at 1M tokens the estimate reads 2% of the keys.

  pool_tokens: the pooled query and key means that score blocks for `top_k_blocks` are
  over at most pool_tokens evenly spaced tokens of each block (view order; 0: every
  token), so pooling reads a fraction of q and k (blocks 128 x 64, 16 tokens: 1/8 of q,
  1/4 of k). In a grid-permuted block the tokens are one patch in consecutive frames,
  so a sample of them stands for the block. It holds for the whole view: a 2D boundary
  with a grid pair samples its other pairs' means too. A block with real tokens, none
  of them sampled, gets a zero mean (score 0).
  """

  name: ClassVar[str] = "grid"
  last_q: int = 64
  modality: int = 1
  stride: int = 0
  min_stride: int = 16
  max_stride: int = 4096
  band_tokens: int = 512
  sink_tokens: int = 64
  top_k_blocks: int = 8
  stride_norm: str = "window"
  pool_tokens: int = 16

  STRIDE_NORMS: ClassVar[tuple[str, ...]] = ("window", "all")

  def __post_init__(self):
    super().__post_init__()
    if self.stride_norm not in self.STRIDE_NORMS:
      raise ValueError(
        f"grid: stride_norm must be one of {self.STRIDE_NORMS}, got {self.stride_norm!r}"
      )
    n = self.pool_tokens
    if not isinstance(n, int) or n < 0 or (n and (n < 16 or n & (n - 1))):
      raise ValueError(
        f"grid: pool_tokens must be 0 (every token) or a power of two >= 16, got {n!r}"
      )

  def layout(self):
    return planning.Layout("none", ((-1, self),))

  def max_blocks(self, n_k):
    band = -(-(self.band_tokens + self.block_q) // self.block_k) + 2
    return band + self.top_k_blocks + self._self_blocks()

  def max_cols(self):
    return self.sink_tokens

  def full_budget(self, seq_len):
    return dataclasses.replace(self, band_tokens=seq_len, top_k_blocks=-(-seq_len // self.block_k))


SIMPLE = {c.name: c for c in (Dense, AShape, VerticalSlash, BlockSparse, Grid)}


def _as_policy(spec, where, block_q, block_k) -> Policy:
  """A sub-pattern given as a Policy, a name, or {"name": ..., **kwargs}."""
  if isinstance(spec, Policy):
    p = spec
  elif isinstance(spec, str):
    p = get(spec)
  elif isinstance(spec, Mapping):
    d = dict(spec)
    if "name" not in d:
      raise ValueError(f"{where}: a pattern dict needs a 'name' key, got {sorted(d)}")
    p = get(d.pop("name"), **d)
  else:
    raise ValueError(f"{where}: expected a policy, a name or a dict, got {spec!r}")
  if (p.block_q, p.block_k) == (Policy.block_q, Policy.block_k):
    p = dataclasses.replace(p, block_q=block_q, block_k=block_k)  # sub-patterns inherit
  if (p.block_q, p.block_k) != (block_q, block_k):
    raise ValueError(
      f"{where}: block sizes ({p.block_q}, {p.block_k}) must equal the parent's "
      f"({block_q}, {block_k})"
    )
  return p


@dataclasses.dataclass(frozen=True)
class QBoundary(Policy):
  """Q-boundary: queries grouped by modality (stable), keys in original order; each query
  modality has its own pattern over all keys. `patterns` maps modality id -> pattern (one
  of dense, a_shape, vertical_slash, block_sparse); `default` serves other ids."""

  name: ClassVar[str] = "q_boundary"
  patterns: Any = ((TEXT, VerticalSlash()), (VISION, VerticalSlash()))
  default: Any = BlockSparse()
  allowed: ClassVar[tuple[str, ...]] = ("dense", "a_shape", "vertical_slash", "block_sparse")

  def __post_init__(self):
    super().__post_init__()
    items = self.patterns.items() if isinstance(self.patterns, Mapping) else self.patterns
    pats = []
    for m, spec in items:
      p = _as_policy(spec, f"q_boundary.patterns[{m}]", self.block_q, self.block_k)
      if p.name not in self.allowed:
        raise ValueError(
          f"q_boundary.patterns[{m}]: {p.name!r} needs permuted keys; use one of "
          f"{self.allowed} (or 2d_boundary for grid)"
        )
      pats.append((int(m), p))
    object.__setattr__(self, "patterns", tuple(sorted(pats, key=lambda x: x[0])))
    d = _as_policy(self.default, "q_boundary.default", self.block_q, self.block_k)
    if d.name not in self.allowed:
      raise ValueError(f"q_boundary.default: use one of {self.allowed}, got {d.name!r}")
    object.__setattr__(self, "default", d)

  def layout(self):
    return planning.Layout("q")

  def components(self):
    comps = [planning.Component(m, None, p) for m, p in self.patterns]
    # query rows of any other modality id take the default pattern.
    known = tuple(m for m, _ in self.patterns)
    comps.append(planning.Component(planning.OtherThan(known), None, self.default))
    return tuple(comps)

  def max_blocks(self, n_k):
    return sum(p.max_blocks(n_k) for _, p in self.patterns) + self.default.max_blocks(n_k)

  def max_cols(self):
    return sum(p.max_cols() for _, p in self.patterns) + self.default.max_cols() + self.block_q

  def full_budget(self, seq_len):
    return dataclasses.replace(
      self,
      patterns=tuple((m, p.full_budget(seq_len)) for m, p in self.patterns),
      default=self.default.full_budget(seq_len),
    )


@dataclasses.dataclass(frozen=True)
class TwoDBoundary(Policy):
  """2D-boundary: queries and keys grouped by modality (the same permutation), a pattern
  per (query modality, key modality) pair. Intra-modality pairs may use any simple
  pattern (grid permutes that modality's group by its own stride); cross-modality pairs
  use block_sparse or dense. Pairs of named ids not listed use `cross` (cross-modality) or
  `default` (intra); queries or keys of ids never named use `cross`."""

  name: ClassVar[str] = "2d_boundary"
  patterns: Any = (
    ((TEXT, TEXT), VerticalSlash()),
    ((VISION, VISION), Grid()),
    ((TEXT, VISION), BlockSparse(top_k_blocks=8)),
    ((VISION, TEXT), BlockSparse(top_k_blocks=8)),
  )
  default: Any = AShape()
  cross: Any = BlockSparse(top_k_blocks=8)
  cross_allowed: ClassVar[tuple[str, ...]] = ("dense", "block_sparse")

  def __post_init__(self):
    super().__post_init__()
    items = self.patterns.items() if isinstance(self.patterns, Mapping) else self.patterns
    pats = []
    for pair, spec in items:
      if isinstance(pair, str):
        pair = tuple(int(x) for x in pair.split(","))
      qm, km = (int(x) for x in pair)
      p = _as_policy(spec, f"2d_boundary.patterns[{qm},{km}]", self.block_q, self.block_k)
      if qm != km and p.name not in self.cross_allowed:
        raise ValueError(
          f"2d_boundary.patterns[{qm},{km}]: cross-modality pairs take one of "
          f"{self.cross_allowed}, got {p.name!r}"
        )
      pats.append(((qm, km), p))
    object.__setattr__(self, "patterns", tuple(sorted(pats, key=lambda x: x[0])))
    d = _as_policy(self.default, "2d_boundary.default", self.block_q, self.block_k)
    if d.name == "grid":
      raise ValueError("2d_boundary.default: grid must be listed per modality pair")
    object.__setattr__(self, "default", d)
    c = _as_policy(self.cross, "2d_boundary.cross", self.block_q, self.block_k)
    if c.name not in self.cross_allowed:
      raise ValueError(f"2d_boundary.cross: use one of {self.cross_allowed}, got {c.name!r}")
    object.__setattr__(self, "cross", c)

  def layout(self):
    grids = tuple((qm, p) for (qm, km), p in self.patterns if p.name == "grid")
    return planning.Layout("both", grids)

  def components(self):
    comps = [planning.Component(qm, km, p) for (qm, km), p in self.patterns]
    listed = {pair for pair, _ in self.patterns}
    ids = tuple(sorted({m for pair in listed for m in pair}))
    other = planning.OtherThan(ids)
    for qm in ids:  # pairs of named ids that are not listed
      for km in ids:
        if (qm, km) not in listed:
          comps.append(planning.Component(qm, km, self.default if qm == km else self.cross))
    # ids never named: their queries take `cross` over every key, and the named ids'
    # queries take `cross` over their keys (two components, not one per id pair: each
    # costs a pass over q and k).
    comps.append(planning.Component(other, None, self.cross))
    comps.append(planning.Component(planning.OtherThan(()), other, self.cross))
    return tuple(comps)

  def _all(self):
    return [p for _, p in self.patterns] + [self.default, self.cross]

  def max_blocks(self, n_k):
    return sum(p.max_blocks(n_k) for p in self._all())

  def max_cols(self):
    return sum(p.max_cols() for p in self._all())

  def full_budget(self, seq_len):
    return dataclasses.replace(
      self,
      patterns=tuple((pair, p.full_budget(seq_len)) for pair, p in self.patterns),
      default=self.default.full_budget(seq_len),
      cross=self.cross.full_budget(seq_len),
    )


# ----------------------------------------------------------------------------------------
# mminference: a searched per-layer / per-head table
# ----------------------------------------------------------------------------------------
def policy_to_dict(p: Policy) -> dict:
  d = {"name": p.name}
  for f in dataclasses.fields(p):
    val = getattr(p, f.name)
    if isinstance(p, QBoundary | TwoDBoundary) and f.name in ("patterns",):
      val = [[list(m) if isinstance(m, tuple) else m, policy_to_dict(s)] for m, s in val]
    elif isinstance(val, Policy):
      val = policy_to_dict(val)
    d[f.name] = val
  return d


def policy_from_dict(d: Mapping) -> Policy:
  d = dict(d)
  if "name" not in d:
    raise ValueError(f"a policy dict needs a 'name' key, got keys {sorted(d)}")
  name = d.pop("name")
  if name in ("q_boundary", "2d_boundary"):
    if "patterns" in d:
      d["patterns"] = tuple(
        (tuple(m) if isinstance(m, list) else m, policy_from_dict(s)) for m, s in d["patterns"]
      )
    for key in ("default", "cross"):
      if key in d and isinstance(d[key], Mapping):
        d[key] = policy_from_dict(d[key])
  return get(name, **d)


@dataclasses.dataclass(frozen=True)
class MMInference(Policy):
  """Per-head patterns from a searched table: `table[layer][head]` is a policy (any name
  but mminference). Give `table` (a tuple of tuples of policies, or what `load_table`
  reads) or `table_path` (a JSON file written by the search), and the `layer`."""

  name: ClassVar[str] = "mminference"
  table: Any = None
  table_path: str = ""
  layer: int = 0

  def __post_init__(self):
    super().__post_init__()
    table = self.table
    if table is None:
      if not self.table_path:
        raise ValueError("mminference: give `table` or `table_path` (a searched pattern JSON)")
      table = load_table(self.table_path)
    if isinstance(table, Mapping):
      table = table_from_json(table)
    rows = []
    for li, row in enumerate(table):
      rows.append(
        tuple(
          _as_policy(
            s if not isinstance(s, Mapping) else policy_from_dict(s),
            f"mminference.table[{li}][{hi}]",
            self.block_q,
            self.block_k,
          )
          for hi, s in enumerate(row)
        )
      )
    if not rows:
      raise ValueError("mminference: the table has no layers")
    for row in rows:
      for p in row:
        if isinstance(p, MMInference):
          raise ValueError("mminference: a table entry cannot itself be mminference")
    if not 0 <= self.layer < len(rows):
      raise ValueError(f"mminference: layer={self.layer} but the table has {len(rows)} layers")
    object.__setattr__(self, "table", tuple(rows))

  def head_policies(self, n: int) -> tuple[Policy, ...]:
    row = self.table[self.layer]
    if len(row) != n:
      raise ValueError(f"mminference: table layer {self.layer} has {len(row)} heads, q has {n}")
    return row

  def for_layer(self, layer: int) -> MMInference:
    return dataclasses.replace(self, layer=layer)

  def for_heads(self, start: int, count: int) -> MMInference:
    """The table restricted to heads [start, start + count) of every layer (a device's
    head chunk in sharded attention)."""
    for li, row in enumerate(self.table):
      if not 0 <= start < start + count <= len(row):
        raise ValueError(
          f"mminference: heads [{start}, {start + count}) are outside table layer {li}, "
          f"which has {len(row)} heads"
        )
    table = tuple(row[start : start + count] for row in self.table)
    return dataclasses.replace(self, table=table, table_path="")

  def max_blocks(self, n_k):
    return max(p.max_blocks(n_k) for p in self.table[self.layer])

  def max_cols(self):
    return max(p.max_cols() for p in self.table[self.layer])

  def full_budget(self, seq_len):
    return dataclasses.replace(
      self, table=tuple(tuple(p.full_budget(seq_len) for p in row) for row in self.table)
    )


def table_to_json(table, **meta) -> dict:
  """A JSON-able dict of a pattern table (policies per layer and head) plus metadata."""
  return dict(meta, layers=[[policy_to_dict(p) for p in row] for row in table])


def table_from_json(d: Mapping) -> tuple:
  if "layers" not in d:
    raise ValueError(f"a pattern table JSON needs a 'layers' list, got keys {sorted(d)}")
  return tuple(tuple(policy_from_dict(h) for h in row) for row in d["layers"])


def load_table(path: str) -> tuple:
  if not os.path.exists(path):
    raise ValueError(f"mminference: table_path {path!r} does not exist")
  with open(path) as f:
    return table_from_json(json.load(f))


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Policy]] = {
  **SIMPLE,
  "q_boundary": QBoundary,
  "2d_boundary": TwoDBoundary,
  "mminference": MMInference,
}


def names() -> list[str]:
  """The policy names `get` accepts."""
  return list(_REGISTRY)


def get(name: str, **kwargs) -> Policy:
  """The policy `name` with budgets overridden by kwargs (unknown keys raise)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown policy {name!r}; known: {names()}")
  cls = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"policy {name!r} has no option(s) {unknown}; options: {sorted(fields)}")
  return cls(**kwargs)
