"""One-shot pruners (magnitude, wanda, sparsegpt): pattern invariants, the SparseGPT solve against
GPTQ and magnitude pruning, joint quantization, and the shared input statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.hessian import collect_hessians, collect_input_norms, h_norm, inverse_factor
from compress.quant import QuantScheme, compute_grid
from compress_gptq.solve import gptq_quantize
from compress_nm.params import SparsityParams
from compress_nm.patterns import NMPattern, is_nm_sparse
from compress_nm.sparsegpt_solve import Mask, prune_in_place


def correlated(rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian ``2/N XᵀX`` of strongly correlated, unevenly scaled inputs."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3 + torch.eye(columns)
    scales = torch.rand(columns, generator=generator) * 3 + 0.1
    x = (torch.randn(512, columns, generator=generator) @ mixing) * scales
    return torch.randn(rows, columns, generator=generator), 2 * x.T @ x / 512


def solve(weight, H, mask, scheme=None, **options):
    factor = inverse_factor(H, 0.01, act_order=False)
    return prune_in_place(weight.clone(), factor, mask, scheme, **options), factor


@pytest.mark.parametrize("text", ["2:4", "4:8", "1:4", "3:8"])
def test_sparsegpt_nm_groups_hold_at_most_n(text):
    pattern = NMPattern.parse(text)
    weight, H = correlated(24, 64)
    result, _ = solve(weight, H, Mask(pattern=pattern), block_size=20)  # rounded down to a multiple of M
    assert is_nm_sparse(result.weight, pattern)
    groups = (result.weight != 0).reshape(24, -1, pattern.m).sum(-1)
    assert (groups == pattern.n).all()  # exactly N kept: the inputs are dense, no weight lands on 0


@pytest.mark.parametrize("per_row", [False, True])
def test_sparsegpt_unstructured_prunes_the_fraction_of_each_block(per_row):
    weight, H = correlated(16, 96)
    result, _ = solve(weight, H, Mask(sparsity=0.375, per_row=per_row), block_size=32, segments=[6, 10])
    zeros = result.weight == 0
    for start in range(0, 96, 32):  # adaptive mask: the fraction holds per block, for each stacked layer
        for rows in (slice(0, 6), slice(6, 16)):
            block = zeros[rows, start : start + 32]
            assert block.sum() == int(block.numel() * 0.375)
            if per_row:
                assert (block.sum(1) == 12).all()


def test_sparsegpt_beats_magnitude_on_correlated_inputs():
    weight, H = correlated(32, 128)
    for mask, params in [(Mask(pattern=NMPattern(2, 4)), {"pattern": "2:4"}), (Mask(sparsity=0.5), {"sparsity": 0.5})]:
        result, _ = solve(weight, H, mask)
        magnitude = weight.masked_fill(~SparsityParams(**params).keep_mask(weight.abs()), 0)
        assert h_norm(weight - result.weight, H) < 0.7 * h_norm(weight - magnitude, H)


def test_sparsegpt_output_error_from_the_loop_matches_the_hessian():
    weight, H = correlated(8, 64)
    result, factor = solve(weight, H, Mask(pattern=NMPattern(2, 4)))
    from_loop = factor.output_error(result.row_errors, weight - result.weight)
    assert from_loop == pytest.approx(h_norm(weight - result.weight, H), rel=1e-3)


@pytest.mark.parametrize(
    "scheme", [QuantScheme(bits=4, group_size=16), QuantScheme(bits=4, symmetric=False, group_size=None)]
)
def test_joint_quantization_keeps_zeros_on_the_grid(scheme):
    weight, H = correlated(16, 64)
    result, _ = solve(weight, H, Mask(pattern=NMPattern(2, 4)), scheme, block_size=24)
    assert is_nm_sparse(result.weight, NMPattern(2, 4))
    assert torch.equal(result.grid.fake_quantize(result.weight), result.weight)  # every weight on the grid
    codes = result.grid.quantize(result.weight)
    zero_code = 0 if result.grid.zero_point is None else result.grid.zero_point.expand(16, 64)
    assert torch.equal(codes == zero_code, result.weight == 0)  # a zero is zero's code, and only zero


def test_without_pruning_the_solve_is_gptq():
    """No mask: the loop is GPTQ's (per-channel grid from the dense weight; group grids from the
    updated weights), so it matches the gptq plugin's solve."""
    weight, H = correlated(12, 64)
    for scheme in (QuantScheme(bits=3, group_size=16), QuantScheme(bits=4, group_size=None)):
        result, _ = solve(weight, H, Mask(), scheme, block_size=32)
        reference = gptq_quantize(weight, H, scheme, block_size=32)
        torch.testing.assert_close(result.weight, reference.weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.grid.scale, reference.grid.scale)


def test_sparsity_params_are_validated():
    from pydantic import ValidationError

    for bad in ({"pattern": "4:4"}, {"pattern": "3:2"}, {"sparsity": 0.0}, {"sparsity": 1.0}, {}):
        with pytest.raises(ValidationError):
            SparsityParams(**bad)
    with pytest.raises(ValidationError, match="not both"):
        SparsityParams(pattern="2:4", sparsity=0.5)
    assert SparsityParams(pattern=" 2 : 4 ").structure == "2:4"
    assert SparsityParams(sparsity=0.5).structure == "unstructured"


def test_input_norms_equal_the_hessian_diagonal():
    block = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    layers = {"first": block[0], "last": block[2]}
    inputs = [((torch.randn(1, rows, 6),), {}) for rows in (5, 7, 3)]
    cpu = torch.device("cpu")
    norms, groups = collect_input_norms(block, layers, inputs, cpu)
    hessians, hessian_groups = collect_hessians(block, layers, inputs, cpu)
    assert groups == hessian_groups
    for name in layers:
        torch.testing.assert_close(norms[name].norms(), hessians[name].input_norms())
        assert (norms[name].samples, norms[name].tokens) == (3, 15)
    x = torch.cat([args[0][0] for args, _ in inputs])  # Wanda's sqrt(scaler_row): mean over samples of ‖x_j‖²
    torch.testing.assert_close(norms["first"].norms(), (x.square().sum(0) / 3).sqrt())


def test_magnitude_bias_free_grid_example_keeps_zero_codes():
    """A pruned weight quantized by the host's grid stays exactly zero (what rtn after pruning relies on)."""
    weight = torch.randn(8, 32)
    weight[:, ::2] = 0
    for symmetric in (True, False):
        grid = compute_grid(weight, QuantScheme(bits=3, symmetric=symmetric, group_size=16))
        assert (grid.fake_quantize(weight)[:, ::2] == 0).all()
