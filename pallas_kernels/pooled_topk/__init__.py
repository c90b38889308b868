"""Each row's top-k masked pooled-block scores, the scores kept in registers (the
planner's scored blocks without writing the [nQ, nK] scores)."""

from pallas_kernels.pooled_topk.kernel import pooled_top_k
from pallas_kernels.pooled_topk.reference import pooled_top_k_reference

__all__ = ["pooled_top_k", "pooled_top_k_reference"]
