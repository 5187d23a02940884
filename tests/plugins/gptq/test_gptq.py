"""GPTQ invariants (identity Hessian = RTN, never worse than RTN on real activations, fixed
grids, act_order) and end-to-end runs on the two-layer SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.engine import apply_recipe
from compress.errors import UserError
from compress.hessian import collect_hessians, inverse_factor, relative_output_error
from compress.quant import QuantScheme, compute_grid
from compress.validate import check_recipe
from compress_gptq.method import GPTQ, GPTQParams
from compress_gptq.solve import gptq_quantize, quantize_in_place
from compress_gptq.solve import output_error as error_from_solve
from compress_rtn.method import RoundToNearest
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID
from tests.plugins.gptq.reference import reference_gptq

LAYERS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.1.mlp.up_proj",
]


def run(host, path: Path):
    return apply_recipe(host, check_recipe(host, path))


@pytest.fixture(scope="module")
def activations(tiny_lm_dir):
    """Real inputs of a few layers of the two-layer SmolLM2 on WikiText-2 valid (8 x 128 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = tokenizer(WIKITEXT_VALID.read_text()[:200_000], return_tensors="pt").input_ids[0][: 8 * 128].view(8, 128)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, a[0].detach()))
        for name in LAYERS
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {
        name: (modules[name].weight.data.clone(), captured[name].reshape(-1, captured[name].shape[-1]))
        for name in LAYERS
    }


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T.double() @ x.double()


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return ((x.double() @ (w.double() - q.double()).T).square().sum()).item()


# ---------------------------------------------------------------------------------------
# the algorithm


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_is_exactly_rtn(act_order, symmetric):
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.rand(48, 1)
    weight[:, 7] = 0  # an all-zero column stays exactly zero
    scheme = QuantScheme(bits=3, group_size=64, symmetric=symmetric)
    result = gptq_quantize(weight, torch.eye(256), scheme, block_size=96, act_order=act_order)
    rtn = compute_grid(weight, scheme)
    assert torch.equal(result.grid.scale, rtn.scale)
    if not symmetric:
        assert torch.equal(result.grid.zero_point, rtn.zero_point)
    assert torch.equal(result.grid.quantize(result.weight), rtn.quantize(weight))
    assert torch.equal(result.weight, rtn.fake_quantize(weight))


def test_identity_hessian_is_rtn_per_channel():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(bits=4, symmetric=True, granularity="channel")
    result = gptq_quantize(weight, torch.eye(128), scheme)
    assert torch.equal(result.weight, compute_grid(weight, scheme).fake_quantize(weight))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_no_worse_than_rtn_on_real_activations(activations, bits, act_order):
    scheme = QuantScheme(bits=bits, group_size=64)
    for name, (weight, x) in activations.items():
        H = hessian_of(x).float()
        result = gptq_quantize(weight, H, scheme, act_order=act_order, name=name)
        rtn = compute_grid(weight, scheme).fake_quantize(weight)
        gptq_error, rtn_error = output_error(weight, result.weight, x), output_error(weight, rtn, x)
        assert gptq_error < rtn_error, name
        # the H-based estimate of the relative objective is the real one
        estimate = relative_output_error(weight, result.weight, H)
        real = gptq_error / (x.double() @ weight.double().T).square().sum().item()
        assert estimate == pytest.approx(real, rel=1e-3), name


