"""The in-place fake quantization the training step repeats for every layer (``grid_values``,
``QuantGrid.fake_quantizer``) against the int8 round trip it replaces, and the
straight-through parametrization built on it."""

import pytest
import torch
from torch import nn

from compress.context import LayerState, OutlierSplit
from compress.quant import QuantScheme, compute_grid
from compress.straight_through import straight_through

SCHEMES = [
    QuantScheme(bits=3, group_size=16),
    QuantScheme(bits=4, symmetric=False, group_size=16),
    QuantScheme(bits=2, symmetric=False, granularity="channel"),
    QuantScheme(bits=8, granularity="tensor"),
]


def weights(dtype: torch.dtype) -> torch.Tensor:
    """Random weights, a zero group, and exact rounding ties of the grid computed from them."""
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    weight[1, :16] = 0
    return weight.to(dtype)


@pytest.mark.parametrize(
    "scheme", SCHEMES, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_equals_the_int8_round_trip_bit_for_bit(scheme, dtype):
    weight = weights(dtype)
    grid = compute_grid(weight, scheme)
    # weights exactly halfway between codes: round-half-to-even must pick the same code
    codes = grid.quantize(weight)
    step = grid.dequantize(torch.ones_like(codes)) - grid.dequantize(torch.zeros_like(codes))  # the scale, per weight
    ties = grid.dequantize(codes) + step / 2
    for w in (weight, ties.to(dtype), weight * 3):
        expected = grid.dequantize(grid.quantize(w), dtype)
        assert torch.equal(grid.fake_quantize(w), expected)
        assert grid.fake_quantize(w).dtype == dtype


def test_straight_through_forward_is_the_round_trip_and_backward_the_identity():
    layer = nn.Linear(64, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights(torch.float32))
    scheme = QuantScheme(bits=3, symmetric=False, group_size=16)
    grid = compute_grid(layer.weight.data, scheme)
    mask = torch.zeros(6, 64, dtype=torch.bool)
    mask[2, 5] = True
    outlier_grid = compute_grid(layer.weight.data, QuantScheme(bits=8, granularity="channel"))
    state = LayerState("test", quant=grid, outliers=OutlierSplit(mask=mask, grid=outlier_grid))
    with straight_through({"layer": layer}, {"layer": state}):
        latent = layer.parametrizations.weight.original
        expected = grid.dequantize(grid.quantize(latent.detach()))
        expected[2, 5] = outlier_grid.dequantize(outlier_grid.quantize(latent.detach()))[2, 5]
        assert torch.equal(layer.weight, expected)
        upstream = torch.randn(6, 64)
        layer.weight.backward(upstream)
        assert torch.equal(latent.grad, upstream)
