"""Round-to-nearest grids: hand-computed examples and properties.

Hand examples use scales that are powers of two so every expected value is exact in
float32 and can be compared with ``torch.equal``.
"""

import re

import pydantic
import pytest
import torch

from compress.errors import UserError
from compress.quant import QuantGrid, QuantScheme, compute_grid
from compress.quant.params import QuantParams
from compress.validate import check_recipe

F32 = torch.float32


def t(values, dtype=F32):
    return torch.tensor(values, dtype=dtype)


def check(grid: QuantGrid, weight, scale, zero_point, codes, dequant):
    assert grid.scale.dtype == F32
    assert torch.equal(grid.scale, t(scale))
    if zero_point is None:
        assert grid.zero_point is None
    else:
        assert grid.zero_point.dtype == torch.int8
        assert torch.equal(grid.zero_point, t(zero_point, torch.int8))
    q = grid.quantize(weight)
    assert q.dtype == torch.int8
    assert torch.equal(q, t(codes, torch.int8))
    assert torch.equal(grid.dequantize(q), t(dequant))
    assert torch.equal(grid.fake_quantize(weight), t(dequant))


def test_tensor_symmetric():
    # 4 bits: codes in [-8, 7]; scale = 1.875 / 7.5 = 0.25.
    # w/scale: 7.5 -> 8 -> clamped 7; 2.5 -> 2 and 1.5 -> 2 (half to even);
    # -7.5 -> -8 (reachable: the negative side has one more code).
    w = t([[1.875, -0.5, 0.625, 0.375], [0.3, -1.0, -1.875, 0.0]])
    grid = compute_grid(w, QuantScheme(bits=4, granularity="tensor"))
    check(
        grid,
        w,
        scale=[0.25],
        zero_point=None,
        codes=[[7, -2, 2, 2], [1, -4, -8, 0]],
        dequant=[[1.75, -0.5, 0.5, 0.5], [0.25, -1.0, -2.0, 0.0]],
    )


def test_tensor_asymmetric():
    # 4 bits: range [-1, 2.75], scale = 3.75 / 15 = 0.25, zero_point = -8 + 4 = -4.
    # 0.125: 0.5 + (-4) = -3.5 -> -4 (half to even) -> dequantizes to 0.
    w = t([[-1.0, 2.75], [0.5, 0.125]])
    grid = compute_grid(w, QuantScheme(bits=4, symmetric=False, granularity="tensor"))
    check(
        grid,
        w,
        scale=[0.25],
        zero_point=[-4],
        codes=[[-8, 7], [-2, -4]],
        dequant=[[-1.0, 2.75], [0.5, 0.0]],
    )


def test_channel_symmetric():
    # 3 bits: codes in [-4, 3], half range 3.5. Row scales 7/3.5 = 2 and 1.75/3.5 = 0.5.
    # Row 0: 3.5 -> 4 -> 3, -1.5 -> -2, 0.5 -> 0. Row 1: -3.5 -> -4, 0.5 -> 0, 2 -> 2.
    w = t([[7.0, -3.0, 1.0], [-1.75, 0.25, 1.0]])
    grid = compute_grid(w, QuantScheme(bits=3, granularity="channel"))
    check(
        grid,
        w,
        scale=[[2.0], [0.5]],
        zero_point=None,
        codes=[[3, -2, 0], [-4, 0, 2]],
        dequant=[[6.0, -4.0, 0.0], [-2.0, 0.0, 1.0]],
    )


def test_channel_asymmetric():
    # 2 bits: codes in [-2, 1], range 3.
    # Row 0: range [0, 1.5] (0 always included), scale 0.5, zero_point -2.
    # Row 1: range [-3, 0], scale 1, zero_point -2 + 3 = 1;
    #   -1.5 + 1 = -0.5 -> 0 (zero point added before rounding, half to even).
    w = t([[0.5, 1.0, 1.5], [-3.0, 0.0, -1.5]])
    grid = compute_grid(w, QuantScheme(bits=2, symmetric=False, granularity="channel"))
    check(
        grid,
        w,
        scale=[[0.5], [1.0]],
        zero_point=[[-2], [1]],
        codes=[[-1, 0, 1], [-2, 1, 0]],
        dequant=[[0.5, 1.0, 1.5], [-3.0, 0.0, -1.0]],
    )


def test_group_symmetric():
    # 4 bits, groups of 2 columns. Scales: 1.875/7.5, all-zero -> 1, 0.9375/7.5, 3.75/7.5.
    w = t([[1.875, -0.25, 0.0, 0.0], [0.9375, -0.5, 3.75, 1.0]])
    grid = compute_grid(w, QuantScheme(bits=4, group_size=2))
    check(
        grid,
        w,
        scale=[[0.25, 1.0], [0.125, 0.5]],
        zero_point=None,
        codes=[[7, -1, 0, 0], [7, -4, 7, 2]],
        dequant=[[1.75, -0.25, 0.0, 0.0], [0.875, -0.5, 3.5, 1.0]],
    )


