"""mmjax: modality-aware permutation sparse attention for long-context VLM prefill."""

from mmjax import policies
from mmjax.attention import masked_attention, sparse_attention
from mmjax.plan import SparsePlan

__all__ = ["SparsePlan", "masked_attention", "policies", "sparse_attention"]
__version__ = "0.1.0"
