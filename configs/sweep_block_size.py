"""Sweep: square block sizes 16/32/64/128 for a few policies (the ablate runner).

Hypothesis: at the same budget in tokens, smaller blocks follow the planted structure more
closely (higher recall at lower density) and larger blocks waste part of the budget on
pairs inside kept blocks that carry no mass; past 64 the loss in recall per unit density
should be visible for the block-selecting policies (block_sparse, grid) and small for
a_shape, whose pattern is contiguous. Budgets counted in blocks are scaled with the block
size (`TOKEN_BUDGETS`) so every size gets the same tokens; timings are in each item's
timings.jsonl (the summaries leave them out).

  python experiments/sweep.py --config=configs/sweep_block_size.py \
      --workdir=workdirs/sweep_block_size
  python experiments/report.py --workdir=workdirs/sweep_block_size
  python experiments/sweep.py --config=configs/sweep_block_size.py:smoke \
      --workdir=/tmp/sweep_block_smoke
  python experiments/sweep.py --config=configs/sweep_block_size.py:hopper \
      --workdir=workdirs/sweep_block_hopper --workers=2

Args: "" (a_shape, vertical_slash, block_sparse, grid x 4 block sizes x 2 seeds on the
default layout, T = 6656: 32 items), "hopper" (the same policies and seeds with the
(block_q, block_k) shapes the GPU kernels run: 64x64, 128x64 and 128x128; 24 items) or
"smoke" (a_shape, block_sparse x 16/32 on a tiny layout: 4 items, CPU seconds).
"""

from configs import ablate_policies
from mmjax import sweep as sweep_lib

POLICIES = ("a_shape", "vertical_slash", "block_sparse", "grid")
BLOCK_SIZES = (16, 32, 64, 128)
# (block_q, block_k): the Mosaic GPU kernel runs 128x64 and 128x128 (98% of cuDNN's speed
# on the dense plan at 128k against 86% for 128x64, benchmarks/results/h200_2026-11-30)
HOPPER_BLOCKS = ((64, 64), (128, 64), (128, 128))
SEEDS = (0, 1)
# options counted in key blocks -> the budget in tokens they keep (the defaults at 64)
TOKEN_BUDGETS = {"block_sparse": ("top_k_blocks", 2048), "grid": ("top_k_blocks", 512)}
SMOKE_POLICIES = ("a_shape", "block_sparse")
SMOKE_BLOCK_SIZES = (16, 32)
SMOKE_TOKEN_BUDGETS = {"block_sparse": ("top_k_blocks", 64)}


def _check(arg):
  arg = arg or ""
  if arg not in ("", "smoke", "hopper"):
    raise ValueError(
      f"configs/sweep_block_size.py: unknown arg {arg!r}; use '', 'hopper' or 'smoke'"
    )
  return arg


def get_config(arg: str | None = None):
  """The base config: configs/ablate_policies.py with block sizes (and budgets) declared."""
  arg = _check(arg)
  c = ablate_policies.get_config("smoke" if arg == "smoke" else "")
  c.runner = "ablate"
  pols, budgets = (
    (SMOKE_POLICIES, SMOKE_TOKEN_BUDGETS)
    if arg == "smoke"
    else (
      POLICIES,
      TOKEN_BUDGETS,
    )
  )
  c.policies = (pols[0],)
  for name in pols:
    sweep_lib.add_policy_defaults(c, name, "block_q", "block_k")
    if name in budgets:
      sweep_lib.add_policy_defaults(c, name, budgets[name][0])
  if arg == "smoke":
    sweep_lib.add_policy_defaults(c, "a_shape", "sink_tokens", "local_tokens")
    c.policy_kwargs.a_shape.update(sink_tokens=16, local_tokens=32)
    c.layout.frames = 2
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """The items: policy x block shape (block_q = block_k, or HOPPER_BLOCKS) x seed; budgets
  counted in key blocks keep their tokens (`TOKEN_BUDGETS` // block_k)."""
  arg = _check(arg)
  smoke = arg == "smoke"
  pols = SMOKE_POLICIES if smoke else POLICIES
  if arg == "hopper":
    shapes = HOPPER_BLOCKS
  else:
    shapes = [(s, s) for s in (SMOKE_BLOCK_SIZES if smoke else BLOCK_SIZES)]
  budgets = SMOKE_TOKEN_BUDGETS if smoke else TOKEN_BUDGETS
  items = []
  for name in pols:
    blocks = []
    for bq, bk in shapes:
      block = {f"policy_kwargs.{name}.block_q": bq, f"policy_kwargs.{name}.block_k": bk}
      if name in budgets:
        option, tokens = budgets[name]
        block[f"policy_kwargs.{name}.{option}"] = max(1, tokens // bk)
      blocks.append(block)
    axes = {"policy": [{"policies": (name,)}], "block": blocks}
    if not smoke:
      axes["seed"] = list(SEEDS)
    items += sweep_lib.product(**axes)
  return items