def test_group_asymmetric():
    # 3 bits: codes in [-4, 3], range 7, groups of 3 columns.
    # Group 0: range [-1.75, 1.75], scale 0.5, zero_point round(-4 + 3.5) = round(-0.5) = 0;
    #   -3.5 -> -4, 3.5 -> 4 -> clamped 3.
    # Group 1: range [0, 3.5], scale 0.5, zero_point -4.
    w = t([[-1.75, 0.0, 1.75, 1.0, 2.0, 3.5]])
    grid = compute_grid(w, QuantScheme(bits=3, symmetric=False, group_size=3))
    check(
        grid,
        w,
        scale=[[0.5, 0.5]],
        zero_point=[[0, -4]],
        codes=[[-4, 0, 3, -2, 0, 3]],
        dequant=[[-2.0, 0.0, 1.5, 1.0, 2.0, 3.5]],
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_has_scale_one_and_dequantizes_to_zero(symmetric):
    w = t([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.25]])
    grid = compute_grid(w, QuantScheme(bits=4, symmetric=symmetric, group_size=4))
    assert grid.scale[0, 0].item() == 1.0
    if not symmetric:
        assert grid.zero_point[0, 0].item() == -8
    out = grid.fake_quantize(w)
    assert torch.equal(out[0, :4], torch.zeros(4))
    assert not torch.signbit(out[0, :4]).any()


def test_constant_positive_group_asymmetric_is_exact():
    # 2 bits: range [0, 0.75], scale 0.25, zero_point -2; 0.75 -> 3 - 2 = 1.
    w = t([[0.75, 0.75, 0.75, 0.75]])
    grid = compute_grid(w, QuantScheme(bits=2, symmetric=False, group_size=4))
    check(grid, w, scale=[[0.25]], zero_point=[[-2]], codes=[[1, 1, 1, 1]], dequant=w.tolist())


def test_constant_positive_bf16_asymmetric_is_exact():
    w = torch.full((3, 8), 0.3, dtype=torch.bfloat16)
    for bits in range(2, 9):
        grid = compute_grid(w, QuantScheme(bits=bits, symmetric=False, group_size=4))
        assert torch.equal(grid.fake_quantize(w), w)


def test_constant_symmetric_group():
    # 4 bits: scale 1.5 / 7.5 = 0.2; 1.5 / 0.2 = 7.5 -> clamped to 7 -> 7 * 0.2 = 1.4.
    # Negative constant: -7.5 -> -8 (half to even) -> -1.6.
    w = t([[1.5, 1.5, -1.5, -1.5]])
    grid = compute_grid(w, QuantScheme(bits=4, group_size=2))
    assert torch.equal(grid.quantize(w), t([[7, 7, -8, -8]], torch.int8))
    assert torch.allclose(grid.fake_quantize(w), t([[1.4, 1.4, -1.6, -1.6]]), rtol=1e-6, atol=0)


def test_group_size_not_dividing_width_names_layer():
    with pytest.raises(UserError) as info:
        scheme = QuantScheme(bits=4, group_size=64)
        compute_grid(torch.ones(4, 100), scheme, name="model.layers.0.mlp")
    assert "model.layers.0.mlp" in str(info.value)
    assert "group_size 64 does not divide the input width 100" in str(info.value)


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(pydantic.ValidationError):
        QuantScheme(bits=bits)


def test_group_size_rules():
    assert QuantScheme(bits=4).group_size == 128
    assert QuantScheme(bits=4, granularity="channel").group_size is None
    # null means per output channel, the same in every quantizer's parameters
    assert QuantScheme(bits=4, group_size=None) == QuantScheme(bits=4, granularity="channel")
    with pytest.raises(pydantic.ValidationError, match="group_size is required"):
        QuantScheme(bits=4, granularity="group", group_size=None)
    with pytest.raises(pydantic.ValidationError, match="only allowed"):
        QuantScheme(bits=4, granularity="tensor", group_size=32)
    with pytest.raises(pydantic.ValidationError):
        QuantScheme(bits=4, group_size=0)
    with pytest.raises(pydantic.ValidationError):
        QuantScheme(bits=4, unknown=1)


ALL_SCHEMES = [
    QuantScheme(bits=bits, symmetric=symmetric, granularity=granularity, group_size=size)
    for bits in (2, 3, 4, 8)
    for symmetric in (True, False)
    for granularity, size in (("tensor", None), ("channel", None), ("group", 16))
]