@pytest.mark.parametrize("act_order", [False, True])
def test_result_lies_on_its_grid_in_compressed_tensors_shapes(activations, act_order):
    weight, x = activations["model.layers.0.mlp.down_proj"]
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    result = gptq_quantize(weight, hessian_of(x).float(), scheme, act_order=act_order)
    assert result.grid.scale.shape == (weight.shape[0], weight.shape[1] // 64)
    assert result.grid.zero_point.dtype == torch.int8
    assert result.grid_source == ("static-groups" if act_order else "groups")
    assert torch.equal(result.grid.fake_quantize(result.weight), result.weight)
    codes = result.grid.quantize(result.weight)
    assert codes.min() >= -4 and codes.max() <= 3


def test_act_order_with_static_groups_uses_the_initial_weights_grid(activations):
    weight, x = activations["model.layers.1.mlp.up_proj"]
    scheme = QuantScheme(bits=4, group_size=64)
    result = gptq_quantize(weight, hessian_of(x).float(), scheme, act_order=True)
    assert torch.equal(result.grid.scale, compute_grid(weight, scheme).scale)


def test_dynamic_groups_are_computed_from_the_updated_weights(activations):
    weight, x = activations["model.layers.0.self_attn.q_proj"]
    scheme = QuantScheme(bits=3, group_size=64)
    result = gptq_quantize(weight, hessian_of(x).float(), scheme)
    initial = compute_grid(weight, scheme).scale
    assert torch.equal(result.grid.scale[:, 0], initial[:, 0])  # nothing updated before group 0
    assert not torch.equal(result.grid.scale[:, 1:], initial[:, 1:])


def test_dead_inputs_zero_their_columns():
    torch.manual_seed(2)
    x = torch.randn(512, 128)
    x[:, 5] = 0
    weight = torch.randn(16, 128)
    result = gptq_quantize(weight, hessian_of(x).float(), QuantScheme(bits=4, group_size=64))
    assert result.dead == 1 and torch.all(result.weight[:, 5] == 0)


def test_inherited_grid_is_used_unchanged_and_outliers_keep_their_values(activations):
    weight, x = activations["model.layers.0.mlp.down_proj"]
    scheme = QuantScheme(bits=3, group_size=64)
    grid = compute_grid(weight * 0.9, scheme)  # a grid GPTQ would not compute itself
    mask = weight.abs() > weight.abs().quantile(0.99)
    kept = torch.where(mask, weight.round(decimals=2), grid.fake_quantize(weight))
    scales = grid.scale.clone()
    result = gptq_quantize(weight, hessian_of(x).float(), scheme, grid=grid, frozen=mask, frozen_values=kept)
    assert torch.equal(result.grid.scale, scales) and result.grid_source == "inherited"
    assert torch.equal(result.weight[mask], kept[mask])
    inliers = result.weight[~mask]
    assert torch.equal(grid.fake_quantize(result.weight)[~mask], inliers)
    assert output_error(weight, result.weight, x) < output_error(weight, kept, x)


def test_bad_inputs_name_the_layer():
    scheme = QuantScheme(bits=4, group_size=64)
    weight = torch.randn(8, 128)
    with pytest.raises(UserError, match="does not divide") as error:
        gptq_quantize(torch.randn(8, 96), torch.eye(96), scheme, name="layer.a")
    assert error.value.where == "layer.a"
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="weights contain NaN") as error:
        gptq_quantize(bad, torch.eye(128), scheme, name="layer.b")
    assert error.value.where == "layer.b"
    H = torch.eye(128)
    H[3, 3] = float("inf")
    with pytest.raises(UserError, match="activations .* NaN or inf") as error:
        gptq_quantize(weight, H, scheme, name="layer.c")
    assert error.value.where == "layer.c"
    with pytest.raises(UserError, match="not positive definite|singular"):
        gptq_quantize(weight, -torch.eye(128), scheme, percdamp=0.0, name="layer.d")


def test_collect_hessians_averages_and_shares_inputs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    block = Block()
    xs = [torch.randn(1, 5, 6) for _ in range(3)]
    hessians, groups = collect_hessians(
        block, {"a": block.a, "b": block.b, "c": block.c}, [((x,), {}) for x in xs], torch.device("cpu")
    )
    assert groups == [["a", "b"], ["c"]]
    assert hessians["a"] is hessians["b"]  # one matrix for layers reading one input
    expected = sum(2 * x[0].T @ x[0] for x in xs) / 3
    torch.testing.assert_close(hessians["a"].matrix, expected)
    assert hessians["b"].samples == 3 and hessians["b"].tokens == 15


