"""What a sub-network costs: average bits (EQ-Net's ``BW_Estimator``) and BitOps.

The code's efficiency is the parameter-weighted average weight bits and the
feature-map-weighted average input bits over the layers but the first and the last
(``search/bitwidth_estimator``). BitOps, which the code does not compute, are the usual
``Σ MACs · w_bits · a_bits`` over every quantized layer, first and last at their fixed bits.
Whether any sub-network's average lies in a window (an ``average_bits`` budget) is
:func:`average_gap`'s question, answered before a search runs.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce

import numpy as np
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


AVERAGE_TOLERANCE = 0.005
"""Bits: how far :func:`reachable_averages`' figures may be from the averages they stand for (1% of
the 0.5-bit window of an ``average_bits`` budget)."""


def reachable_averages(
    weights: Sequence[float], bits: Sequence[int], tolerance: float = AVERAGE_TOLERANCE
) -> np.ndarray:
    """The weighted averages ``Σ b_i·w_i / Σ w_i`` that choices of one ``b_i`` from ``bits`` per layer
    reach (``weights``: one non-negative weight per layer, positive sum), as sorted figures such that
    every reachable average lies within ``tolerance`` of a figure and every figure within
    ``tolerance`` of a reachable average.

    A reachable-sums dynamic programme over the layers on a grid of step ``δ = 2·tolerance / n``
    (n layers): each layer's term ``(b − min(bits))·w_i / Σ w`` is rounded to the nearest grid
    point (error at most δ/2), so a choice's n rounded terms sum to within ``n·δ/2 = tolerance``
    of its average, and sums on one grid point merge. The reached grid points are the bits of a
    Python integer (one shift and one or per layer and width), ``n·span / (2·tolerance)`` bits for
    a span of ``max(bits) − min(bits)``: milliseconds for a few hundred layers. EQ-Net's code
    checks no budget before its search; this check is ours.
    """
    total = float(sum(weights))
    lowest = min(bits)
    step = 2 * tolerance / len(weights)
    reached = 1  # bit k: a sum of k·step
    for weight in weights:
        shifts = {round((b - lowest) * weight / total / step) for b in bits}
        reached = reduce(operator.or_, (reached << shift for shift in shifts))
    packed = np.frombuffer(reached.to_bytes((reached.bit_length() + 7) // 8, "little"), dtype=np.uint8)
    return lowest + np.flatnonzero(np.unpackbits(packed, bitorder="little")) * step


def average_gap(
    weights: Sequence[float], bits: Sequence[int], low: float, high: float, tolerance: float = AVERAGE_TOLERANCE
) -> tuple[float | None, float | None] | None:
    """None when a choice of ``bits`` per layer may average (weighted by ``weights``) in
    ``(low, high]``; otherwise the nearest reachable averages below and above the window (None
    where there is none), each within ``tolerance`` of a reachable one.

    A figure of :func:`reachable_averages` in ``(low − tolerance, high + tolerance]`` counts as in
    the window, so a window some choice reaches is never called a gap; one that only figures
    within ``tolerance`` of its edges approach may pass for reachable.
    """
    figures = reachable_averages(weights, bits, tolerance)
    if np.any((figures > low - tolerance) & (figures <= high + tolerance)):
        return None
    below, above = figures[figures <= low], figures[figures > high]
    return (float(below[-1]) if below.size else None, float(above[0]) if above.size else None)
