r"""How the search's planted-pattern accuracy depends on its budget and tie (CPU, ~5 min).

Scores every candidate once per seed on the default planted suite, then replays the
selection rule for a grid of (max_density, tie); prints a markdown table.

  python tools/search_sensitivity.py > results/search_synthetic/sensitivity.md
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import search, synthetic  # noqa: E402


def main():
  layout = synthetic.VideoLayout()
  cands = search.candidates(search.SIMPLICITY, search.SearchConfig().scales)
  scores = []
  for seed in range(3):
    q, k, mod = search.synthetic_layers(layout, synthetic.HEAD_KINDS, 1, seed)(0)
    rows = search._scored_rows(layout.seq_len, 64, 16, 64, seed)
    scores.append(search.score_candidates(q, k, mod, cands, rows))
  print("Planted-pattern accuracy of the search on the default suite, 3 seeds x 6 heads.\n")
  print("| max_density | tie | accuracy | chosen patterns (seed 0; seed 1; seed 2) |")
  print("|---|---|---|---|")
  for d in (0.3, 0.35, 0.4, 0.45):
    for tie in (0.0, 0.005, 0.01, 0.02):
      hits, picks = [], []
      for rec, den in scores:
        got = [cands[i].pattern for i in search.choose(rec, den, cands, d, tie)]
        hits += [g == w for g, w in zip(got, synthetic.HEAD_KINDS, strict=True)]
        picks.append(" ".join(got))
      print(f"| {d} | {tie} | {np.mean(hits):.3f} | {'; '.join(picks)} |")


if __name__ == "__main__":
  main()
