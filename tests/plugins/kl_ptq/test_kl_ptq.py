"""kl_ptq: soft threshold, lambda and outlier count, half-step inliers, exact bits, KL, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from compress.context import Context
from compress.errors import UserError
from compress.quant import QuantScheme
from compress_kl_ptq.method import (
    KLPTQ,
    KLPTQParams,
    effective_bits,
    group_view,
    lambda_for_count,
    quantize_layer,
    soft_threshold,
    split_outliers,
)


class FakeContext:
    """Only what compress_layer reads and writes: the layer states."""

    def __init__(self):
        self.layers = {}

    update_layer = Context.update_layer


@pytest.fixture(scope="module")
def real_layers(tiny_lm_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    return {
        name: module.weight.data.clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.1.")
    }


def test_soft_threshold_rule_on_random_and_edge_values():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        lam = torch.rand((), generator=generator, dtype=torch.float64).item() * 0.1
        w = torch.randn(4096, generator=generator) * 0.2
        shrunk, mask = soft_threshold(w, lam)
        assert torch.equal(mask, w.double().abs() > math.sqrt(lam))
        assert torch.equal(mask, shrunk != 0)
        expected = torch.sign(w.double()) * (w.double().abs() - lam / w.double().abs())
        assert torch.allclose(shrunk[mask].double(), expected[mask], rtol=1e-6, atol=1e-12)
    # edges: t exactly at the threshold (lambda = t² is exact in float64), its float32 neighbours,
    # zero, signs, and lambda = 0
    t = torch.tensor(0.0371, dtype=torch.float32)
    lam = t.double().item() ** 2
    up, down = torch.nextafter(t, torch.tensor(1.0)), torch.nextafter(t, torch.tensor(0.0))
    w = torch.stack([t, -t, up, -up, down, -down, torch.tensor(0.0), torch.tensor(-0.0)])
    _, mask = soft_threshold(w, lam)
    assert mask.tolist() == [False, False, True, True, False, False, False, False]
    assert mask.tolist() == (w.double().abs() > math.sqrt(lam)).tolist()
    _, mask = soft_threshold(torch.tensor([0.0, 1e-30, -2.0]), 0.0)
    assert mask.tolist() == [False, True, True]


def test_outlier_fraction_monotone_in_lambda():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    fractions = []
    for lam in torch.logspace(-8, -1, 40).tolist():
        mask, _ = split_outliers(w, KLPTQParams(bits=3, group_size=64, outlier_lambda=lam))
        fractions.append(mask.float().mean().item())
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[0] > 0.99 and fractions[-1] == 0.0


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.037, 0.2])
def test_outlier_fraction_hits_target_per_layer(fraction, real_layers):
    for weight in [torch.randn(96, 320, generator=torch.Generator().manual_seed(2)), *real_layers.values()]:
        params = KLPTQParams(bits=3, group_size=64, outlier_fraction=fraction)
        mask, lam = split_outliers(weight, params)
        target = fraction * weight.numel()
        assert abs(int(mask.sum()) - target) <= 1
        # the rule: every weight strictly above sqrt(lambda) is an outlier, none strictly below
        _, above = soft_threshold(weight, lam)
        assert not (above & ~mask).any()
        assert not (mask & (weight.double() ** 2 < lam)).any()


def test_outlier_fraction_hits_target_per_group(real_layers):
    weight = real_layers["model.layers.1.mlp.down_proj"]
    params = KLPTQParams(bits=3, group_size=64, outlier_fraction=0.05, lambda_scope="group")
    mask, lam = split_outliers(weight, params)
    assert lam.shape == (weight.shape[0], weight.shape[1] // 64)
    assert (group_view(mask, 64).sum(-1) == round(0.05 * 64)).all()


def test_lambda_for_count_separates_distinct_magnitudes():
    m = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    for k in range(6):
        lam = lambda_for_count(m, k).item()
        assert int((m.double() ** 2 > lam).sum()) == k


@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (3, True), (4, False)])
def test_inliers_within_half_a_step_or_clipped(bits, symmetric, real_layers):
    """Unclipped (clip ratio 1): every inlier within half a step of its value. Clipped: an inlier
    is either within half a step or clipped to the edge of its group's range."""
    for name, weight in real_layers.items():
        for clips in ([1.0], [0.7]):
            params = KLPTQParams(bits=bits, group_size=64, symmetric=symmetric, clip_ratios=clips)
            result = quantize_layer(name, weight, params)
            step = result.grid.scale.repeat_interleave(64, dim=1)
            error = (result.weight.float() - weight.float()).abs()
            inlier = ~result.mask
            within = error <= step * 0.5 * (1 + 1e-5)
            if clips == [1.0]:
                assert within[inlier].all(), name
            else:
                codes = result.grid.quantize(result.weight)
                clipped = (codes == result.grid.scheme.qmin) | (codes == result.grid.scheme.qmax)
                assert (within | clipped)[inlier].all(), name
                assert (~within & inlier).any(), name  # 0.7 clips some inliers
            # the weights lie on the two grids
            assert torch.equal(result.grid.fake_quantize(result.weight)[inlier], result.weight[inlier])
            outlier_grid = result.outlier_grid
            assert torch.equal(outlier_grid.fake_quantize(result.weight)[result.mask], result.weight[result.mask])


