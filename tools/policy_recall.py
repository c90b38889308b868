r"""Attention recall and density of policies on one planted suite batch (CPU).

Each policy plans the batch (its default budget, blocks 128 x 64) and is scored on 256
query rows spread over the last three quarters, as the search scores candidates
(`search.score_candidates`: recall balanced over query modalities). Prints, per policy,
the recall and density of each planted head.

  python tools/policy_recall.py --size 128k --heads grid,a_shape,2d_boundary \
      --policies grid,2d_boundary
"""

import argparse
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
  names = args.policies.split(",")
  cands = [search.Candidate(n, 1.0, policies.get(n, block_q=128, block_k=64)) for n in names]
  rec, den = search.score_candidates(b.q, b.k, b.modality, cands, rows)
  print(f"size {args.size}: T = {t}, planted heads {list(b.head_kinds)}")
  print("| policy | " + " | ".join(f"{h} recall, density" for h in b.head_kinds) + " |")
  print("|---|" + "---|" * len(b.head_kinds))
  for n, r, d in zip(names, rec, den, strict=True):
    print(f"| {n} | " + " | ".join(f"{x:.4f}, {y:.4f}" for x, y in zip(r, d, strict=True)) + " |")


if __name__ == "__main__":
  main()
