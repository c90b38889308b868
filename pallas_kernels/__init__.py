"""Pallas GPU kernels for mmjax. Never imports flax or mmjax."""
