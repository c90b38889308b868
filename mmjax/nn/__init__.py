"""Flax (linen) modules."""

from mmjax.nn.attention import SparseAttention, apply_rope, rope_cos_sin

__all__ = ["SparseAttention", "apply_rope", "rope_cos_sin"]
