"""Weight quantization for FIMA-Q: a per-row asymmetric grid, then learned rounding (AdaRound).

From FIMA-Q's code (``quantizers/adaround.py``, after Nagel et al., 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization"): each weight is ``floor(w / s)`` plus a
rounding variable ``h(α) = clamp(sigmoid(α) (ζ - γ) + γ, 0, 1)`` with ``ζ = 1.1``,
``γ = -0.1``, ``α`` initialized so that ``h(α)`` equals the fractional part of ``w / s``;
when the reconstruction ends each weight rounds up where ``α >= 0``. The codes are this
toolkit's signed codes, ``clamp(floor(w / s) + h + zp, qmin, qmax)``, on the layer's
:class:`QuantGrid`, so the writers store the result as any other grid.

The grid: FIMA-Q searches each row's scale and zero point (16 zero points x 8 scales, on
the weight error, then on the output error over three rounds). Here each row's range is
shrunk by the ratio, of ``search_steps`` between 0.5 and 1, with the smallest weight error
(our choice; the output-error rounds are not reproduced).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.api import QuantGrid, QuantScheme, weight_matrix

GAMMA, ZETA = -0.1, 1.1


def searched_grid(weight: torch.Tensor, scheme: QuantScheme, steps: int) -> QuantGrid:
    """A per-row grid for the 2-D ``weight`` whose clipping ratio minimizes each row's squared error."""
    w = weight.detach().float()
    low, high = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    levels = torch.tensor(float(scheme.qmax - scheme.qmin), device=w.device)
    best_error = torch.full_like(low, float("inf"))
    best_scale, best_zero = torch.ones_like(low), torch.zeros_like(low)
    for ratio in torch.linspace(0.5, 1.0, steps).tolist():
        if scheme.symmetric:
            scale = (torch.maximum(-low, high) * ratio / (levels / 2)).clamp(min=1e-10)
            zero = torch.zeros_like(scale)
        else:
            scale = ((high - low) * ratio / levels).clamp(min=1e-10)
            zero = (scheme.qmin - low * ratio / scale).round().clamp(scheme.qmin, scheme.qmax)
        values = ((w / scale + zero).round().clamp(scheme.qmin, scheme.qmax) - zero) * scale
        error = (values - w).pow(2).sum(1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    zero_point = None if scheme.symmetric else best_zero.to(torch.int8)
    return QuantGrid(scheme, best_scale, zero_point)


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
