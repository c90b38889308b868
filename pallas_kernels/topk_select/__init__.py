"""Exact per-row top-k as a set in index order (the planner's pooled-score picks)."""

from pallas_kernels.topk_select.kernel import SUPPORTED_DTYPES, top_k_select
from pallas_kernels.topk_select.reference import top_k_select_reference

__all__ = ["SUPPORTED_DTYPES", "top_k_select", "top_k_select_reference"]
