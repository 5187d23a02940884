"""The fused column loop (its torch emulation, which the Triton kernel mirrors line for line)
and bf16 Hessian products: same results as the unfused paths, and safe fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import hessian
from compress.hessian import collect_hessians
from compress.quant import QuantScheme, compute_grid
from compress_gptq import fused
from compress_gptq.solve import KernelCache, gptq_quantize
from tests.plugins.gptq.test_gptq import FAST_CASES, correlated_problem

ROWS = 2 * fused.ROWS_PER_PROGRAM + 6  # two full slabs and a partial one


@pytest.fixture
def emulated(monkeypatch):
    """The fused loop on CPU, through the kernel's torch emulation."""
    monkeypatch.setattr(fused, "launcher", lambda device: fused.emulate)


def assert_same(a, b):
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.grid.scale, b.grid.scale)
    if a.grid.zero_point is not None:
        assert torch.equal(a.grid.zero_point, b.grid.zero_point)
    assert torch.equal(a.row_errors, b.row_errors)


@pytest.mark.parametrize("symmetric,act_order,granularity,group_size,block_size", FAST_CASES)
def test_fused_loop_equals_the_unfused_loop_bitwise(
    emulated, symmetric, act_order, granularity, group_size, block_size
):
    weight, H = correlated_problem(ROWS, 384, seed=5)
    scheme = QuantScheme(bits=3, symmetric=symmetric, granularity=granularity, group_size=group_size)
    options = {"block_size": block_size, "act_order": act_order}
    unfused = gptq_quantize(weight, H, scheme, **options, kernels=KernelCache())
    result = gptq_quantize(weight, H, scheme, **options, kernels=KernelCache(fused=True))
    assert result.column_loop == "triton" and unfused.column_loop == "eager"
    assert_same(result, unfused)


@pytest.mark.parametrize("act_order", [False, True])
def test_fused_loop_keeps_frozen_outliers_of_an_inherited_grid(emulated, act_order):
    weight, H = correlated_problem(ROWS, 256, seed=6)
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    grid = compute_grid(weight * 0.9, scheme)
    mask = weight.abs() > weight.abs().quantile(0.95)
    kept = torch.where(mask, weight.round(decimals=2), grid.fake_quantize(weight))
    options = {"grid": grid, "frozen": mask, "frozen_values": kept, "act_order": act_order, "block_size": 128}
    unfused = gptq_quantize(weight, H, scheme, **options, kernels=KernelCache())
    result = gptq_quantize(weight, H, scheme, **options, kernels=KernelCache(fused=True))
    assert result.column_loop == "triton"
    assert_same(result, unfused)
    assert torch.equal(result.weight[mask], kept[mask])


def test_failing_fused_loop_falls_back_with_a_warning(monkeypatch):
    def broken(*_args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(fused, "launcher", lambda device: broken)
    weight, H = correlated_problem(ROWS, 256, seed=7)
    scheme = QuantScheme(bits=4, group_size=128)
    with pytest.warns(UserWarning, match="fused column loop failed"):
        result = gptq_quantize(weight, H, scheme, kernels=KernelCache(fused=True))
    assert result.column_loop == "eager"
    assert_same(result, gptq_quantize(weight, H, scheme))


def test_no_fused_loop_on_cpu():
    assert fused.launcher(torch.device("cpu")) is None
    weight, H = correlated_problem(8, 128, seed=8)
    result = gptq_quantize(weight, H, QuantScheme(bits=4, group_size=64), kernels=KernelCache(fused=True))
    assert result.column_loop == "eager"


def bf16_problem():
    block = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).to(torch.bfloat16)
    layers = {"first": block[0], "last": block[2]}
    inputs = [((torch.randn(1, rows, 6).to(torch.bfloat16),), {}) for rows in (5, 5, 9, 5, 3)]
    return block, layers, inputs


@pytest.mark.parametrize("product_bytes", [0, 4 * 6 * 12])
def test_low_precision_products_change_nothing_on_cpu(product_bytes):
    block, layers, inputs = bf16_problem()
    cpu = torch.device("cpu")
    plain, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes)
    low, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes, low_precision=True)
    for name in layers:
        assert torch.equal(low[name].matrix, plain[name].matrix)


@pytest.mark.parametrize("product_bytes", [0, 4 * 6 * 12])
def test_unavailable_low_precision_products_fall_back_to_float32(monkeypatch, product_bytes):
    """Forced on the CPU, where the mixed-dtype addmm does not exist: bf16 staging, then the
    float32 products, with a warning, giving the float32 path's sums to rounding."""
    monkeypatch.setattr(hessian, "_low_precision", lambda flat: flat.dtype == torch.bfloat16)
    block, layers, inputs = bf16_problem()
    cpu = torch.device("cpu")
    plain, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes)
    with pytest.warns(UserWarning, match="Hessian products unavailable"):
        low, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes, low_precision=True)
    for name in layers:
        torch.testing.assert_close(low[name].matrix, plain[name].matrix)


def test_bf16_products_in_bands_when_addmm_wants_a_bf16_input(monkeypatch):
    """The CPU has neither mixed-dtype op: ``mm`` with ``out_dtype`` is stood in for (bf16
    factors, float32 result), ``addmm``'s is not and fails, so the bands form runs."""
    plain_mm, bands = torch.mm, []

    def mm(a, b, out_dtype=None):
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        bands.append(a.shape[0])
        return plain_mm(a.float(), b.float())

    monkeypatch.setattr(hessian, "_low_precision", lambda flat: flat.dtype == torch.bfloat16)
    monkeypatch.setattr(hessian, "BAND_BYTES", 4 * 6 * 4)  # bands of 4 rows: 6 = 4 + 2
    monkeypatch.setattr(torch, "mm", mm)
    block, layers, inputs = bf16_problem()
    cpu = torch.device("cpu")
    low, _ = collect_hessians(block, layers, inputs, cpu, low_precision=True)
    monkeypatch.setattr(torch, "mm", plain_mm)
    assert set(bands) == {4, 2}  # the first input's 6 rows of H; the last input's 4 in one band
    plain, _ = collect_hessians(block, layers, inputs, cpu)
    for name in layers:
        torch.testing.assert_close(low[name].matrix, plain[name].matrix)
