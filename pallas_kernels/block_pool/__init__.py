"""Masked block means through a row gather (the planner's pooled q / k)."""

from pallas_kernels.block_pool.kernel import (
  MAX_SELECTIONS,
  SUPPORTED_DTYPES,
  block_mean,
  is_group,
)
from pallas_kernels.block_pool.reference import block_mean_reference

__all__ = ["MAX_SELECTIONS", "SUPPORTED_DTYPES", "block_mean", "block_mean_reference", "is_group"]
