"""Plans the same input several times and prints how many block indices changed."""

import numpy as np

from mmjax import policies, synthetic

b = synthetic.make_batch(0)
for name in ("block_sparse", "2d_boundary"):
  pol = policies.get(name)
  plans = [np.asarray(pol.plan(b.q, b.k, b.modality).block_idx) for _ in range(6)]
  print(name, "changed entries per run:", [int((p != plans[-1]).sum()) for p in plans])
