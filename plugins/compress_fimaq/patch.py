"""FIMA-Q's search of the patch embedding convolution below 8-bit inputs: its weight bounds
alternated with its input's scale.

From FIMA-Q's code (``quant_layers/conv.py``, ``AsymmetricallyBatchingQuantConv2d
.hyperparameter_searching``, ``PTQSLBatchingQuantConv2d._initialize_activation_scale`` and
``_search_best_a_scale``; config ``eq_n = 128``, ``search_round = 3``):

* **Input grid**: symmetric, one scale for the whole input, codes ``-2**(b-1) .. 2**(b-1) - 1``
  (here an ``ActivationPoint`` with its zero point fixed at ``2**(b-1)``, the same grid). The
  scale starts at ``max |x| / (2**(b-1) - 0.5)``; its candidates are that scale times ``0.01 +
  i (1.2 - 0.01) / eq_n``, ``i = 0 .. eq_n``, scored by the squared error of the layer's output.
* **Order**: the weight bound pairs on the output error with the input at its starting scale,
  then ``search_round`` times: the lower bounds, the upper bounds (``grids.bounds_round``) and
  the input scale, each with the others as they are.
* At 8 bits or more (the code's ``qconv_a_bit = 8`` in every config) the code's ``quant_input``
  returns the image unchanged: no input point, and the weight search runs one round on the
  unquantized input (``method.py``, ``grids.searched_grid``).

Our choice: the output error is computed from the unfolded patches (``grids.layer_inputs``),
which gives the convolution's output without its bias, which cancels in the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.api import ActivationPoint, PointScheme, QuantGrid, QuantScheme
from compress_fimaq.grids import RowErrors, bounds_grid, bounds_round, conv_bounds, layer_inputs, pick, row_grid
from compress_fimaq.inputs import output_errors, quantized

START, STOP = 0.01, 1.2  # the code's eq_alpha, eq_beta


def input_scales(rows: torch.Tensor, bits: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting input scale (the code's ``_initialize_activation_scale``) and its ``count + 1`` candidates."""
    start = rows.abs().max().float() / (2 ** (bits - 1) - 0.5)
    factors = START + torch.arange(count + 1, device=rows.device) * (STOP - START) / count
    return start, factors * start


@dataclass
class ConvSearch:
    """The searched weight grid and input point of the patch embedding, and the layer's output
    error ``Σ (x̂ Ŵᵀ - x Wᵀ)²`` after the pair search and after each round."""

    grid: QuantGrid
    point: ActivationPoint
    errors: list[float]


@torch.no_grad()
def search_conv(
    module: nn.Conv2d,
    weight: torch.Tensor,
    weight_scheme: QuantScheme,
    weight_count: int,
    x: torch.Tensor,
    scheme: PointScheme,
    input_count: int,
    rounds: int,
) -> ConvSearch:
    """FIMA-Q's alternating search (module docstring) of ``module``'s 2-D asymmetric ``weight``
    grid and its symmetric per-tensor input scale (``scheme``: uniform, below 8 bits), on the images ``x``."""
    rows = layer_inputs(module, x)
    target = rows @ weight.float().T
    bits = scheme.bits
    zero = torch.full((1,), 2.0 ** (bits - 1), device=rows.device)
    scale, candidates = input_scales(rows, bits, input_count)
    scale = scale.view(1)
    uppers, lowers = conv_bounds(weight, weight_count)
    weight_only = RowErrors(weight, weight_scheme, None, None)

    def output() -> RowErrors:
        x_hat = quantized(rows.reshape(1, -1), scheme, scale, zero).reshape(rows.shape)
        return RowErrors(weight, weight_scheme, rows, x_hat)

    def weight_hat() -> torch.Tensor:
        w_scale, w_zero = bounds_grid(upper[None], lower[None], weight_scheme)
        return weight_only.values(w_scale[0], w_zero[0])

    upper, lower = pick(output()(*bounds_grid(uppers, lowers, weight_scheme), True), uppers, lowers)
    errors = [output_errors(rows, target, weight_hat(), scheme, scale[None], zero[None]).item()]
    for _ in range(rounds):
        upper, lower = bounds_round(output(), uppers, lowers, weight_scheme, upper, lower)
        scores = output_errors(rows, target, weight_hat(), scheme, candidates[:, None], zero.expand(len(candidates), 1))
        scale = candidates[scores.argmin()].view(1)
        errors.append(output_errors(rows, target, weight_hat(), scheme, scale[None], zero[None]).item())
    w_scale, w_zero = bounds_grid(upper[None], lower[None], weight_scheme)
    shape = (1,) * x.ndim
    point = ActivationPoint(scheme, scale.view(shape), zero.view(shape))
    return ConvSearch(row_grid(weight_scheme, w_scale[0], w_zero[0]), point, errors)
