"""What a sub-network costs: average bits (EQ-Net's ``BW_Estimator``) and BitOps.

The code's efficiency is the parameter-weighted average weight bits and the
feature-map-weighted average input bits over the layers but the first and the last
(``search/bitwidth_estimator``). BitOps, which the code does not compute, are the usual
``Σ MACs · w_bits · a_bits`` over every quantized layer, first and last at their fixed bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def layer_costs(model: nn.Module, layers: dict[str, nn.Module], image: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per layer: ``params`` (weights), ``feature_map`` (input elements per image) and ``macs`` (per
    image), from one forward pass of ``image`` (a batch of one)."""
    costs: dict[str, dict[str, float]] = {}

    def measure(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            positions = output.numel() / (output.shape[0] * module.weight.shape[0])
            costs[name] = {
                "params": float(module.weight.numel()),
                "feature_map": float(args[0][0].numel()),
                "macs": float(module.weight.numel() * positions),
            }

        return hook

    handles = [module.register_forward_hook(measure(name)) for name, module in layers.items()]
    try:
        model(pixel_values=image)
    finally:
        for handle in handles:
            handle.remove()
    return costs


class Efficiency:
    """Average bits and BitOps of sub-networks over a fixed list of layers' costs (plain Python: the
    genetic search calls it for every child)."""

    def __init__(self, costs: Sequence[dict[str, float]], fixed_bits: int) -> None:
        self.params = [c["params"] for c in costs]
        self.feature_maps = [c["feature_map"] for c in costs]
        self.macs = [c["macs"] for c in costs]
        self.fixed_bits = fixed_bits
        self._params_total = sum(self.params[1:-1])
        self._maps_total = sum(self.feature_maps[1:-1])

    def average_bits(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> tuple[float, float]:
        """Parameter-weighted weight bits and feature-map-weighted input bits, first and last left out."""
        w = sum(b * p for b, p in zip(w_bits[1:-1], self.params[1:-1])) / self._params_total
        a = sum(b * m for b, m in zip(a_bits[1:-1], self.feature_maps[1:-1])) / self._maps_total
        return w, a

    def bitops(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> float:
        """``Σ MACs · w · a`` per image, the first and last layers at the fixed bits."""
        w, a = list(w_bits), list(a_bits)
        w[0] = w[-1] = a[0] = a[-1] = self.fixed_bits
        return float(sum(m * wb * ab for m, wb, ab in zip(self.macs, w, a)))
