"""FIMA-Q's Linear input search (inputs.py) against a brute force over the code's candidates,
each computed as the code computes it: every candidate input grid, the layer's output in full."""

from __future__ import annotations

import pytest
import torch
from compress_fimaq import inputs
from compress_fimaq.inputs import group_quantiles, input_candidates, search_linear
from torch import nn
from torch.nn import functional as F

from compress.api import PointScheme, QuantScheme


def code_candidates(x: torch.Tensor, bits: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``calculate_percentile_activation_candidates(0.9, 1.0)`` per tensor, unsigned zero points."""
    n_zp = min(16, 2**bits)
    per_zero = count // n_zp
    flat = x.reshape(-1)
    narrow = torch.quantile(flat, 0.9) - torch.quantile(flat, 0.1)
    wide = flat.max() - flat.min()
    spreads = narrow + torch.linspace(0, 1, per_zero) * (wide - narrow)
    scales = (spreads.repeat(n_zp) / (2**bits - 1)).clamp(min=1e-4)
    zeros = torch.arange(2 ** (bits - 1) - n_zp // 2, 2 ** (bits - 1) + n_zp // 2).repeat_interleave(per_zero)
    return scales, zeros.float()


def brute_output_errors(layer: nn.Linear, w_hat: torch.Tensor, x: torch.Tensor, scales, zeros, bits) -> torch.Tensor:
    """Per candidate, ``Σ (x̂ Ŵᵀ - x Wᵀ)²`` in float64, ``x̂`` quantized as the code does."""
    x = x.double()
    target = F.linear(x, layer.weight.double())
    errors = []
    for s, z in zip(scales.double(), zeros.double(), strict=True):
        x_hat = (((x / s).round() + z).clamp(0, 2**bits - 1) - z) * s
        errors.append((F.linear(x_hat, w_hat.double()) - target).pow(2).sum())
    return torch.stack(errors)


def layer_and_inputs(seed: int) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(16, 6)
    x = torch.randn(4, 12, 16)
    x[..., 3] *= 8  # an outlier channel, so that the input's own error and the output's disagree
    return layer, x


def weight_on_grid(layer: nn.Linear, grid) -> torch.Tensor:
    s, z = grid.scale.double(), grid.zero_point.double()
    scheme = grid.scheme
    return (((layer.weight.double() / s).round() + z).clamp(scheme.qmin, scheme.qmax) - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_input_candidates_are_the_codes(bits):
    torch.manual_seed(bits)
    x = torch.randn(3, 10, 8)
    scales, zeros = input_candidates(x.reshape(1, -1), bits, 128)
    expected_scales, expected_zeros = code_candidates(x, bits, 128)
    torch.testing.assert_close(scales[:, 0], expected_scales)
    torch.testing.assert_close(zeros[:, 0], expected_zeros)


def test_a_tensor_too_long_for_quantile_takes_the_mean_of_its_parts(monkeypatch):
    monkeypatch.setattr(inputs, "MAX_QUANTILE_VALUES", 50)
    values = torch.randn(1, 120)
    levels = torch.tensor([0.1, 0.9])
    parts = [torch.quantile(part[0], levels) for part in values.tensor_split(3, dim=1)]
    torch.testing.assert_close(group_quantiles(values, levels)[:, 0], torch.stack(parts).mean(0))


@pytest.mark.parametrize(("bits", "rounds"), [(3, 1), (4, 3), (2, 2)])
def test_chosen_input_grid_has_the_least_output_error_among_the_candidates(bits, rounds):
    layer, x = layer_and_inputs(bits)
    scheme = PointScheme(bits=bits, granularity="tensor")
    weight_scheme = QuantScheme(bits=bits, symmetric=False, granularity="channel")
    search = search_linear(layer, layer.weight, weight_scheme, 64, x, scheme, 64, rounds)
    w_hat = weight_on_grid(layer, search.grid)
    scales, zeros = code_candidates(x, bits, 64)
    errors = brute_output_errors(layer, w_hat, x, scales, zeros, bits)
    chosen = brute_output_errors(layer, w_hat, x, search.point.scale.view(1), search.point.zero_point.view(1), bits)
    torch.testing.assert_close(chosen[0], errors.min(), rtol=1e-5, atol=1e-9)
    assert search.errors[-1] == pytest.approx(chosen[0].item(), rel=1e-4)


def test_without_rounds_the_input_grid_has_the_least_input_error():
    layer, x = layer_and_inputs(0)
    search = search_linear(
        layer, layer.weight, QuantScheme(bits=4, granularity="channel"), 64, x, PointScheme(bits=4), 64, 0
    )
    scales, zeros = code_candidates(x, 4, 64)
    own = [((((x / s).round() + z).clamp(0, 15) - z) * s - x).pow(2).sum() for s, z in zip(scales, zeros)]
    best = int(torch.stack(own).argmin())
    assert search.point.scale.item() == pytest.approx(scales[best].item())
    assert search.point.zero_point.item() == zeros[best].item()
    assert len(search.errors) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alternation_never_increases_the_output_error(seed):
    layer, x = layer_and_inputs(seed)
    search = search_linear(
        layer, layer.weight, QuantScheme(bits=3, granularity="channel"), 64, x, PointScheme(bits=3), 64, 4
    )
    assert len(search.errors) == 5
    for before, after in zip(search.errors, search.errors[1:]):
        assert after <= before * (1 + 1e-5)
    assert search.errors[-1] < search.errors[0]  # the output rounds improve on the self searches
