"""Quantization primitives shared by the quantizers."""

from compress.quant.grid import QuantGrid, QuantScheme, check_group_width, compute_grid, weight_matrix

__all__ = ["QuantGrid", "QuantScheme", "check_group_width", "compute_grid", "weight_matrix"]
