"""FIMA-Q's initial weight grids: per output row, a grid search over scale and zero-point candidates.

From FIMA-Q's code (``quant_layers/linear.py``, ``AsymmetricallyBatchingQuantLinear``, and
``quant_layers/conv.py``, ``AsymmetricallyBatchingQuantConv2d``; config ``eq_n = 128``,
``search_round = 3``); every grid is asymmetric uniform, ``2**bits - 1`` steps:

* **Linear** (``calculate_percentile_weight_candidates(l=0.9, r=1.0)``): per row, the range
  runs from the 0.9-0.1 percentile spread to the max-min spread in ``eq_n / n_zp`` even steps,
  each paired with each of ``n_zp = min(16, 2**bits)`` integer zero points centred on the
  middle code (at 4 bits or fewer, every code). A row first takes the candidate with the least
  weight error (``_search_best_w_scale_self``), then, each round, the one with the least error
  of the layer's output ``x̂ Ŵᵀ`` against ``x Wᵀ`` on the calibration inputs ``x``, with ``x̂``
  the inputs through the layer's input quantizer (``_search_best_w_scale``).
* **Conv2d** (the patch embedding; ``calculate_percentile_weight_candidates(l=0.99, r=0.9999,
  k=0.5)``): ``eq_n`` upper percentiles ``l + (r - l) (i / (eq_n - 1))**k`` and the maximum,
  lower ones mirrored, ``scale = (upper - lower) / (2**bits - 1)``, ``zero = -round(lower /
  scale)``; each row takes the pair with the least output error, then in each round the best
  lower bound given its upper one, then the best upper given the lower; with 8-bit inputs
  (the code's ``qconv_a_bit``) the code stops after one round.

The output error of a row is ``Σ (x̂ ŵ - x w)²`` over the calibration tokens, computed from
the Gram matrices ``x̂ᵀx̂`` and ``x̂ᵀx`` (float64), the same quantity the code evaluates by
running every candidate. A Linear whose input is quantized per tensor is searched in turn
with its input range (``inputs.py``, the code's alternation); elsewhere (a per-channel input,
no input point) the input stays fixed, so the output rounds would repeat the first and one
is run. A symmetric grid (not in FIMA-Q) takes zero point 0 and the
``eq_n`` spreads between the 0.9 and 1.0 percentiles of ``|w|``, times two. Zero points are
kept within int8 (the toolkit's storage), which only binds for rows with no negative weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compress.api import QuantGrid, QuantScheme

MAX_QUANTILE_VALUES = 2**24  # torch.quantile's limit on its input
GRAM_ROWS = 8192


def quantiles(rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(rows, levels, dim=1)`` (``(len(levels), rows)``), in row chunks small enough for it."""
    step = max(MAX_QUANTILE_VALUES // rows.shape[1], 1)
    parts = [torch.quantile(rows[start : start + step], levels, dim=1) for start in range(0, rows.shape[0], step)]
    return torch.cat(parts, dim=1)


def spread_candidates(
    upper: torch.Tensor, lower: torch.Tensor, bits: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's percentile candidates (its ``calculate_percentile_weight_candidates`` and
    ``calculate_percentile_activation_candidates``, ``l=0.9, r=1.0``): from ``upper`` and
    ``lower``, each ``(2, groups)`` at the 0.9 and 1.0 (0.1 and 0.0) percentiles, ``count /
    n_zp`` spreads evenly from the narrow to the wide one, each paired with each of ``n_zp =
    min(16, 2**bits)`` zero points centred on the middle code. Returns the unclamped scales and
    the zero points as offsets from the middle code, each ``(candidates, groups)``."""
    zero_points = min(16, 2**bits)
    per_zero = max(count // zero_points, 1)
    narrow, wide = upper[0] - lower[0], upper[1] - lower[1]
    steps = torch.linspace(0, 1, per_zero, device=upper.device)[:, None]
    scales = ((narrow + steps * (wide - narrow)) / (2**bits - 1)).repeat(zero_points, 1)
    codes = torch.arange(-(zero_points // 2), zero_points - zero_points // 2, device=upper.device, dtype=torch.float32)
    return scales, codes.repeat_interleave(per_zero)[:, None].expand_as(scales)


def linear_candidates(weight: torch.Tensor, scheme: QuantScheme, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's Linear candidates: scales and zero points, each ``(candidates, rows)``, the
    zero points in this toolkit's signed codes (the code's unsigned ones shifted by ``qmin``)."""
    w = weight.float()
    pct = torch.tensor([0.9, 1.0], device=w.device)
    if scheme.symmetric:
        spread = 2 * quantiles(w.abs(), pct)
        steps = torch.linspace(0, 1, count, device=w.device)[:, None]
        scales = (spread[0] + steps * (spread[1] - spread[0])) / (scheme.qmax - scheme.qmin)
        return scales.clamp(min=1e-10), torch.zeros_like(scales)
    scales, zeros = spread_candidates(quantiles(w, pct), quantiles(w, 1 - pct), scheme.bits, count)
    return scales.clamp(min=1e-10), zeros


def conv_bounds(weight: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's Conv2d candidate bounds, upper and lower, each ``(count + 1, rows)``."""
    index = torch.arange(count, dtype=torch.float64) / max(count - 1, 1)
    pct = torch.cat([0.99 + (0.9999 - 0.99) * index.pow(0.5), torch.ones(1, dtype=torch.float64)])
    pct = pct.float().to(weight.device)
    return quantiles(weight.float(), pct), quantiles(weight.float(), 1 - pct)


def bounds_grid(upper: torch.Tensor, lower: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (signed codes) of the ranges ``[lower, upper]`` (the code's conv grids)."""
    scales = ((upper - lower) / (scheme.qmax - scheme.qmin)).clamp(min=1e-10)
    zeros = (-(lower / scales).round() + scheme.qmin).clamp(-128, 127)
    return scales, zeros


def bounds_round(
    errors: RowErrors,
    uppers: torch.Tensor,
    lowers: torch.Tensor,
    scheme: QuantScheme,
    upper: torch.Tensor,
    lower: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of the code's conv bound search on the output error: per row, the best lower
    bound given ``upper``, then the best upper bound given that lower one."""
    (lower,) = pick(errors(*bounds_grid(upper[None].expand_as(lowers), lowers, scheme), True), lowers)
    (upper,) = pick(errors(*bounds_grid(uppers, lower[None].expand_as(uppers), scheme), True), uppers)
    return upper, lower


class RowErrors:
    """Per row, the squared error of candidate grids: of the weight, or of the layer's output on
    inputs ``x`` (rows of features, as the layer's weight matrix reads them) quantized to ``x̂``."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, x: torch.Tensor | None, x_hat: torch.Tensor | None):
        self.weight, self.scheme = weight.float(), scheme
        self.gram = self.cross = None
        if x is not None:
            width = x.shape[1]
            gram = x.new_zeros(width, width, dtype=torch.float64)
            cross = torch.zeros_like(gram)
            for start in range(0, x.shape[0], GRAM_ROWS):
                rows, rows_hat = x[start : start + GRAM_ROWS].double(), x_hat[start : start + GRAM_ROWS].double()
                gram += rows_hat.T @ rows_hat
                cross += rows_hat.T @ rows
            self.gram = gram
            self.cross = self.weight.double() @ cross.T  # row r: (x̂ᵀx) w_r

    def values(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The weight on the grid of one candidate (``scale``, ``zero``: one per row)."""
        scale, zero = scale[:, None], zero[:, None]
        codes = ((self.weight / scale).round() + zero).clamp(self.scheme.qmin, self.scheme.qmax)
        return (codes - zero) * scale

    def __call__(self, scales: torch.Tensor, zeros: torch.Tensor, output: bool) -> torch.Tensor:
        """``(candidates, rows)`` errors; ``output``: of the layer's output (up to a per-row constant)."""
        errors = []
        for scale, zero in zip(scales, zeros, strict=True):
            values = self.values(scale, zero)
            if output:
                v = values.double()
                errors.append(((v @ self.gram) * v).sum(1) - 2 * (v * self.cross).sum(1))
            else:
                errors.append((values - self.weight).pow(2).sum(1).double())
        return torch.stack(errors)


def pick(errors: torch.Tensor, *candidates: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the candidate values at the row's least error."""
    best = errors.argmin(0, keepdim=True)
    return [c.gather(0, best).squeeze(0) for c in candidates]


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``module`` as rows its weight matrix multiplies: the features of each token
    (Linear), or each patch unfolded (Conv2d)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def searched_grid(
    module: nn.Module,
    weight: torch.Tensor,
    scheme: QuantScheme,
    count: int,
    rounds: int,
    x: torch.Tensor | None = None,
    x_hat: torch.Tensor | None = None,
) -> QuantGrid:
    """FIMA-Q's grid for ``module``'s 2-D ``weight``: candidates searched on the weight error,
    then for ``rounds`` on the output error over the inputs ``x`` as quantized ``x_hat`` (both as
    the module receives them; without them, the weight error only). A grouped convolution is
    searched on the weight error."""
    output = x is not None and rounds > 0 and getattr(module, "groups", 1) == 1
    errors = RowErrors(
        weight, scheme, layer_inputs(module, x) if output else None, layer_inputs(module, x_hat) if output else None
    )
    if isinstance(module, nn.Conv2d) and not scheme.symmetric:
        uppers, lowers = conv_bounds(weight, count)
        scale, zero = bounds_grid(uppers, lowers, scheme)
        upper, lower = pick(errors(scale, zero, output), uppers, lowers)
        for _ in range(rounds if output else 0):
            upper, lower = bounds_round(errors, uppers, lowers, scheme, upper, lower)
        scale, zero = bounds_grid(upper[None], lower[None], scheme)
        scale, zero = scale[0], zero[0]
    else:
        scales, zeros = linear_candidates(weight, scheme, count)
        scale, zero = pick(errors(scales, zeros, output), scales, zeros)
    return row_grid(scheme, scale, zero)


def row_grid(scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor) -> QuantGrid:
    """The grid of one scale and zero point (signed code) per row."""
    zero_point = None if scheme.symmetric else zero.round().to(torch.int8)[:, None]
    return QuantGrid(scheme, scale.float()[:, None], zero_point)
