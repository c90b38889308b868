"""mmjax: modality-aware permutation sparse attention for long-context VLM prefill."""

from mmjax import _xla_flags

_xla_flags.apply()

from mmjax import policies  # noqa: E402
from mmjax.attention import masked_attention, sparse_attention  # noqa: E402
from mmjax.models.generate import generate, prefill  # noqa: E402
from mmjax.plan import SparsePlan  # noqa: E402

__all__ = ["SparsePlan", "generate", "masked_attention", "policies", "prefill", "sparse_attention"]
__version__ = "0.1.0"
