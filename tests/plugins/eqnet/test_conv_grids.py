"""Convolution weights on the host's grids: rtn groups a Conv2d's weight over its flattened input."""

from __future__ import annotations

import pytest
import torch

from compress.api import QuantScheme, compute_grid, weight_matrix
from compress_rtn.method import quantize_layer


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_rtn_quantizes_a_convolution_over_its_flattened_input(granularity):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    original = conv.weight.detach().clone()
    scheme = QuantScheme(bits=3, granularity=granularity)
    state, error = quantize_layer("conv", conv, scheme)
    rows = original.flatten(1)  # in x kh x kw per output channel
    expected = compute_grid(rows, scheme).fake_quantize(rows).view_as(original)
    torch.testing.assert_close(conv.weight.detach(), expected)
    assert state.quant.scale.shape == ((5, 1) if granularity == "channel" else (1,))
    codes = state.quant.quantize(weight_matrix(conv.weight.detach()))
    assert codes.min() >= -4 and codes.max() <= 3 and 0 < error < 1
    if granularity == "channel":
        assert all(len(row.unique()) <= 8 for row in conv.weight.detach().flatten(1))
    else:
        assert len(conv.weight.detach().unique()) <= 8
