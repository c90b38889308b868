"""Block-sparse + column flash attention in view order, causal by original positions."""

from pallas_kernels.sparse_flash.kernel import (
  SUPPORTED_DTYPES,
  SUPPORTED_HEAD_DIMS,
  BlockSizes,
  sparse_attention,
)
from pallas_kernels.sparse_flash.reference import (
  sparse_attention_reference,
  sparse_attention_reference_fused,
)

__all__ = [
  "SUPPORTED_DTYPES",
  "SUPPORTED_HEAD_DIMS",
  "BlockSizes",
  "sparse_attention",
  "sparse_attention_reference",
  "sparse_attention_reference_fused",
]
