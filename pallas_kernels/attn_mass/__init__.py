"""Column and diagonal attention mass of a few query rows (the planner's online estimates)."""

from pallas_kernels.attn_mass.kernel import P_DTYPES, SUPPORTED_DTYPES, attention_mass
from pallas_kernels.attn_mass.reference import attention_mass_reference

__all__ = ["P_DTYPES", "SUPPORTED_DTYPES", "attention_mass", "attention_mass_reference"]
