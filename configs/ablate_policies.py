"""Ablation of every policy on the built-in synthetic VLM suite (CPU is enough).

Hypothesis: each policy keeps most of the attention mass of the heads it is made for, and
the per-head `mminference` choice keeps it for every head at a fraction of dense cost.

  python experiments/ablate.py --config=configs/ablate_policies.py --workdir=/tmp/mmjax_ablate
  python experiments/ablate.py --config=configs/ablate_policies.py:smoke
  python experiments/ablate.py --config=configs/ablate_policies.py \
      --config.policy_kwargs.a_shape.local_tokens=512

Args: "" (the default: 24 frames of 16x16 patches + text, T = 6656) or "smoke" (tiny).
"""

import ml_collections

from mmjax import search, sweep, synthetic

POLICIES = (
  "dense",
  "a_shape",
  "vertical_slash",
  "block_sparse",
  "grid",
  "q_boundary",
  "2d_boundary",
  "mminference",
)


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/ablate_policies.py: unknown arg {arg!r}; use '' or 'smoke'")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.backend = "xla"
  c.dtype = "float32"
  c.batch = 1
  c.head_dim = 128
  c.head_kinds = tuple(synthetic.HEAD_KINDS)
  c.policies = tuple(POLICIES)
  c.layout = ml_collections.ConfigDict(
    dict(frames=24, height=16, width=16, text_prefix=64, text_between=16, text_suffix=64)
  )
  # per-policy keyword overrides; mminference's table "oracle" = each planted head's own
  # policy (what the offline search should find on this suite).
  c.policy_kwargs = ml_collections.ConfigDict(
    {name: ml_collections.ConfigDict({}) for name in POLICIES}
  )
  c.policy_kwargs.mminference = ml_collections.ConfigDict({"table": "oracle"})
  # the budget fields, at their defaults, so `--config.policy_kwargs.<p>.<field>=` works
  for name, fields in search.BUDGET_FIELDS.items():
    sweep.add_policy_defaults(c, name, *fields)
  # the grid estimate's options, e.g. the estimate before 1e0ef2f:
  # --config.policy_kwargs.grid.stride_norm=all --config.policy_kwargs.grid.pool_tokens=0
  sweep.add_policy_defaults(c, "grid", "stride_norm", "pool_tokens")
  # attention maps with the plan's mask, before and after the permutation (the paper's
  # grid and boundary figures): the grid head under grid, the 2D-boundary head under it.
  kinds = list(c.head_kinds)
  c.attention_maps = (
    {"policy": "grid", "heads": (kinds.index("grid"),)},
    {"policy": "2d_boundary", "heads": (kinds.index("2d_boundary"), kinds.index("q_boundary"))},
  )
  if arg == "smoke":
    c.layout.update(frames=4, height=8, width=8, text_prefix=32, text_between=8, text_suffix=32)
  return c
