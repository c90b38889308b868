"""Masked pooled-block scores with their chunk maxima (the planner's scored blocks)."""

from pallas_kernels.pooled_scores.kernel import pooled_scores
from pallas_kernels.pooled_scores.reference import pooled_scores_reference

__all__ = ["pooled_scores", "pooled_scores_reference"]
