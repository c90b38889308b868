r"""Attention recall and density of policies on one planted suite batch (CPU).

Each policy plans the batch (its default budget, blocks 128 x 64) and is scored on 256
query rows spread over the last three quarters, as the search scores candidates
(`search.score_candidates`: recall balanced over query modalities). Prints, per policy,
the recall and density of each planted head.

  python tools/policy_recall.py --size 128k --heads grid,a_shape,2d_boundary \
      --policies grid,2d_boundary

A policy may carry field overrides after a colon, `name:field=value,...` (separate
policies by ';'): `--policies "grid;grid:stride_norm=all;grid:pool_tokens=16"`. The strides
a plan estimated (its `aux`) are printed too, with the layout's frame stride.
"""

import argparse
import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import policies, search  # noqa: E402
from mmjax.eval import suite  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="16k", help=f"one of {list(suite.SIZES)}")
  ap.add_argument("--heads", default="grid,a_shape,2d_boundary", help="planted head kinds")
  ap.add_argument("--policies", default="grid,2d_boundary")
  ap.add_argument("--rows", type=int, default=256)
  args = ap.parse_args()
  b = suite.batch(args.size, seed=0, head_kinds=args.heads.split(","), head_dim=128)
  t = b.q.shape[1]
  rows = jnp.asarray(np.linspace(t // 4, t - 1, args.rows).astype(np.int32))
  sep = ";" if ";" in args.policies or ":" in args.policies else ","
  names = [n.strip() for n in args.policies.split(sep) if n.strip()]
  cands = [search.Candidate(n, 1.0, _policy(n)) for n in names]
  rec, den = search.score_candidates(b.q, b.k, b.modality, cands, rows)
  print(f"size {args.size}: T = {t}, planted heads {list(b.head_kinds)}")
  print(f"frame stride {b.layout.frame_stride} ({b.layout.frame_tokens} vision tokens)")
  print("| policy | " + " | ".join(f"{h} recall, density" for h in b.head_kinds) + " |")
  print("|---|" + "---|" * len(b.head_kinds))
  for n, r, d in zip(names, rec, den, strict=True):
    print(f"| {n} | " + " | ".join(f"{x:.4f}, {y:.4f}" for x, y in zip(r, d, strict=True)) + " |")
  print()
  for c in cands:
    aux = c.policy.plan(b.q, b.k, b.modality).aux
    for key, val in sorted(aux.items()):
      if key.startswith("stride"):
        print(f"{c.pattern} {key} per head: {np.asarray(val)[0].tolist()}")


def _policy(spec):
  """`name` or `name:field=value,...` (ints where they parse) -> the policy. A field
  `grid.f` sets f of a 2d_boundary's grid patterns."""
  name, _, rest = spec.partition(":")
  kw, sub = {}, {}
  for item in filter(None, rest.split(",")):
    key, eq, val = item.partition("=")
    if not eq:
      raise SystemExit(f"--policies: {item!r} in {spec!r} is not field=value")
    val = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
    key = key.strip()
    if key.startswith("grid."):
      sub[key[5:]] = val
    else:
      kw[key] = val
  pol = policies.get(name.strip(), block_q=128, block_k=64, **kw)
  if sub:
    if not hasattr(pol, "patterns"):
      raise SystemExit(f"--policies: {name!r} has no sub-patterns for the grid.* fields")
    pats = tuple(
      (pair, dataclasses.replace(p, **sub) if p.name == "grid" else p) for pair, p in pol.patterns
    )
    pol = dataclasses.replace(pol, patterns=pats)
  return pol


if __name__ == "__main__":
  main()
