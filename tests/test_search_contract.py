"""The search contract (version 2): budgets, provider offers, candidates with their variants,
input statistics for providers, and what `compress recipe check` refuses."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import compress_rco
from compress import hookimpl
from compress.errors import UserError
from compress.hessian import relative_output_error
from compress.method import LayerMethod
from compress.quant import QuantScheme
from compress.scoring import ReferenceKL, Scorer
from compress.search import (
    Budget,
    CandidateOffer,
    CandidateRequest,
    LayerInputs,
    collect_candidates,
    grid_storage_bits,
    quantizer_price,
    weight_cost,
)
from compress.search_method import requested_schemes
from compress_gptq.candidates import gptq_candidates
from compress_rtn.method import rtn_candidates

STAGE = {
    "method": "evopress",
    "targets": ["re:.*(q|k|v|o|gate|up|down)_proj$"],
    "providers": ["gptq"],
    "settings": {"bits": [2, 3, 4], "group_size": [32]},
    "budget": {"bits_per_weight": 3.0},
    "generations": 2,
    "offspring": 3,
    "survivors": [1],
    "tokens": [62],
    "initial": 2,
    "initial_tokens": 31,
}


@pytest.mark.parametrize(
    ("written", "unit", "per_weight"),
    [
        ({"bits_per_weight": 3.0}, "bits", True),
        ({"bits": 1e6}, "bits", False),
        ({"bitops_per_weight": 48}, "bitops", True),
        ({"params_kept": 0.5}, "params", True),
        ({"params": 1000}, "params", False),
    ],
)
def test_budget_in_any_unit(written, unit, per_weight):
    budget = Budget.model_validate(written)
    assert (budget.unit, budget.per_weight, budget.key) == (unit, per_weight, next(iter(written)))
    assert budget.total(200) == (budget.value * 200 if per_weight else budget.value)
    assert budget.in_key(budget.total(200), 200) == pytest.approx(budget.value)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ({"bit_per_weight": 3}, "unknown cost unit 'bit_per_weight' (did you mean 'bits_per_weight'?)"),
        ({"bits": 3, "params": 4}, "give the budget in one unit"),
        ({"bits_per_weight": -1}, "must be a positive number"),
    ],
)
def test_bad_budgets(written, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        Budget.model_validate(written)


def test_costs_in_each_unit():
    layer = nn.Linear(64, 8, bias=False)
    setting = {"bits": 3, "group_size": 32, "symmetric": True}
    assert quantizer_price(layer, setting, "bits") == 8 * 64 * 3 + 8 * 2 * 16
    assert quantizer_price(layer, setting, "bits") == grid_storage_bits((8, 64), QuantScheme(**setting))
    assert quantizer_price(layer, setting, "bitops") == 8 * 64 * 3 * 16
    assert quantizer_price(layer, setting, "params") == 8 * 64
    assert weight_cost("params", kept=10, weight_bits=4, storage_bits=99) == 10


def test_requested_schemes_take_group_sizes_or_a_granularity():
    assert requested_schemes({"bits": [2], "group_size": [64, None]}) == [
        QuantScheme(bits=2, group_size=64),
        QuantScheme(bits=2, granularity="channel"),
    ]
    schemes = requested_schemes({"bits": [2, 4], "granularity": ["tensor"], "symmetric": [True, False]})
    assert [(s.bits, s.granularity, s.symmetric) for s in schemes] == [
        (2, "tensor", True),
        (2, "tensor", False),
        (4, "tensor", True),
        (4, "tensor", False),
    ]
    with pytest.raises(ValueError, match="granularity 'row'"):
        requested_schemes({"bits": [2], "granularity": ["row"]})


def test_an_offer_understands_its_settings_only():
    offer = CandidateOffer({"group_size": [128], "symmetric": [True]})
    layer = nn.Linear(64, 8)
    request = CandidateRequest({"bits": [2, 4], "group_size": [32, 48, None]})
    assert offer.settings_for(layer, request) == [
        {"bits": b, "group_size": g, "symmetric": True} for b in (2, 4) for g in (32, None)
    ]
    assert offer.settings_for(layer, CandidateRequest({"bits": [2], "sparsity": [0.5]})) == []
    assert offer.settings_for(layer, CandidateRequest({"group_size": [32]})) == []  # bits is required


def test_a_candidate_exposes_its_variant_and_applies_it_in_place():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8, bias=False)
    original = layer.weight.detach().clone()
    (candidate,) = rtn_candidates("x", layer, CandidateRequest({"bits": [3], "group_size": [32]}))
    assert torch.equal(layer.weight, original)  # offering changed nothing
    assert not torch.equal(candidate.weight, original)
    storage = layer.weight.data_ptr()
    state = candidate.apply(layer)
    assert layer.weight.data_ptr() == storage and torch.equal(layer.weight, candidate.weight)
    assert state.quant.scheme.bits == 3
    relative = (candidate.weight - original).pow(2).sum() / original.pow(2).sum()
    assert candidate.error == pytest.approx(relative.item(), rel=1e-6)


def test_gptq_offers_nothing_without_input_statistics_and_beats_rtn_with_them():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=False)
    inputs = torch.randn(512, 64) * torch.linspace(0.1, 3, 64)  # uneven input scales: GPTQ's case
    hessian = 2 * inputs.T @ inputs / 512
    request = CandidateRequest({"bits": [2, 3, 4], "group_size": [32]})
    assert gptq_candidates("x", layer, request) == []
    with_inputs = CandidateRequest(request.settings, inputs=LayerInputs(hessian, 512))
    gptq = gptq_candidates("x", layer, with_inputs)
    rtn = rtn_candidates("x", layer, request)
    assert [c.setting["bits"] for c in gptq] == [2, 3, 4]
    assert [c.cost for c in gptq] == [c.cost for c in rtn]
    for g, r in zip(gptq, rtn):
        delta = (r.weight - layer.weight).detach()
        rtn_output_error = torch.trace(delta @ hessian @ delta.T) / torch.trace(layer.weight @ hessian @ layer.weight.T)
        assert g.error < rtn_output_error.item()  # errors are output errors through the Hessian
        assert g.state.quant.scale.shape == (16, 2)


def test_search_with_gptq_candidates_from_collected_hessians(register_plugin, run_recipe):
    register_plugin(compress_rco, name="rco")
    run = run_recipe({"stages": [STAGE]})
    (record,) = run.report["stages"]
    assert record["kind"] == "search"
    assert {layer["method"] for layer in record["layers"].values()} == {"gptq"}
    assert record["details"]["achieved"]["bits_per_weight"] <= 3.0
    assert record["produces"]["mixed"] and record["produces"]["quant"] is None
    state = run.context.layers["model.layers.1.mlp.down_proj"]
    assert state.method == "gptq" and state.quant.scheme.group_size == 32

    # the search's objective is the evaluation's KL on the same data (its cache is float16)
    objective = ReferenceKL(run.context, "calibration")
    pieces = [(index, None) for index in range(len(objective.samples))]
    with torch.no_grad():
        kl = objective.loss(run.context.model, pieces).item()
    assert kl > 0
    assert kl == pytest.approx(Scorer(run.context, "calibration", ["kl"]).score()["kl"], rel=1e-2, abs=1e-5)

    # pieces cut to different lengths give the same KL batched (right-padded) as one at a time
    uneven = [(0, 20), (len(pieces) - 1, None), (1, 9)]
    with torch.no_grad():
        alone = objective.loss(run.context.model, uneven, batch_size=1).item()
        batched = objective.loss(run.context.model, uneven, batch_size=3).item()
    assert batched == pytest.approx(alone, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": {"bits_per_weight": 1.5}}, "budget bits_per_weight: 1.5 is below the cheapest configuration"),
        ({"budget": {"bits_per_weight": 9}}, "budget bits_per_weight: 9 is above the dearest configuration"),
        ({"settings": {"bits": [2, 3], "sparsity": [0.5]}}, "candidate setting 'sparsity' is understood by no"),
        ({"providers": ["gptqq"]}, "no installed method named 'gptqq' offers candidates (did you mean 'gptq'?)"),
        ({"settings": {"bits": [2, 3], "group_size": [48]}}, "no candidate provider offers variants of this Linear"),
        (
            {"providers": ["kl_ptq"], "budget": {"bitops_per_weight": 48}},
            "budget in bitops_per_weight: no candidate provider prices bitops (they price: kl_ptq: bits, params)",
        ),
        (
            {"providers": ["gptq", "magnitude"], "settings": {"sparsity": [0.25, 0.5]}},
            "model.layers.0.self_attn.q_proj: budget in bits_per_weight: no candidate provider for this Linear "
            "prices bits (they price: magnitude: bitops, params)",
        ),
    ],
)
def test_recipe_check_refuses(register_plugin, run_recipe, change, message):
    register_plugin(compress_rco, name="rco")
    with pytest.raises(UserError, match=re.escape(message)):
        run_recipe({"stages": [{**STAGE, **change}]})


class TripwireMethod(LayerMethod):
    """A candidate provider whose candidates must never be asked for."""

    name = "tripwire"
    offers = CandidateOffer({"group_size": [128], "symmetric": [True]}, price=quantizer_price)


class Tripwire:
    """The plugin registering ``tripwire``: its candidate hook raises when called."""

    @hookimpl
    def compress_register_methods(self, register):
        register(TripwireMethod)

    @hookimpl
    def compress_layer_candidates(self, name, module, request):
        raise AssertionError(f"tripwire asked for {name}")


def test_an_unasked_providers_hook_is_not_called(register_plugin, run_recipe):
    register_plugin(compress_rco, name="rco")
    register_plugin(Tripwire(), name="tripwire")
    run = run_recipe({"stages": [{**STAGE, "providers": ["rtn"]}]})
    (record,) = run.report["stages"]
    assert {layer["method"] for layer in record["layers"].values()} == {"rtn"}
    layer = nn.Linear(64, 8)
    for methods in (None, frozenset({"tripwire"})):  # asked by name, or every provider asked
        with pytest.raises(AssertionError, match="tripwire asked for x"):
            collect_candidates(run.context, "x", layer, CandidateRequest({"bits": [4], "group_size": [32]}, methods))


KL_PTQ = {"providers": ["kl_ptq"], "settings": {"bits": [3, 4], "group_size": [32]}}
TINY_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
"""(out, in) of the tiny Llama's q, k, v, o, gate, up and down projections, in both blocks."""


