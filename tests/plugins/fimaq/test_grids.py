"""FIMA-Q's weight-grid search (grids.py) against a brute force over the same candidates, run
as FIMA-Q's code runs them: every candidate grid, the layer's output computed in full."""

from __future__ import annotations

import pytest
import torch
from compress_fimaq.grids import bounds_grid, conv_bounds, linear_candidates, searched_grid
from torch import nn
from torch.nn import functional as F

from compress.api import QuantGrid, QuantScheme, weight_matrix


def scheme(bits: int, symmetric: bool = False) -> QuantScheme:
    return QuantScheme(bits=bits, symmetric=symmetric, granularity="channel")


def on_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, s: QuantScheme) -> torch.Tensor:
    """Every candidate's quantized weight, ``(candidates, *weight.shape)``, as the code computes it."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale, zero = scales.reshape(scales.shape[0], *shape), zeros.reshape(zeros.shape[0], *shape)
    return (((weight / scale).round() + zero).clamp(s.qmin, s.qmax) - zero) * scale


def linear_error(layer: nn.Linear, weights: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per candidate and row, the squared output error summed over tokens (float64, in full)."""
    target = F.linear(x.double(), layer.weight.double())
    outputs = torch.stack([F.linear(x_hat.double(), w.double()) for w in weights])
    return (outputs - target).pow(2).reshape(weights.shape[0], -1, layer.out_features).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_linear_candidates_pair_every_spread_with_the_codes_zero_points(bits):
    torch.manual_seed(0)
    weight = torch.randn(6, 40)
    scales, zeros = linear_candidates(weight, scheme(bits), 128)
    count = min(16, 2**bits)
    per_zero = 128 // count
    assert scales.shape == zeros.shape == (count * per_zero, 6)
    # the code's unsigned zero points n/2 - count/2 .. n/2 + count/2 - 1 (n = 2**bits), in signed codes
    assert zeros[:, 0].unique().tolist() == list(range(-(count // 2), count // 2))
    levels = 2**bits - 1
    narrow = torch.quantile(weight, 0.9, dim=1) - torch.quantile(weight, 0.1, dim=1)
    wide = weight.amax(1) - weight.amin(1)
    torch.testing.assert_close(scales[0], narrow / levels)
    torch.testing.assert_close(scales[per_zero - 1], wide / levels)
    torch.testing.assert_close(scales[per_zero], scales[0])  # the spreads repeat for each zero point


def test_a_linear_row_takes_the_candidate_with_the_least_output_error():
    torch.manual_seed(1)
    layer = nn.Linear(24, 10)
    x = torch.randn(5, 7, 24) * torch.linspace(0.1, 3, 24)  # uneven channels: output and weight errors disagree
    x_hat = (x * 4).round() / 4
    s = scheme(3)
    grid = searched_grid(layer, layer.weight, s, 64, 3, x, x_hat)
    scales, zeros = linear_candidates(layer.weight, s, 64)
    errors = linear_error(layer, on_grid(layer.weight, scales, zeros, s), x, x_hat)
    best = errors.argmin(0)
    rows = torch.arange(10)
    torch.testing.assert_close(grid.scale.flatten(), scales[best, rows])
    assert torch.equal(grid.zero_point.flatten().float(), zeros[best, rows])
    chosen = linear_error(layer, grid.fake_quantize(layer.weight.detach())[None], x, x_hat)[0]
    torch.testing.assert_close(chosen, errors.min(0).values)
    weight_only = searched_grid(layer, layer.weight, s, 64, 3)  # no inputs: the least weight error
    weight_errors = (on_grid(layer.weight, scales, zeros, s) - layer.weight).pow(2).sum(2)
    torch.testing.assert_close(weight_only.scale.flatten(), scales[weight_errors.argmin(0), rows])
    assert not torch.equal(grid.scale, weight_only.scale)


def test_a_symmetric_grid_has_no_zero_point_and_its_scale_from_the_abs_spreads():
    torch.manual_seed(2)
    layer = nn.Linear(16, 4)
    grid = searched_grid(layer, layer.weight, scheme(4, symmetric=True), 32, 0)
    assert grid.zero_point is None
    spread = 2 * torch.quantile(layer.weight.detach().abs(), torch.tensor([0.9, 1.0]), dim=1)
    assert bool(
        ((grid.scale.flatten() >= spread[0] / 15 - 1e-7) & (grid.scale.flatten() <= spread[1] / 15 + 1e-7)).all()
    )


def test_the_patch_embedding_searches_its_bounds_coordinate_wise_and_never_worsens():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 4, 4)
    x = torch.randn(6, 3, 16, 16)
    x_hat = (x * 8).round() / 8
    s = scheme(3)
    weight = weight_matrix(conv.weight.detach())
    uppers, lowers = conv_bounds(weight, 32)
    assert uppers.shape == (33, 8)
    torch.testing.assert_close(uppers[-1], weight.amax(1))  # the last candidate is the whole range
    torch.testing.assert_close(lowers[-1], weight.amin(1))

    def output_error(grid: QuantGrid) -> torch.Tensor:
        quantized = grid.fake_quantize(weight).view_as(conv.weight)
        out = F.conv2d(x_hat.double(), quantized.double(), stride=4)
        return (out - F.conv2d(x.double(), conv.weight.double(), stride=4)).pow(2).sum((0, 2, 3))

    paired = torch.stack(
        [output_error(QuantGrid(s, *grid_of(*bounds_grid(u[None], lo[None], s)))) for u, lo in zip(uppers, lowers)]
    )
    first = searched_grid(conv, weight, s, 32, 0, x, x_hat)  # no rounds: weight error over the pairs
    one = searched_grid(conv, weight, s, 32, 1, x, x_hat)
    three = searched_grid(conv, weight, s, 32, 3, x, x_hat)
    assert bool((output_error(one) <= paired.min(0).values * (1 + 1e-9)).all())
    assert bool((output_error(three) <= output_error(one) * (1 + 1e-9)).all())
    assert not torch.equal(first.scale, three.scale)
    lows = -(three.zero_point.float() - s.qmin) * three.scale  # the chosen lower bound is a candidate
    assert bool(torch.isclose(lows, lowers.T, rtol=0, atol=float(three.scale.max()) / 2).any(1).all())


def grid_of(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale[0][:, None], zero[0].to(torch.int8)[:, None]
