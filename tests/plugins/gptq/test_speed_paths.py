"""The faster paths of the GPTQ solve and its Hessians against the paths they replace, on the CPU.

On CUDA the factor of ``H⁻¹`` comes from one Cholesky factor of the reversed matrix and the
Hessian products fill only the upper triangle; here both are forced on and compared with the
reference route and the full products. Layers sharing an input are solved as one stacked
weight: through the engine, that must give exactly the layer-by-layer solves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import hessian
from compress.errors import UserError
from compress.hessian import Hessian, collect_hessians, h_norms, inverse_factor
from compress.quant import QuantScheme
from compress_gptq.method import GPTQ
from compress_gptq.solve import output_error, quantize_in_place
from tests.plugins.gptq.test_gptq import correlated_problem


@pytest.mark.parametrize("act_order", [False, True])
def test_reversed_factor_is_the_reference_factor(act_order):
    _, H = correlated_problem(1, 320, seed=11)
    reference = inverse_factor(H, 0.01, act_order, route="inverse")
    reversed_ = inverse_factor(H, 0.01, act_order, route="reversed")
    upper = reversed_.upper
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    assert upper.stride() == reference.upper.stride()  # column-major, as the solves have read it
    torch.testing.assert_close(upper, reference.upper, rtol=0, atol=1e-5 * reference.upper.abs().max().item())
    assert reversed_.damp == reference.damp and torch.equal(reversed_.dead, reference.dead)
    assert (reversed_.perm is None) == (not act_order)
    if act_order:
        assert torch.equal(reversed_.perm, reference.perm)


def test_reversed_factor_refuses_what_the_reference_refuses():
    for route in hessian.FACTOR_ROUTES:
        with pytest.raises(UserError, match="not positive definite"):
            inverse_factor(-torch.eye(16), 0.0, False, "layer", route=route)
    with pytest.raises(ValueError, match="route"):
        inverse_factor(torch.eye(4), 0.01, False, route="lu")


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "scheme", [QuantScheme(bits=4, group_size=128), QuantScheme(bits=3, group_size=64, symmetric=False)]
)
def test_gptq_through_the_reversed_factor_keeps_the_codes(act_order, scheme):
    """Same codes; group scales (computed from the updated weights) and the output error equal
    to float rounding."""
    weight, H = correlated_problem(192, 512, seed=3)
    results = {}
    for route in hessian.FACTOR_ROUTES:
        factor = inverse_factor(H, 0.01, act_order, route=route)
        result = quantize_in_place(weight.clone(), factor, scheme)
        results[route] = result, output_error(result, factor, weight)
    (reference, reference_error), (fast, fast_error) = results["inverse"], results["reversed"]
    scale = reference.grid.scale.repeat_interleave(scheme.group_size, 1)
    codes = torch.round(reference.weight / scale), torch.round(fast.weight / scale)
    assert (codes[0] != codes[1]).float().mean().item() <= 1e-4
    torch.testing.assert_close(fast.grid.scale, reference.grid.scale, rtol=1e-5, atol=0)
    assert fast_error == pytest.approx(reference_error, rel=1e-5)


def problem(dtype: torch.dtype = torch.float32):
    """Two Linears of 10 and 4 inputs; samples of uneven lengths (9 rows do not fit a 12-row buffer)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)
    layers = {"first": block[0], "last": block[2]}
    inputs = [((torch.randn(1, rows, 10).to(dtype),), {}) for rows in (5, 5, 9, 5, 3)]
    return block, layers, inputs


@pytest.mark.parametrize("product_bytes", [0, 4 * 10 * 12])
def test_triangle_products_give_the_full_products(monkeypatch, product_bytes):
    """Bands of 4 rows (10 = 4 + 4 + 2): the upper triangle multiplied, the lower one mirrored."""
    monkeypatch.setattr(hessian, "TRIANGLE_ROWS", 4)
    block, layers, inputs = problem()
    cpu = torch.device("cpu")
    full, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes)
    triangle, _ = collect_hessians(block, layers, inputs, cpu, product_bytes=product_bytes, triangle=True)
    for name in layers:
        torch.testing.assert_close(triangle[name].matrix, full[name].matrix)
        assert (triangle[name].samples, triangle[name].tokens) == (5, 27)
    H = triangle["first"].matrix
    assert torch.equal(H[4:, :4], H[:4, 4:].T) and torch.equal(H[8:, 4:8], H[4:8, 8:].T)


def test_triangle_bf16_products_fall_back_band_by_band(monkeypatch):
    """bf16 forms stood in for on the CPU: ``addmm`` refuses the later bands (not contiguous),
    so those go through the bands form, and every band is added exactly once."""
    used = []

    def in_place(out, a, b):
        if not out.is_contiguous():
            raise RuntimeError("out must be contiguous")
        used.append("in place")
        out.addmm_(a.float().T, b.float())

    def in_bands(out, a, b):
        used.append("bands")
        out.add_(a.float().T @ b.float())

    monkeypatch.setattr(hessian, "TRIANGLE_ROWS", 4)
    monkeypatch.setattr(hessian, "_low_precision", lambda flat: flat.dtype == torch.bfloat16)
    monkeypatch.setattr(hessian, "LOW_PRECISION_FORMS", (in_place, in_bands))
    block, layers, inputs = problem(torch.bfloat16)
    cpu = torch.device("cpu")
    low, _ = collect_hessians(block, layers, inputs, cpu, low_precision=True, triangle=True)
    assert used[:3] == ["in place", "bands", "bands"]
    plain, _ = collect_hessians(block, layers, inputs, cpu)
    for name in layers:
        torch.testing.assert_close(low[name].matrix, plain[name].matrix)


def test_tf32_norms_change_nothing_on_the_cpu():
    weight, H = correlated_problem(24, 64, seed=2)
    before = torch.backends.cuda.matmul.allow_tf32
    assert h_norms(H, weight, weight / 3, tf32=True) == h_norms(H, weight, weight / 3)
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_solves_in_the_engine_equal_layer_by_layer_solves(run_recipe, monkeypatch, act_order):
    """q/k/v and gate/up are solved as one stacked weight; solving each layer alone (with a copy
    of the shared Hessian) gives the same weights, grids and objectives, bit for bit."""
    stage = {"method": "gptq", "bits": 4, "group_size": 32, "act_order": act_order, "rtn_reference": False}
    stage["overlap"] = False  # the groups one by one through quantize_group
    recipe = {"stages": [stage], "output": None}
    stacked = run_recipe(recipe).context
    joint = GPTQ.quantize_group
    sizes = []

    def one_by_one(self, context, modules, shared):
        sizes.append(len(modules))
        reports = {}
        for name, module in modules.items():
            copy = Hessian(shared.matrix.clone(), shared.samples, shared.tokens)
            reports.update(joint(self, context, {name: module}, copy))
        return reports

    monkeypatch.setattr(GPTQ, "quantize_group", one_by_one)
    separate = run_recipe(recipe).context
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 3, 3]  # per block: o, down, gate/up, q/k/v
    for (name, a), (_, b) in zip(stacked.model.state_dict().items(), separate.model.state_dict().items()):
        assert torch.equal(a, b), name
    layers = stacked.report.stages[0].layers
    assert all(layers[name]["objective"] == d["objective"] for name, d in separate.report.stages[0].layers.items())
    for name in layers:
        assert torch.equal(stacked.layers[name].quant.scale, separate.layers[name].quant.scale), name
