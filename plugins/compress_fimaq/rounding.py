"""Weight quantization for FIMA-Q: a per-row asymmetric grid, then learned rounding (AdaRound).

From FIMA-Q's code (``quantizers/adaround.py``, after Nagel et al., 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization"): each weight is ``floor(w / s)`` plus a
rounding variable ``h(α) = clamp(sigmoid(α) (ζ - γ) + γ, 0, 1)`` with ``ζ = 1.1``,
``γ = -0.1``, ``α`` initialized so that ``h(α)`` equals the fractional part of ``w / s``;
when the reconstruction ends each weight rounds up where ``α >= 0``. The codes are this
toolkit's signed codes, ``clamp(floor(w / s) + h + zp, qmin, qmax)``, on the layer's
:class:`QuantGrid`, so the writers store the result as any other grid.

The grid is FIMA-Q's searched one (``grids.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.api import QuantGrid, weight_matrix

GAMMA, ZETA = -0.1, 1.1


class AdaRound(nn.Module):
    """A parametrization of a layer's weight: its AdaRound value on ``grid`` (soft or hard)."""

    def __init__(self, weight: torch.Tensor, grid: QuantGrid) -> None:
        super().__init__()
        self.shape = weight.shape
        self.grid = grid.to(weight.device)
        matrix = weight_matrix(weight.detach()).float()
        scaled = matrix / self.grid.scale
        rest = scaled - scaled.floor()
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def rounding(self) -> torch.Tensor:
        """``h(α)`` in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scheme = self.grid.scheme
        scale = self.grid.scale
        zero = 0.0 if self.grid.zero_point is None else self.grid.zero_point.float()
        up = self.rounding() if self.soft else (self.alpha >= 0).float()
        codes = (weight_matrix(weight).float().detach() / scale).floor() + up + zero
        values = (codes.clamp(scheme.qmin, scheme.qmax) - zero) * scale
        return values.view(self.shape).to(weight.dtype)


def attach(module: nn.Module, grid: QuantGrid) -> AdaRound:
    """Parametrize ``module.weight`` with AdaRound on ``grid``; the original weight stops learning."""
    rounding = AdaRound(module.weight, grid)
    parametrize.register_parametrization(module, "weight", rounding)
    module.parametrizations.weight.original.requires_grad_(False)
    return rounding


def settle_rounding(module: nn.Module, rounding: AdaRound) -> None:
    """Round hard and leave the rounded weight as the layer's plain parameter."""
    rounding.soft = False
    with torch.no_grad():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.weight.requires_grad_(False)