def test_effective_bits_hand_computed():
    # 2 rows x 8 columns, groups of 4 (4 groups); outliers at (0, 1), (0, 2) [group 0 of row 0]
    # and (1, 7) [group 1 of row 1]: 3 outliers in 2 groups.
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 1] = mask[0, 2] = mask[1, 7] = True
    params = KLPTQParams(bits=3, group_size=4, outlier_bits=8)
    bits, parts = effective_bits((2, 8), mask, params)
    # codes 16x3 + 4 scales x16 + 3 outliers x8 + 2 outlier scales x16 + CSR: 3 x log2(8)=3 bits + 2 rows x ceil(log2 9)=4
    assert parts == {
        "inlier_codes": 48,
        "inlier_scales": 64,
        "outlier_codes": 24,
        "outlier_scales": 32,
        "outlier_index": 17,
    }
    assert bits == (48 + 64 + 24 + 32 + 17) / 16
    asym = KLPTQParams(bits=3, group_size=4, outlier_bits=4, symmetric=False, outlier_index="bitmap")
    bits, parts = effective_bits((2, 8), mask, asym)
    assert bits == (48 + 4 * 24 + 3 * 4 + 2 * 24 + 16) / 16
    none, parts = effective_bits((2, 8), torch.zeros(2, 8, dtype=torch.bool), params)
    assert none == (48 + 64) / 16 and parts["outlier_index"] == 0


def test_report_storage_matches_effective_bits(real_layers):
    weight = real_layers["model.layers.1.self_attn.k_proj"]
    report = quantize_layer("k", weight, KLPTQParams(bits=4, group_size=64)).report()
    assert report["effective_bits"] == sum(report["storage_bits"].values()) / weight.numel()


@pytest.mark.parametrize("bits", [3, 4])
def test_kl_and_error_below_rtn_on_real_layers(bits, real_layers):
    from compress.quant import compute_grid
    from compress_kl_ptq.criterion import weight_kl

    for name, weight in real_layers.items():
        params = KLPTQParams(bits=bits, group_size=64, clip_ratios=[1.0, 0.9])
        report = quantize_layer(name, weight, params).report()
        grid = compute_grid(weight, QuantScheme(bits=bits, group_size=64))
        rtn_kl = weight_kl(weight, grid.fake_quantize(weight), None, "pointwise")
        assert report["kl_rtn"] == pytest.approx(rtn_kl)
        assert report["kl"] <= rtn_kl, name
        assert report["relative_error"] < report["relative_error_rtn"], name
        # pointwise KL is half the squared relative error, scaled by mean square over variance
        w = weight.double()
        assert report["kl"] == pytest.approx(
            report["relative_error"] ** 2 / 2 * w.pow(2).mean().item() / w.var(correction=0).item(), rel=1e-4
        )