def kl_ptq_reachable() -> tuple[float, float]:
    """The bounds on bits per weight of kl_ptq's candidates (3 or 4 bits, groups of 32, 1% outliers)
    over the tiny model: every layer at 3 bits with the fewest outlier groups, and at 4 with the most."""
    from compress_kl_ptq.storage import storage_range

    weights = sum(rows * columns for rows, columns in TINY_SHAPES)
    low = sum(storage_range(shape, 32, 3, True, 0.01, 8, "csr")[0] for shape in TINY_SHAPES)
    high = sum(storage_range(shape, 32, 4, True, 0.01, 8, "csr")[1] for shape in TINY_SHAPES)
    return low / weights, high / weights


@pytest.mark.parametrize(("budget", "side"), [(3.0, "below the cheapest"), (6.0, "above the dearest")])
def test_recipe_check_refuses_kl_ptq_budgets_outside_its_bounds(register_plugin, run_recipe, budget, side):
    """kl_ptq prices no candidate exactly from shapes (the groups its outliers touch depend on the
    weights), but it bounds them: a budget outside the bounds is refused before any weight is read."""
    register_plugin(compress_rco, name="rco")
    low, high = kl_ptq_reachable()
    assert 3.5 < low < high < 6  # above 3-bit codes with their scales: the outliers' codes and positions
    reachable = f"reachable: at least {low:.6g} to at most {high:.6g}, bounds known before the candidates exist)"
    message = f"budget bits_per_weight: {budget:g} is {side} configuration .*{re.escape(reachable)}"
    with pytest.raises(UserError, match=message):
        run_recipe({"stages": [{**STAGE, **KL_PTQ, "budget": {"bits_per_weight": budget}}]})


