"""The single key columns each query block of a sparse plan visits (the planner's
vertical lines and a query-only view's own tokens)."""

from pallas_kernels.col_select.kernel import select_columns
from pallas_kernels.col_select.reference import select_columns_reference

__all__ = ["select_columns", "select_columns_reference"]