def test_method_sets_layer_state(real_layers):
    layer = nn.Linear(576, 192, bias=False)
    layer.weight.data = real_layers["model.layers.1.self_attn.k_proj"].clone()
    original = layer.weight.data.clone()
    context = FakeContext()
    method = KLPTQ(KLPTQParams(bits=3, group_size=64))
    report = method.compress_layer(context, "k", layer)
    state = context.layers["k"]
    assert state.method == "kl_ptq" and state.outliers is not None
    assert state.quant.scheme == QuantScheme(bits=3, group_size=64) == method.produces().quant
    assert state.outliers.mask.shape == layer.weight.shape
    assert state.outliers.grid.scheme.bits == 8
    assert report["outlier_fraction"] == pytest.approx(0.01, abs=1 / layer.weight.numel())
    expected = (layer.weight.data - original).norm() / original.norm()
    assert report["relative_error"] == pytest.approx(expected.item(), rel=1e-5)


def test_bad_layers_are_named():
    method = KLPTQ(KLPTQParams(bits=3, group_size=64))
    with pytest.raises(UserError, match="group_size 64 does not divide the input width 100") as error:
        quantize_layer("model.odd", torch.randn(8, 100), method.params)
    assert error.value.where == "model.odd"
    layer = nn.Linear(64, 4, bias=False)
    layer.weight.data[1, 3] = float("nan")
    with pytest.raises(UserError, match="NaN") as error:
        method.compress_layer(FakeContext(), "model.bad", layer)
    assert "model.bad" in str(error.value)
    layer.weight.data[1, 3] = float("inf")
    with pytest.raises(UserError, match="NaN or inf"):
        method.compress_layer(FakeContext(), "model.bad", layer)


def test_per_channel_grids_with_group_size_null(real_layers):
    """group_size: null is one scale per output channel for both grids, as in rtn and gptq."""
    weight = real_layers["model.layers.1.self_attn.k_proj"]
    params = KLPTQParams(bits=3, group_size=None)
    assert params.scheme() == QuantScheme(bits=3, granularity="channel")
    result = quantize_layer("k", weight, params)
    assert result.grid.scheme == params.scheme() and result.grid.scale.shape == (weight.shape[0], 1)
    assert result.outlier_grid.scheme == QuantScheme(bits=8, granularity="channel")
    assert int(result.mask.sum()) == round(0.01 * weight.numel())
    # every inlier is on its row's grid, every outlier on the outlier grid
    inliers = result.grid.fake_quantize(result.weight)
    assert torch.equal(inliers[~result.mask], result.weight[~result.mask])
    outliers = result.outlier_grid.fake_quantize(result.weight)
    assert torch.equal(outliers[result.mask], result.weight[result.mask])
    by_group = quantize_layer("k", weight, KLPTQParams(bits=3, group_size=weight.shape[1]))
    assert torch.equal(result.weight, by_group.weight)  # one group as wide as the row: the same numbers
    assert result.report()["effective_bits"] == by_group.report()["effective_bits"]
    with pytest.raises(ValueError, match="granularity 'tensor' is not available"):
        KLPTQParams(bits=3, granularity="tensor")


def test_params_are_strict():
    with pytest.raises(ValueError):
        KLPTQParams(bits=3, group_size=64, unknown=1)
    with pytest.raises(ValueError, match="exactly one"):
        KLPTQParams(bits=3, outlier_fraction=0.01, outlier_lambda=0.1)
    assert KLPTQParams(bits=3, outlier_lambda=0.1).outlier_fraction is None