class Routed(nn.Module):
    """a, then b only for samples whose first input is positive (as an expert a router skips), then c."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.c_runs = 0

    def forward(self, x):
        h = self.a(x)
        if x[0, 0, 0] > 0:
            h = self.b(h)
        self.c_runs += 1
        return self.c(h)


def test_collect_hessians_stops_each_sample_before_the_last_layer_runs():
    """After the first sample, a sample's forward ends as the last layer is called, when every other
    layer's input is in; a sample that skipped a layer runs to the end. The sums are each layer's
    own inputs either way."""
    block = Routed()
    xs = [torch.randn(1, 5, 6) for _ in range(5)]
    for x, sign in zip(xs, (1, 1, -1, 1, -1)):
        x[0, 0, 0] = sign * x[0, 0, 0].abs()
    calls = {"c": 0}
    block.c.register_forward_hook(lambda *_: calls.__setitem__("c", calls["c"] + 1))
    layers = {"a": block.a, "b": block.b, "c": block.c}
    hessians, groups = collect_hessians(block, layers, [((x,), {}) for x in xs], torch.device("cpu"))
    assert groups == [["a"], ["b"], ["c"]]
    assert block.c_runs == 5 and calls["c"] == 3  # c's product ran for the first sample and the two skipping b
    with torch.no_grad():
        inputs = {"a": xs, "b": [block.a(x) for x in xs if x[0, 0, 0] > 0]}
        inputs["c"] = [block.b(block.a(x)) if x[0, 0, 0] > 0 else block.a(x) for x in xs]
    for name, rows in inputs.items():
        expected = sum(2 * x[0].T @ x[0] for x in rows) / len(rows)
        torch.testing.assert_close(hessians[name].matrix, expected)
        assert hessians[name].samples == len(rows)


@pytest.mark.parametrize("product_bytes", [4 * 6 * 10, 4 * 6 * 12, 4 * 6 * 100])
def test_collect_hessians_gathers_samples_into_larger_products(product_bytes):
    """Several samples per X Xᵀ product (buffers of 10, 12, 100 rows of the first input; the
    9-row sample does not fit the smaller ones and is multiplied directly) give the
    one-product-per-sample sums to rounding."""
    block = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    layers = {"first": block[0], "last": block[2]}
    inputs = [((torch.randn(1, rows, 6),), {}) for rows in (5, 5, 9, 5, 3)]
    one_by_one, _ = collect_hessians(block, layers, inputs, torch.device("cpu"), product_bytes=0)
    gathered, _ = collect_hessians(block, layers, inputs, torch.device("cpu"), product_bytes=product_bytes)
    for name in layers:
        torch.testing.assert_close(gathered[name].matrix, one_by_one[name].matrix)
        assert (gathered[name].samples, gathered[name].tokens) == (5, 27)
    expected = sum(2 * args[0][0].T @ args[0][0] for args, _ in inputs) / 5
    torch.testing.assert_close(gathered["first"].matrix, expected)


def correlated_problem(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a Hessian of correlated, unevenly scaled inputs with one dead input."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
    x = x * torch.rand(columns, generator=generator)
    x[:, 9] = 0
    return torch.randn(rows, columns, generator=generator), hessian_of(x).float()


FAST_CASES = [
    # symmetric, act_order, granularity, group_size, block_size
    (True, False, "group", 64, 128),  # groups start inside blocks
    (True, False, "group", 128, 128),  # one group per block (the usual W4 g128)
    (False, False, "group", 192, 128),  # groups reaching past their block
    (False, True, "group", 64, 96),  # static groups, permuted columns
    (True, True, "channel", None, 128),
    (False, False, "channel", None, 100),  # a narrower last block
]


@pytest.mark.parametrize("symmetric,act_order,granularity,group_size,block_size", FAST_CASES)
def test_fast_solve_equals_the_reference_bitwise(symmetric, act_order, granularity, group_size, block_size):
    weight, H = correlated_problem(24, 384, seed=3)
    scheme = QuantScheme(bits=3, symmetric=symmetric, granularity=granularity, group_size=group_size)
    expected, grid, loss = reference_gptq(weight, H, scheme, block_size=block_size, act_order=act_order)
    result = gptq_quantize(weight, H, scheme, block_size=block_size, act_order=act_order)
    assert torch.equal(result.weight, expected)
    assert torch.equal(result.grid.scale, grid.scale)
    if not symmetric:
        assert torch.equal(result.grid.zero_point, grid.zero_point)
    assert result.row_errors.sum().item() / 2 == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_fast_solve_equals_the_reference_with_inherited_grid_and_frozen_outliers(act_order):
    weight, H = correlated_problem(24, 256, seed=4)
    scheme = QuantScheme(bits=3, group_size=64)
    grid = compute_grid(weight * 0.9, scheme)
    mask = weight.abs() > weight.abs().quantile(0.95)
    kept = torch.where(mask, weight.round(decimals=2), grid.fake_quantize(weight))
    options = {"grid": grid, "frozen": mask, "frozen_values": kept, "act_order": act_order, "block_size": 96}
    expected, _, _ = reference_gptq(weight, H, scheme, **options)
    assert torch.equal(gptq_quantize(weight, H, scheme, **options).weight, expected)


@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, True)])
def test_stacked_rows_solve_equals_separate_solves(symmetric, act_order):
    """q/k/v (or gate/up) share one input: one solve of their stacked rows is their own solves."""
    _, H = correlated_problem(1, 256, seed=5)
    generator = torch.Generator().manual_seed(6)
    weights = [torch.randn(rows, 256, generator=generator) * scale for rows, scale in ((32, 1.0), (8, 3.0), (16, 0.1))]
    scheme = QuantScheme(bits=4, group_size=64, symmetric=symmetric)
    stacked = gptq_quantize(torch.cat(weights), H, scheme, act_order=act_order)
    separate = [gptq_quantize(w, H, scheme, act_order=act_order) for w in weights]
    assert torch.equal(stacked.weight, torch.cat([r.weight for r in separate]))
    assert torch.equal(stacked.grid.scale, torch.cat([r.grid.scale for r in separate]))
    assert torch.equal(stacked.row_errors, torch.cat([r.row_errors for r in separate]))


def test_output_error_from_the_solve_matches_the_hessian(activations):
    """The reported objective needs no Hessian after the solve (it is freed before)."""
    scheme = QuantScheme(bits=3, group_size=64)
    for name, (weight, x) in activations.items():
        H = hessian_of(x).float()
        factor = inverse_factor(H, 0.01, act_order=False)
        result = quantize_in_place(weight.float().clone(), factor, scheme)
        direct = relative_output_error(weight, result.weight, H) * ((weight.float() @ H) * weight.float()).sum().item()
        assert error_from_solve(result, factor, weight) == pytest.approx(direct, rel=1e-4), name
        half = slice(0, weight.shape[0] // 2)
        direct_half = ((weight[half] - result.weight[half]) @ H * (weight[half] - result.weight[half])).sum().item()
        assert error_from_solve(result, factor, weight[half], half) == pytest.approx(direct_half, rel=1e-4), name


def test_column_loop_launches_few_ops_per_column():
    """Kernel launches bound the solve on a GPU: count the non-view aten ops per column."""
    from torch.profiler import ProfilerActivity, profile

    views = {
        "aten::as_strided",
        "aten::select",
        "aten::slice",
        "aten::view",
        "aten::unsqueeze",
        "aten::expand",
        "aten::t",
        "aten::transpose",
        "aten::permute",
        "aten::reshape",
        "aten::alias",
        "aten::detach",
        "aten::empty",
        "aten::empty_strided",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::unflatten",
    }
    weight, H = correlated_problem(16, 512, seed=7)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        gptq_quantize(weight, H, QuantScheme(bits=4, group_size=128))
    ops = [
        event
        for event in trace.events()
        if event.name.startswith("aten::")
        and event.name not in views
        and not (event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"))
    ]
    assert len(ops) / 512 < 10  # the column-by-column implementation before it launched 25


# ---------------------------------------------------------------------------------------
# the method in the engine


def gptq_stage(**params):
    return {"method": "gptq", "bits": 4, "group_size": 64, **params}


def test_recipe_writes_report_and_records_grids(host, write_recipe, tmp_path):
    context = run(host, write_recipe(stages=[gptq_stage()], evaluate=["kl"]))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = report["stages"][0]["layers"]
    assert report["stages"][0]["method"] == "gptq" and len(layers) == 14
    modules = dict(context.model.named_modules())
    for name, details in layers.items():
        assert details["calibration_tokens"] == 4 * 64 and details["grid"] == "groups"
        assert 0 < details["objective"] <= details["rtn_objective"], name
        state = context.layers[name]
        assert state.method == "gptq"
        weight = modules[name].weight.data
        assert state.quant.scale.shape == (weight.shape[0], weight.shape[1] // 64)
        assert torch.equal(state.quant.fake_quantize(weight), weight)


def test_gptq_lowers_kl_versus_rtn_at_w3g64(host, write_recipe):
    data = {
        "calibration": {"path": str(WIKITEXT_VALID), "samples": 4, "seq_len": 64},
        "evaluation": {"path": str(WIKITEXT_TEST), "samples": 4, "seq_len": 128},
    }
    kl = {}
    for method in ("rtn", "gptq"):
        stage = {"method": method, "bits": 3, "group_size": 64}
        context = run(host, write_recipe(stages=[stage], data=data, evaluate=["kl"], output=None))
        kl[method] = context.report.evaluation["kl"]["compressed"]
    assert kl["gptq"] < kl["rtn"]


def test_act_order_and_true_sequential_run_end_to_end(host, write_recipe):
    stage = gptq_stage(bits=3, act_order=True, true_sequential=True)
    context = run(host, write_recipe(stages=[stage], evaluate=[], output=None))
    layers = context.report.stages[0].layers
    assert all(d["grid"] == "static-groups" and d["objective"] <= d["rtn_objective"] for d in layers.values())


def test_inherit_keeps_the_previous_stage_grid(host, write_recipe):
    rtn = {"method": "rtn", "bits": 3, "group_size": 64}
    first = run(host, write_recipe(stages=[rtn], evaluate=[], output=None))
    context = run(host, write_recipe(stages=[rtn, gptq_stage(bits=3, grid="inherit")], evaluate=[], output=None))
    modules = dict(context.model.named_modules())
    for name, state in context.layers.items():
        assert state.method == "gptq"
        assert torch.equal(state.quant.scale, first.layers[name].quant.scale), name
        assert torch.equal(state.quant.fake_quantize(modules[name].weight.data), modules[name].weight.data)
        details = context.report.stages[1].layers[name]
        assert details["grid"] == "inherited" and details["target"] == "original"
        assert details["objective"] <= details["rtn_objective"]


def test_inherit_on_a_layer_the_earlier_stage_skipped_fails_naming_the_layer(host, write_recipe):
    rtn_mlp_only = {"method": "rtn", "bits": 4, "group_size": 64, "targets": ["re:.*mlp\\..*_proj$"]}
    stages = [rtn_mlp_only, gptq_stage(grid="inherit")]
    with pytest.raises(UserError, match="grid: inherit needs the grid of an earlier stage") as error:
        run(host, write_recipe(stages=stages, evaluate=[], output=None))
    assert str(error.value.where).startswith("model.layers.0.self_attn.")


def test_inherit_with_an_incompatible_grid_fails_at_recipe_check(host, write_recipe):
    stages = [{"method": "rtn", "bits": 4, "group_size": 32}, gptq_stage(grid="inherit")]
    with pytest.raises(UserError, match=r"recipe.yaml:\d+:\d+: gptq with grid: inherit has .*group_size 32"):
        check_recipe(host, write_recipe(stages=stages, evaluate=[], output=None))
    with pytest.raises(UserError, match="needs an earlier stage"):
        check_recipe(host, write_recipe(stages=[gptq_stage(grid="inherit")], evaluate=[], output=None))


def test_check_previous_stages():
    inherit = GPTQ(GPTQParams(bits=4, group_size=64, grid="inherit"))
    with pytest.raises(UserError, match="needs an earlier stage"):
        inherit.check_previous_stages([])
    with pytest.raises(UserError, match="earlier stage leaves 3-bit"):
        inherit.check_previous_stages([RoundToNearest(QuantScheme(bits=3, group_size=64))])
    inherit.check_previous_stages([RoundToNearest(QuantScheme(bits=4, group_size=64))])


def test_compute_after_outliers_is_refused_at_recipe_check(host, write_recipe):
    """kl_ptq holds outliers apart; gptq computing its own grid would put them back on it silently."""
    kl_ptq = {"method": "kl_ptq", "bits": 4, "group_size": 64}
    with pytest.raises(UserError) as error:
        check_recipe(host, write_recipe(stages=[kl_ptq, gptq_stage()], evaluate=[], output=None))
    assert re.fullmatch(
        r".*recipe\.yaml:\d+:\d+: stage 2 \(gptq, grid: compute\) would put the outliers stage 1 \(kl_ptq\) "
        r"holds apart back on one grid: set grid: inherit",
        str(error.value),
    ), str(error.value)
    # a later stage that leaves a grid of its own (rtn) replaces the split: computing is fine again
    rtn = {"method": "rtn", "bits": 4, "group_size": 64}
    check_recipe(host, write_recipe(stages=[kl_ptq, rtn, gptq_stage()], evaluate=[], output=None))
    check_recipe(host, write_recipe(stages=[kl_ptq, gptq_stage(grid="inherit")], evaluate=[], output=None))


def test_nan_weights_fail_naming_the_layer(host, write_recipe, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    for extra in tiny_lm_dir.glob("tokenizer*"):
        (tmp_path / "nan-model" / extra.name).write_bytes(extra.read_bytes())
    with pytest.raises(UserError, match="NaN or inf") as error:
        run(host, write_recipe(model=str(tmp_path / "nan-model"), stages=[gptq_stage()], evaluate=[], output=None))
    assert error.value.where == "model.layers.1.mlp.up_proj"


def test_too_few_calibration_tokens_fail(host, write_recipe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of calibration text")
    data = {"calibration": {"path": str(short), "samples": 4, "seq_len": 64}}
    with pytest.raises(UserError, match="fewer than"):
        run(host, write_recipe(stages=[gptq_stage()], data=data, evaluate=[], output=None))


def test_unknown_parameter_is_refused(host, write_recipe):
    with pytest.raises(UserError, match="blocksize"):
        check_recipe(host, write_recipe(stages=[gptq_stage(blocksize=64)]))