def _weight(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    w[::5] += 0.7  # some rows entirely positive-shifted
    w[3] = 0.0
    return w


def _per_element(grid: QuantGrid, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-scale-block tensor repeated to one value per weight."""
    if grid.scheme.granularity == "group":
        x = x.repeat_interleave(grid.scheme.group_size, dim=1)
    return x.float().broadcast_to(shape)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=str)
def test_error_bounds_and_code_range(scheme):
    w = _weight(scheme.bits)
    grid = compute_grid(w, scheme)
    q = grid.quantize(w)
    assert q.shape == w.shape
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax

    scale = _per_element(grid, grid.scale, w.shape)
    zp = 0 if grid.zero_point is None else _per_element(grid, grid.zero_point, w.shape)
    lo, hi = (scheme.qmin - zp) * scale, (scheme.qmax - zp) * scale
    err = (grid.fake_quantize(w) - w).abs()
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.5  # the bound below is not vacuous
    tol = 1e-6 * w.abs().max()
    assert (err[inside] <= scale[inside] / 2 + tol).all()
    # Outside the grid (clamped ends) the error is still below one step.
    assert (err <= scale + tol).all()


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=str)
def test_quantize_columns_matches_full(scheme):
    w = _weight(100 + scheme.bits)
    grid = compute_grid(w, scheme)
    q = grid.quantize(w)
    for start, stop in [(0, 1), (5, 6), (7, 23), (16, 32), (40, 64)]:
        cols = grid.quantize_columns(w[:, start:stop], start)
        assert torch.equal(cols, q[:, start:stop])
        back = grid.dequantize_columns(cols, start, torch.bfloat16)
        assert torch.equal(back, grid.dequantize(q, torch.bfloat16)[:, start:stop])


def test_quantize_columns_rejects_1d():
    grid = compute_grid(torch.randn(4, 8), QuantScheme(bits=4, granularity="channel"))
    with pytest.raises(ValueError, match=r"\(out, k\)"):
        grid.quantize_columns(torch.randn(4), 0)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=str)
def test_fake_quantize_is_idempotent(scheme):
    w = _weight(200 + scheme.bits)
    grid = compute_grid(w, scheme)
    once = grid.fake_quantize(w)
    assert torch.equal(grid.fake_quantize(once), once)


def test_bf16_input_gives_bf16_output_and_float32_scales():
    w = _weight(7).to(torch.bfloat16)
    grid = compute_grid(w, QuantScheme(bits=4, symmetric=False, group_size=16))
    assert grid.scale.dtype == F32
    assert grid.scale.shape == (24, 4) and grid.zero_point.shape == (24, 4)
    out = grid.fake_quantize(w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, grid.dequantize(grid.quantize(w)).to(torch.bfloat16))
    # Scales come from the bf16 values computed in float32.
    assert torch.equal(grid.scale, compute_grid(w.float(), grid.scheme).scale)


def test_shapes_and_to():
    w = torch.randn(6, 32)
    cases = [("tensor", None, (1,)), ("channel", None, (6, 1)), ("group", 8, (6, 4))]
    for granularity, size, shape in cases:
        scheme = QuantScheme(bits=4, symmetric=False, granularity=granularity, group_size=size)
        grid = compute_grid(w, scheme)
        assert grid.scale.shape == shape and grid.zero_point.shape == shape
        moved = grid.to("cpu")
        assert moved.scheme == scheme and torch.equal(moved.scale, grid.scale)
        assert torch.equal(moved.zero_point, grid.zero_point)
    assert compute_grid(w, QuantScheme(bits=4, group_size=8)).to("cpu").zero_point is None


QUANTIZERS = ["rtn", "gptq", "kl_ptq"]


@pytest.mark.parametrize("method", QUANTIZERS)
def test_every_quantizer_extends_one_parameter_set(host, method):
    params_class = host.methods()[method].Params
    assert issubclass(params_class, QuantParams)
    # the same keys mean the same grid in every method
    assert params_class(bits=4, group_size=None).scheme() == QuantScheme(bits=4, granularity="channel")
    assert params_class(bits=3, group_size=32, symmetric=False).scheme() == QuantScheme(
        bits=3, group_size=32, symmetric=False
    )
    assert params_class(bits=4).scheme().group_size == 128


def test_quantizers_refuse_granularities_they_do_not_implement(host, write_recipe):
    stages = [{"method": "kl_ptq", "bits": 4, "granularity": "tensor"}]
    with pytest.raises(UserError, match=r"recipe.yaml:\d+:\d+: .*granularity 'tensor' is not available here"):
        check_recipe(host, write_recipe(stages=stages))


@pytest.mark.parametrize("method", QUANTIZERS)
def test_group_width_is_checked_once_at_recipe_check(host, write_recipe, method):
    """One check for every quantizer, from the scheme the stage produces: one line naming the layer."""
    with pytest.raises(UserError) as error:
        check_recipe(host, write_recipe(stages=[{"method": method, "bits": 4, "group_size": 100}]))
    message = str(error.value)
    assert "\n" not in message
    assert re.search(
        r"recipe\.yaml:\d+:\d+: model\.layers\.0\.self_attn\.q_proj: group_size 100 does not divide "
        r"the input width 576$",
        message,
    ), message
