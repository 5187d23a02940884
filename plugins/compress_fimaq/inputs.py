"""FIMA-Q's search of a Linear layer's input range, alternated with its weight grid's search.

From FIMA-Q's code (``quant_layers/linear.py``, ``AsymmetricallyBatchingQuantLinear
.hyperparameter_searching``; config ``eq_n = 128``, ``search_round = 3``):

* **Candidates** (``calculate_percentile_activation_candidates(l=0.9, r=1.0)``): the spreads
  from the 0.9-0.1 percentile range to the max-min range of the input, ``eq_n / n_zp`` even
  steps, ``scale = spread / (2**bits - 1)`` clamped to at least 1e-4, each paired with each of
  ``n_zp = min(16, 2**bits)`` zero points centred on the middle code (unsigned codes, as
  ``ActivationPoint`` takes them): the weight grid's candidates (``grids.spread_candidates``).
  Per tensor, the percentiles are those of the whole input; where ``torch.quantile`` cannot
  take it, the mean of the percentiles of equal parts (the code's fallback). Per channel
  (``AsymmetricallyChannelWiseBatchingQuantLinear``, the inputs straight out of a LayerNorm),
  the percentiles of each channel.
* **Order**: the weight grid with the least weight error (``_search_best_w_scale_self``), the
  input range with the least input error (``_search_best_a_scale_self``); then ``search_round``
  times: each weight row's grid with the least error of the layer's output ``x̂ Ŵᵀ`` against
  ``x Wᵀ`` (``_search_best_w_scale``), then the input range with the least output error summed
  over tokens and output features, the weight as now quantized (``_search_best_a_scale``).
  Each step picks among fixed candidates that include the current choice, so the output error
  never rises from round to round.
* A per-channel input (before RepQ-ViT's fold, ``reparam.py``) is searched on its own error
  only, as the code's channel-wise ``hyperparameter_searching``; after the fold the code reruns
  the whole per-tensor search above on the reparameterized input, as here.

Our choices: the code drops the extra copy of the last candidate it appends (it never changes
the minimum). The output error is
computed on the same observed inputs that the weight search reads (``method.py``), in float32
row chunks. Attention operands and post-softmax points keep ``points.py``'s search (the code's
``quant_layers/matmul.py`` percentiles 0.99-0.99999); the Conv2d patch embedding's input
follows the code's conv search (``patch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.api import ActivationPoint, PointScheme, QuantGrid, QuantScheme
from compress_fimaq.grids import (
    GRAM_ROWS,
    MAX_QUANTILE_VALUES,
    RowErrors,
    layer_inputs,
    linear_candidates,
    pick,
    quantiles,
    row_grid,
    spread_candidates,
)
from compress_fimaq.points import scale_shape

MIN_SCALE = 1e-4  # the code's clamp of activation scale candidates


def group_quantiles(groups: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``(len(levels), groups)`` percentiles of each group (row); a row too long for
    ``torch.quantile`` takes the mean of its equal parts' percentiles (the code's fallback)."""
    if groups.shape[1] <= MAX_QUANTILE_VALUES:
        return quantiles(groups, levels)
    parts = -(-groups.shape[1] // MAX_QUANTILE_VALUES)
    return torch.stack([quantiles(part, levels) for part in groups.tensor_split(parts, dim=1)]).mean(0)


def input_candidates(groups: torch.Tensor, bits: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's input range candidates for ``groups`` (``(groups, values)``): scales and
    unsigned zero points, each ``(candidates, groups)``."""
    groups = groups.float()
    pct = torch.tensor([0.9, 1.0], device=groups.device)
    scales, codes = spread_candidates(group_quantiles(groups, pct), group_quantiles(groups, 1 - pct), bits, count)
    return scales.clamp(min=MIN_SCALE), codes + 2 ** (bits - 1)


def quantized(groups: torch.Tensor, scheme: PointScheme, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``groups`` (``(groups, values)``) on the grid of one scale and zero point per group."""
    return ActivationPoint(scheme, scale[:, None], zero[:, None])(groups)


def input_errors(groups: torch.Tensor, scheme: PointScheme, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``(candidates, groups)`` squared errors of the input itself (``_search_best_a_scale_self``)."""
    groups = groups.float()
    return torch.stack([(quantized(groups, scheme, s, z) - groups).pow(2).sum(1) for s, z in zip(scales, zeros)])


@torch.no_grad()
def self_search(groups: torch.Tensor, scheme: PointScheme, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and zero point among :func:`input_candidates` with the least input error."""
    scales, zeros = input_candidates(groups, scheme.bits, count)
    return pick(input_errors(groups, scheme, scales, zeros), scales, zeros)


def output_errors(
    rows: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    scheme: PointScheme,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> torch.Tensor:
    """``(candidates,)`` squared errors of the output ``x̂ weightᵀ`` against ``target`` over all
    ``rows`` (tokens) and output features, ``x̂`` the rows on each per-tensor candidate grid."""
    errors = torch.zeros(scales.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], GRAM_ROWS):
        chunk, expected = rows[start : start + GRAM_ROWS].reshape(1, -1), target[start : start + GRAM_ROWS]
        for index, (scale, zero) in enumerate(zip(scales, zeros, strict=True)):
            x_hat = quantized(chunk, scheme, scale.view(1), zero.view(1)).reshape(-1, rows.shape[1])
            errors[index] += (x_hat @ weight.T - expected).double().pow(2).sum()
    return errors


def channel_point(x: torch.Tensor, scheme: PointScheme, count: int) -> ActivationPoint:
    """The per-channel point for the Linear inputs ``x`` (channels last), each channel's range
    searched on its own error (:func:`self_search`)."""
    scale, zero = self_search(x.reshape(-1, x.shape[-1]).T, scheme, count)
    shape = scale_shape(x, "channel")
    return ActivationPoint(scheme, scale.view(shape), zero.view(shape))


@dataclass
class LinearSearch:
    """The searched weight grid and input point of one Linear, and the layer's output error
    ``Σ (x̂ Ŵᵀ - x Wᵀ)²`` after the self searches and after each round."""

    grid: QuantGrid
    point: ActivationPoint
    errors: list[float]


@torch.no_grad()
def search_linear(
    module: nn.Linear,
    weight: torch.Tensor,
    weight_scheme: QuantScheme,
    weight_count: int,
    x: torch.Tensor,
    point_scheme: PointScheme,
    input_count: int,
    rounds: int,
) -> LinearSearch:
    """FIMA-Q's alternating search (module docstring) of ``module``'s 2-D ``weight`` grid and its
    per-tensor input range, on the observed inputs ``x``."""
    rows = layer_inputs(module, x)
    w = weight.float()
    target = rows @ w.T
    w_scales, w_zeros = linear_candidates(weight, weight_scheme, weight_count)
    weight_only = RowErrors(weight, weight_scheme, None, None)
    w_scale, w_zero = pick(weight_only(w_scales, w_zeros, False), w_scales, w_zeros)
    flat = rows.reshape(1, -1)
    a_scales, a_zeros = input_candidates(flat, point_scheme.bits, input_count)
    a_scale, a_zero = pick(input_errors(flat, point_scheme, a_scales, a_zeros), a_scales, a_zeros)

    def error() -> float:
        w_hat = weight_only.values(w_scale, w_zero)
        return output_errors(rows, target, w_hat, point_scheme, a_scale[None], a_zero[None]).item()

    errors = [error()]
    for _ in range(rounds):
        x_hat = quantized(flat, point_scheme, a_scale, a_zero).reshape(rows.shape)
        output = RowErrors(weight, weight_scheme, rows, x_hat)
        w_scale, w_zero = pick(output(w_scales, w_zeros, True), w_scales, w_zeros)
        w_hat = weight_only.values(w_scale, w_zero)
        a_errors = output_errors(rows, target, w_hat, point_scheme, a_scales[:, 0], a_zeros[:, 0])
        a_scale, a_zero = pick(a_errors[:, None], a_scales, a_zeros)
        errors.append(error())
    shape = scale_shape(x, point_scheme.granularity)
    point = ActivationPoint(point_scheme, a_scale.view(shape), a_zero.view(shape))
    return LinearSearch(row_grid(weight_scheme, w_scale, w_zero), point, errors)
