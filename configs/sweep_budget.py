"""Sweep: policy x budget x length x seed on the synthetic VLM suite (the ablate runner).

Hypothesis: each policy's recall rises with its budget and saturates well below full
density; at a fixed budget in tokens or blocks the density falls as the input grows, and
the output error grows with length, faster for the fixed-shape policies (a_shape,
vertical_slash) than for the ones that pick blocks from the input (block_sparse, grid).
Two seeds show how much of a difference is noise. Every item holds all six planted heads,
so `recall` averages over heads the policy is not made for; `min_head_recall` is the worst.

  python experiments/sweep.py --config=configs/sweep_budget.py --workdir=workdirs/sweep_budget
  python experiments/report.py --workdir=workdirs/sweep_budget
  python experiments/sweep.py --config=configs/sweep_budget.py:smoke --workdir=/tmp/sweep_smoke

Args: "" (4 policies x 3 budgets x 8/16/32 frames of 16x16 patches, T = 2304..8832, x 2
seeds: 72 items) or "smoke" (a_shape at 2 budgets x 2 tiny lengths: 4 items, CPU seconds).
"""

from configs import ablate_policies
from mmjax import sweep as sweep_lib

# (policy, option(s) swept, values; tuples are zipped options)
BUDGETS = {
  "a_shape": (("local_tokens",), (256, 512, 1024)),
  "vertical_slash": (("vertical_size", "slash_size"), ((128, 32), (256, 64), (512, 128))),
  "block_sparse": (("top_k_blocks",), (8, 16, 32)),
  "grid": (("top_k_blocks",), (2, 4, 8)),
}
FRAMES = (8, 16, 32)
SEEDS = (0, 1)
SMOKE_BUDGETS = {"a_shape": (("local_tokens",), (64, 128))}
SMOKE_FRAMES = (2, 4)


def _check(arg):
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/sweep_budget.py: unknown arg {arg!r}; use '' or 'smoke'")
  return arg


def get_config(arg: str | None = None):
  """The base config: configs/ablate_policies.py with the swept options declared."""
  arg = _check(arg)
  c = ablate_policies.get_config(arg)
  c.runner = "ablate"
  budgets = SMOKE_BUDGETS if arg == "smoke" else BUDGETS
  c.policies = (next(iter(budgets)),)
  for name, (fields, _) in budgets.items():
    sweep_lib.add_policy_defaults(c, name, *fields)
  if arg == "smoke":  # small sinks so the tiny inputs are not all sink
    sweep_lib.add_policy_defaults(c, "a_shape", "sink_tokens")
    c.policy_kwargs.a_shape.sink_tokens = 16
  return c


def _budget_axis(budgets) -> list[dict]:
  axis = []
  for name, (fields, values) in budgets.items():
    for value in values:
      value = value if isinstance(value, tuple) else (value,)
      item = {"policies": (name,)}
      item.update({f"policy_kwargs.{name}.{f}": v for f, v in zip(fields, value, strict=True)})
      axis.append(item)
  return axis


def sweep(arg: str | None = None) -> list[dict]:
  """The items: budget (per policy) x layout.frames x seed."""
  arg = _check(arg)
  if arg == "smoke":
    return sweep_lib.product(
      budget=_budget_axis(SMOKE_BUDGETS), **{"layout.frames": list(SMOKE_FRAMES)}
    )
  return sweep_lib.product(
    budget=_budget_axis(BUDGETS), **{"layout.frames": list(FRAMES)}, seed=list(SEEDS)
  )
