"""VLMs with pluggable sparse prefill attention."""

from mmjax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, init_params, qwen2_5_vl_7b

__all__ = ["Qwen2_5_VL", "Qwen2_5_VLConfig", "init_params", "qwen2_5_vl_7b"]
