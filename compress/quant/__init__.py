"""Quantization primitives shared by the quantizers."""

from compress.quant.grid import QuantGrid, QuantScheme, compute_grid

__all__ = ["QuantGrid", "QuantScheme", "compute_grid"]