def test_recipe_end_to_end(write_recipe, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = write_recipe(stages=[{"method": "kl_ptq", "bits": 3, "group_size": 64, "clip_ratios": [1.0, 0.9]}])
    result = CliRunner().invoke(cli, ["apply", str(recipe)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = report["stages"][0]["layers"]
    assert len(layers) == 14  # 7 projections x 2 blocks
    for entry in layers.values():
        assert entry["kl"] <= entry["kl_rtn"]
        assert entry["outlier_fraction"] == pytest.approx(0.01, abs=1e-4)
        assert 3.25 < entry["effective_bits"] < 3.7
    assert "kl" in report["evaluation"]


def test_beats_rtn_on_model_kl(write_recipe, tmp_path):
    """kl_ptq W3 g64 against rtn W3 g64 (symmetric groups of 64), KL to the original's next-token
    distributions on a few WikiText-2 test sequences. kl_ptq spends about 0.3 bits more per weight
    (1% outliers at 8 bits plus their scales and indices): that is the method, and is reported."""
    kls = {}
    for method in ("rtn", "kl_ptq"):
        recipe = write_recipe(
            stages=[{"method": method, "bits": 3, "group_size": 64}],
            output={"dir": str(tmp_path / f"out-{method}")},
            evaluate=["kl"],
        )
        kls[method] = _run(recipe, tmp_path / f"out-{method}")
    assert kls["kl_ptq"] < kls["rtn"], kls


def _run(recipe, out_dir) -> float:
    from click.testing import CliRunner

    from compress.cli import cli

    result = CliRunner().invoke(cli, ["apply", str(recipe)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out_dir / "report.json").read_text())["evaluation"]
    kl = evaluation["kl"]
    return kl["compressed"] if isinstance(kl, dict) else kl


def test_candidates_function(real_layers):
    from compress.search import CandidateRequest
    from compress_kl_ptq.method import kl_ptq_candidates

    layer = nn.Linear(576, 192, bias=False)
    layer.weight.data = real_layers["model.layers.1.self_attn.k_proj"].clone()
    original = layer.weight.data.clone()
    request = CandidateRequest(settings={"bits": [3, 4], "group_size": [64, 100]})
    candidates = kl_ptq_candidates("k", layer, request)
    assert [c.setting["bits"] for c in candidates] == [3, 4]
    # same outliers, one code bit more per weight
    assert candidates[1].cost - candidates[0].cost == layer.weight.numel()
    assert candidates[0].error > candidates[1].error
    assert torch.equal(layer.weight.data, original)
    state = candidates[0].apply(layer)
    assert state.method == "kl_ptq" and state.outliers is not None
    achieved = (layer.weight.data - original).pow(2).sum() / original.pow(2).sum()
    assert achieved.item() == pytest.approx(candidates[0].error, rel=1e-5)


def test_a_format_without_outlier_storage_is_refused_at_recipe_check(host, write_recipe, tmp_path):
    from compress.validate import check_recipe

    path = write_recipe(
        stages=[{"method": "kl_ptq", "bits": 4, "group_size": 64}],
        output={"dir": str(tmp_path / "out"), "format": "compressed-tensors"},
    )
    with pytest.raises(UserError, match="'compressed-tensors' cannot store outlier weights .* stage 1 \\(kl_ptq\\)"):
        check_recipe(host, path)


# ---------------------------------------------------------------------------------------
# criterion, candidate grids, budget


def test_pointwise_sees_which_weight_moved_and_marginals_do_not():
    """A permutation of the quantized weights has the same value distribution: the marginal
    estimators score it as the original grid, the pointwise one as the damage it is."""
    from compress_kl_ptq.criterion import weight_kl

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    result = quantize_layer("w", w, KLPTQParams(bits=4, group_size=64, clip_ratios=[1.0]))
    shuffled = result.weight.flatten()[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(4))]
    shuffled = shuffled.view_as(w)
    for estimator in ("gaussian", "laplace"):
        assert weight_kl(w, shuffled, None, estimator) == pytest.approx(weight_kl(w, result.weight, None, estimator))
    assert weight_kl(w, shuffled, None, "pointwise") > 100 * weight_kl(w, result.weight, None, "pointwise")


def test_pointwise_penalises_clipping_and_rounding():
    """Too much clipping and too coarse a grid both raise the criterion; an interior clip ratio
    (mild clipping, finer steps) can beat round-to-nearest's range on a heavy-tailed layer."""
    from compress_kl_ptq.method import criterion, trials

    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(5)).pow(3) * 0.02  # heavy-tailed
    params = KLPTQParams(bits=3, group_size=64, outlier_fraction=0.0, clip_ratios=[1.0, 0.8, 0.3])
    scores = {t.ratio: criterion(w, t, "pointwise") for t in trials("w", w, params)}
    assert scores[0.8] < scores[1.0] and scores[0.8] < scores[0.3]
    coarse = KLPTQParams(bits=2, group_size=64, outlier_fraction=0.0, clip_ratios=[0.8])
    assert criterion(w, next(trials("w", w, coarse)), "pointwise") > scores[0.8]


def test_choice_is_the_least_criterion_among_all_candidates(real_layers):
    from compress_kl_ptq.method import criterion, trials

    weight = real_layers["model.layers.1.mlp.down_proj"]
    params = KLPTQParams(bits=3, group_size=64, outlier_fraction=[0.0, 0.01, 0.02], clip_ratios=[1.0, 0.9, 0.8])
    scores = [(criterion(weight, t, "pointwise"), t.split.fraction, t.ratio) for t in trials("d", weight, params)]
    assert len(scores) == 9
    report = quantize_layer("d", weight, params).report()
    best = min(scores)
    assert report["candidates"] == 9 and report["kl"] == best[0] and report["clip_ratio"] == best[2]
    assert report["outlier_fraction"] == pytest.approx(best[1], abs=1 / weight.numel())


def test_budget_is_met_exactly_and_buys_outliers(real_layers):
    weight = real_layers["model.layers.1.mlp.down_proj"]
    chosen = []
    for budget in (3.25, 3.3, 3.4, 3.7):
        params = KLPTQParams(bits=3, group_size=64, bits_per_weight=budget, clip_ratios=[1.0, 0.9])
        report = quantize_layer("d", weight, params).report()
        assert report["effective_bits"] <= budget
        assert report["effective_bits"] == sum(report["storage_bits"].values()) / weight.numel()
        chosen.append(report["outlier_fraction"])
    assert chosen[0] == 0.0 and chosen == sorted(chosen) and chosen[-1] > 0.0


def test_unreachable_budget_names_the_nearest_achievable(real_layers):
    weight = real_layers["model.layers.1.mlp.down_proj"]
    cheapest = 3 + 16 / 64
    with pytest.raises(UserError, match=f"the nearest achievable is {cheapest:.4f} bits") as error:
        quantize_layer("d", weight, KLPTQParams(bits=3, group_size=64, bits_per_weight=3.2))
    assert error.value.where == "d"
    # only outlier fractions that the layer cannot afford: the exact figure of the cheapest one
    params = KLPTQParams(bits=3, group_size=64, bits_per_weight=3.26, outlier_fraction=[0.01, 0.02])
    least = effective_bits(tuple(weight.shape), split_outliers(weight, params, 0.01)[0], params)[0]
    with pytest.raises(
        UserError, match=f"nearest achievable is {least:.4f} bits per weight \\(outlier_fraction 0.01\\)"
    ):
        quantize_layer("d", weight, params)


def test_check_layer_lower_bound(real_layers):
    """At recipe check only shapes are known: the bound is exact without outliers and never above
    what the weights then cost."""
    weight = real_layers["model.layers.1.mlp.down_proj"]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    for fraction in (0.0, 0.005, 0.02):
        params = KLPTQParams(bits=4, group_size=64, outlier_fraction=fraction)
        least, _ = params.least_bits(tuple(weight.shape))
        actual = effective_bits(tuple(weight.shape), split_outliers(weight, params)[0], params)[0]
        assert least == actual if fraction == 0 else least <= actual
    KLPTQ(KLPTQParams(bits=4, group_size=64, bits_per_weight=4.25)).check_layer("d", layer)
    with pytest.raises(UserError, match="nearest achievable is 4.2500 bits"):
        KLPTQ(KLPTQParams(bits=4, group_size=64, bits_per_weight=4.24)).check_layer("d", layer)


def test_fraction_defaults_and_estimator_names():
    assert KLPTQParams(bits=4).fractions() == [0.01]
    assert KLPTQParams(bits=4, bits_per_weight=4.3).fractions() == [0.0, 0.0025, 0.005, 0.01, 0.02]
    with pytest.raises(ValueError, match="did you mean 'histogram'"):
        KLPTQParams(bits=4, kl_estimator="histogramm")
    with pytest.raises(ValueError, match=r"every fraction must be in \[0, 0.5\)"):
        KLPTQParams(bits=4, outlier_fraction=[0.01, 0.6])
    with pytest.raises(ValueError, match=r"every ratio must be in \(0, 1\]"):
        KLPTQParams(bits=4, clip_ratios=[1.2])


def test_without_outliers_the_grid_is_deployable(host, write_recipe, tmp_path):
    """outlier_fraction: 0 is a plain (clipped, KL-chosen) grid: no outlier split, and
    compressed-tensors accepts the stage."""
    from compress.validate import check_recipe

    method = KLPTQ(KLPTQParams(bits=4, group_size=64, outlier_fraction=0.0))
    assert not method.produces().outliers
    layer = nn.Linear(256, 64, bias=False)
    context = FakeContext()
    method.compress_layer(context, "l", layer)
    assert context.layers["l"].outliers is None
    path = write_recipe(
        stages=[{"method": "kl_ptq", "bits": 4, "group_size": 32, "outlier_fraction": 0.0}],
        output={"dir": str(tmp_path / "out"), "format": "compressed-tensors"},
    )
    check_recipe(host, path)


def test_a_budget_without_room_for_outliers_makes_a_plain_grid(host, write_recipe, tmp_path):
    """bits_per_weight = bits + 16/group_size (rtn's storage) leaves no room for any outlier: the
    default candidate fractions that cannot fit are dropped, produces() says so, and the stage
    passes recipe check with compressed-tensors; one more outlier bit of room brings them back."""
    from compress.validate import check_recipe

    assert not KLPTQ(KLPTQParams(bits=4, group_size=64, bits_per_weight=4.25)).produces().outliers
    assert KLPTQ(KLPTQParams(bits=4, group_size=128, bits_per_weight=4.25)).produces().outliers
    assert KLPTQ(KLPTQParams(bits=4, group_size=64, outlier_fraction=0.01)).produces().outliers
    params = KLPTQParams(bits=4, group_size=64, bits_per_weight=4.25 + 0.0025 * 8)
    assert [params.fraction_can_fit(f) for f in params.fractions()] == [True, True, False, False, False]
    path = write_recipe(
        stages=[{"method": "kl_ptq", "bits": 4, "group_size": 32, "bits_per_weight": 4.5}],
        output={"dir": str(tmp_path / "out"), "format": "compressed-tensors"},
    )
    check_recipe(host, path)


def test_deployable_variant_round_trips_through_compressed_tensors(host, write_recipe, tmp_path):
    """The deployable kl_ptq (no outliers; the criterion picks each layer's clip ratio within the
    budget) is written as pack-quantized compressed-tensors: transformers' from_pretrained gives
    the in-memory model's logits exactly, and the stored codes and scales are kl_ptq's own
    (clipped) grids."""
    pytest.importorskip("compressed_tensors")
    from tests.test_compressed_tensors_writer import assert_grids_stored, assert_round_trip, compress

    stage = {"method": "kl_ptq", "bits": 3, "group_size": 64, "bits_per_weight": 3.25, "clip_ratios": [1.0, 0.85]}
    context, out = compress(host, write_recipe, tmp_path, [stage])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert all(state.outliers is None for state in context.layers.values())
    ratios = {entry["clip_ratio"] for entry in context.report.stages[0].layers.values()}
    assert 0.85 in ratios  # some grids are clipped, so the round trip covers clipped codes
    assert_grids_stored(context, out)
    assert_round_trip(context, out, dequantize=True)
    assert_round_trip(context, out)


def test_compressed_tensors_writer_refuses_a_layer_with_outliers(real_layers):
    """A layer state with outliers reaching the compressed-tensors writer (recipe check normally
    refuses it first) is an error, not a checkpoint without its outliers."""
    from compress.checkpoint.compressed_tensors import layer_schemes

    state = quantize_layer("l", real_layers["model.layers.1.mlp.down_proj"], KLPTQParams(bits=4, group_size=64)).state()
    assert state.outliers is not None
    with pytest.raises(UserError, match="cannot store outlier weights"):
        layer_schemes({"l": state})


@pytest.mark.parametrize("granularity", [{"group_size": 64}, {"group_size": None}], ids=["g64", "channel"])
def test_per_group_clip_is_the_least_criterion_over_ratio_combinations(real_layers, granularity):
    """clip_scope: group gives, per outlier fraction, a KL no higher than every layer-wide ratio;
    every group's ratio is its least-error one (checked by brute force); the assembled grid holds
    the quantized inliers exactly (so a writer stores them as they are)."""
    from compress_kl_ptq.criterion import weight_kl
    from compress_kl_ptq.method import criterion, trials

    weight = real_layers["model.layers.1.mlp.down_proj"]
    settings = {"bits": 3, "outlier_fraction": [0.0, 0.01], "clip_ratios": [1.0, 0.9, 0.8, 0.7], **granularity}
    layer_wide = KLPTQParams(**settings)
    per_group = KLPTQParams(**settings, clip_scope="group")
    grouped = list(trials("d", weight, per_group))
    assert len(grouped) == 2
    for trial in grouped:
        same_split = [t for t in trials("d", weight, layer_wide) if t.split.fraction == trial.split.fraction]
        assert criterion(weight, trial, "pointwise") <= min(criterion(weight, t, "pointwise") for t in same_split)
        inliers = ~trial.split.mask
        assert torch.equal(trial.grid.fake_quantize(weight)[inliers], trial.quantized[inliers])
        width = layer_wide.group_width(weight.shape[1])
        errors = torch.stack([group_view(((t.quantized - weight) * inliers).pow(2), width).sum(-1) for t in same_split])
        chosen = group_view(((trial.quantized - weight) * inliers).pow(2), width).sum(-1)
        assert torch.allclose(chosen, errors.min(0).values, rtol=0, atol=1e-12)
    result = quantize_layer("d", weight, per_group)
    report = result.report()
    assert report["candidates"] == 2 and report["clip_scope"] == "group"
    assert report["kl"] == min(weight_kl(weight, t.quantized, None, "pointwise") for t in grouped)
    assert 0.7 <= report["clip_ratio"] <= 1.0
    with pytest.raises(ValueError, match="clip_scope: group needs kl_estimator: pointwise"):
        KLPTQParams(bits=3, clip_scope="group", kl_estimator="gaussian")


@pytest.mark.parametrize("group_size", [32, None])
def test_candidate_cost_bounds_are_reached_by_packed_and_spread_outliers(group_size):
    """The bounds recipe check prices kl_ptq candidates with: exact without outliers; with them, the
    low end is reached by outliers packed into as few groups as they fill, the high end by one
    outlier per group, and any weights lie between."""
    from compress.search import CandidateRequest
    from compress_kl_ptq.method import candidate_cost_range, kl_ptq_candidates

    layer = nn.Linear(128, 8, bias=False)
    request = CandidateRequest({"bits": [3], "group_size": [group_size], "outlier_fraction": [0.0, 1 / 32]})
    width = group_size or 128
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8, 128, generator=generator) * 0.01
    packed, spread = base.clone(), base.clone()
    packed.view(-1)[:32] = 1.0  # the 32 outliers fill the fewest groups
    spread.view(8, -1, width)[..., 0] = 1.0  # one outlier at the start of each group, or each row's 4
    if group_size is None:
        spread = base.clone()
        spread[:, :4] = 1.0
    costs = {}
    for name, weight in (("packed", packed), ("spread", spread), ("random", base)):
        layer.weight.data = weight
        costs[name] = {c.setting["outlier_fraction"]: c.cost for c in kl_ptq_candidates("x", layer, request)}
    no_outliers = candidate_cost_range(layer, {"bits": 3, "group_size": group_size, "outlier_fraction": 0.0}, "bits")
    assert no_outliers == (costs["random"][0.0],) * 2
    low, high = candidate_cost_range(layer, {"bits": 3, "group_size": group_size, "outlier_fraction": 1 / 32}, "bits")
    assert (costs["packed"][1 / 32], costs["spread"][1 / 32]) == (low, high)
    assert low <= costs["random"][1 / 32] <= high and low < high
    assert candidate_cost_range(layer, {"bits": 3, "group_size": group_size, "outlier_fraction": 0.01}, "params") == (
        1024.0,
        1024.0,
    )