def test_a_kl_ptq_budget_within_its_bounds_runs(register_plugin, run_recipe):
    register_plugin(compress_rco, name="rco")
    low, high = kl_ptq_reachable()
    run = run_recipe({"stages": [{**STAGE, **KL_PTQ, "budget": {"bits_per_weight": (low + high) / 2}}]})
    details = run.report["stages"][0]["details"]
    assert low <= details["cheapest"]["bits_per_weight"] <= details["dearest"]["bits_per_weight"] <= high


def test_only_providers_pricing_the_unit_are_asked(register_plugin, run_recipe):
    """kl_ptq prices bits and weights kept, not BitOps: a BitOps search over rtn and kl_ptq gets
    rtn's candidates only, the ones recipe check priced the budget's range with."""
    register_plugin(compress_rco, name="rco")
    stage = {**STAGE, "providers": ["rtn", "kl_ptq"], "budget": {"bitops_per_weight": 48}}
    run = run_recipe({"stages": [stage]})
    (record,) = run.report["stages"]
    assert {layer["method"] for layer in record["layers"].values()} == {"rtn"}
    assert record["details"]["candidates"] == 3 * len(record["layers"])
    assert record["details"]["achieved"]["bitops_per_weight"] <= 48


def test_a_target_after_the_blocks_gets_its_hessian_from_the_last_blocks_outputs(register_plugin, run_recipe):
    """lm_head is outside the blocks: its gptq candidates come from the Hessian of its real inputs
    (the final norm of the last block's outputs), so their recorded errors are output errors
    through that Hessian."""
    register_plugin(compress_rco, name="rco")
    stage = {**STAGE, "targets": ["re:.*down_proj$", "lm_head"], "ignore": [], "budget": {"bits_per_weight": 3.5}}
    run = run_recipe({"stages": [stage]})
    (record,) = run.report["stages"]
    chosen = record["layers"]["lm_head"]
    assert chosen["method"] == "gptq"

    reference = run.context.reference_model()
    rows = []
    handle = reference.lm_head.register_forward_hook(
        lambda _m, args, _o: rows.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for sample in run.context.data("calibration"):
            reference(sample["input_ids"][None])
    handle.remove()
    inputs = torch.cat(rows).double()
    hessian = (2 * inputs.T @ inputs / len(inputs)).float()
    error = relative_output_error(reference.lm_head.weight, run.context.model.lm_head.weight, hessian)
    assert chosen["error"] == pytest.approx(error, rel=1e-3)
