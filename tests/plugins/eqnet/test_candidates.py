"""eqnet's supernet as search candidates: prices as eqnet_search's, exact sub-network weights, rco after eqnet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from compress_eqnet.efficiency import Efficiency
from compress_eqnet.method import STATE_KEY
from compress_eqnet.quantizers import ActivationQuantizer
from compress_eqnet.search import space_of
from compress_eqnet.supernet import Subnet, Supernet

from compress.api import Budget, CandidateRequest, ClassifierKL, SearchSpace, UserError, collect_candidates
from compress.search_method import LayerChoices
from compress.validate import check_recipe
from tests.plugins.eqnet.conftest import eqnet_recipe, run

EXACT_BITS = 8 * (1176 + 48) + 2 * 4736 + 2304 + 1152
"""A total reachable exactly: stem and classifier at 8 bits, the rest at 2 plus one bit on two layers."""
SEARCH = {"steps": 3, "batch_size": 3, "search_units": 200, "final_units": 2000}


def rco_recipe(model: Path, images: Path, out: Path, budget: dict, method: str = "rco", **search) -> dict:
    raw = eqnet_recipe(model, images, out)
    stage = {
        "method": method,
        "targets": ["Conv2d", "Linear"],
        "providers": ["eqnet"],
        "settings": {"bits": [2, 3, 4]},
        "budget": budget,
    }
    raw["stages"].append({**stage, **search})
    return raw


@pytest.fixture(scope="module")
def trained(run_once):
    """The context after an eqnet stage alone: the supernet in context.state."""
    context, _ = run_once("supernet", eqnet_recipe)
    return context


def candidates_of(context, bits: list[int], cost: str, **settings) -> dict[str, list]:
    request = CandidateRequest({"bits": bits, **settings}, frozenset({"eqnet"}), cost)
    modules = dict(context.model.named_modules())
    return {
        name: collect_candidates(context, name, modules[name], request) for name in context.state[STATE_KEY]["layers"]
    }


def test_costs_are_eqnet_search_prices(trained):
    context = trained
    state = context.state[STATE_KEY]
    space = space_of(state)
    efficiency = Efficiency([state["costs"][name] for name in state["layers"]], space.fixed_bits)
    for unit in ("bits", "bitops"):
        offered = candidates_of(context, [2, 3, 4, 8], unit, input_bits=[4])
        first, *middle, last = offered.values()
        assert [c.setting["bits"] for c in first] == [c.setting["bits"] for c in last] == [8]
        assert all([c.setting["bits"] for c in layer] == [2, 3, 4, 8] for layer in middle)
        w_bits = [8, *(3 if i % 2 else 2 for i in range(len(middle))), 8]
        picked = [first[0], *(layer[[2, 3, 4, 8].index(b)] for layer, b in zip(middle, w_bits[1:-1])), last[0]]
        if unit == "bits":
            params = [state["costs"][name]["params"] for name in state["layers"]][1:-1]
            average = sum(c.cost for c in picked[1:-1]) / sum(params)
            assert average == pytest.approx(efficiency.average_bits(w_bits, [4] * len(w_bits))[0])
        else:
            assert sum(c.cost for c in picked) == pytest.approx(efficiency.bitops(w_bits, [4] * len(w_bits)))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_one_hot_configuration_is_the_supernet_subnet(trained, granularity):
    context = trained
    state = context.state[STATE_KEY]
    offered = candidates_of(context, [2, 3, 4, 8], "bits", granularity=[granularity], symmetric=[False])
    n = len(state["layers"])
    w_bits = tuple(8 if i in (0, n - 1) else (2, 3, 4, 8)[i % 4] for i in range(n))
    modules = dict(context.model.named_modules())
    supernet = Supernet({name: modules[name] for name in state["layers"]}, space_of(state))
    supernet.load_state_dict(state["quantizers"])
    supernet.install()
    try:
        supernet.set(Subnet(w_bits, (8,) * n, *((value,) * n for value in (granularity == "channel", False, True))))
        with torch.no_grad():
            subnet = {name: modules[name].weight.clone() for name in state["layers"]}
    finally:
        supernet.remove()
    for (name, layer), bits in zip(offered.items(), w_bits):
        (candidate,) = [c for c in layer if c.setting["bits"] == bits]
        assert torch.equal(candidate.weight, subnet[name]), name
        assert candidate.state.quant is None  # asymmetric: no integer grid holds the offset


def test_values_outside_the_space_are_refused_when_asked_directly(trained):
    context = trained
    with pytest.raises(UserError, match=r"settings: input_bits: 9 is outside the eqnet supernet's space \(\[2, 3,"):
        candidates_of(context, [2, 4], "bits", input_bits=[4, 9])
    with pytest.raises(UserError, match="bits: 9 is outside the eqnet supernet's space"):
        candidates_of(context, [2, 9], "bits")


def test_input_bits_are_a_search_dimension_priced_in_bitops(trained):
    context = trained
    state = context.state[STATE_KEY]
    for unit in ("bits", "bitops"):
        first, *middle, last = candidates_of(context, [2, 4], unit, input_bits=[2, 8]).values()
        assert (
            [(c.setting["bits"], c.setting["input_bits"]) for c in first]
            == [(8, 8)]
            == [(c.setting["bits"], c.setting["input_bits"]) for c in last]
        )
        for name, layer in zip(state["layers"][1:-1], middle):
            assert [(c.setting["bits"], c.setting["input_bits"]) for c in layer] == [(2, 2), (2, 8), (4, 2), (4, 8)]
            costs = state["costs"][name]
            expected = [
                costs["params"] * w if unit == "bits" else costs["macs"] * w * a for w in (2, 4) for a in (2, 8)
            ]
            assert [c.cost for c in layer] == pytest.approx(expected)
            assert layer[0].inputs is not layer[1].inputs and layer[0].inputs is layer[2].inputs  # one per input form


def test_an_input_bits_candidate_quantizes_the_layers_input_at_its_bits(trained):
    """Put in the model, 4-bit-weight candidates on 2-bit inputs are the supernet's sub-network W4A2:
    each layer's input quantized by its learned 2-bit input quantizer, the logits the sub-network's."""
    context = trained
    state, model = context.state[STATE_KEY], context.model
    n = len(state["layers"])
    modules = dict(model.named_modules())
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("calibration")])
    saved, training = {k: v.clone() for k, v in model.state_dict().items()}, model.training
    model.eval()
    try:
        supernet = Supernet({name: modules[name] for name in state["layers"]}, space_of(state))
        supernet.load_state_dict(state["quantizers"])
        supernet.install()
        try:
            supernet.set(Subnet((4,) * n, (2,) * n, (False,) * n, (True,) * n, (False,) * n))
            with torch.no_grad():
                subnet_logits = model(pixel_values=pixels).logits
        finally:
            supernet.remove()

        offered = candidates_of(context, [2, 4], "bitops", input_bits=[2, 8])
        layers = [LayerChoices(name, modules[name], candidates) for name, candidates in offered.items()]
        space = SearchSpace(layers, Budget.model_validate({"bitops": 1e12}))
        choice = [
            next(k for k, c in enumerate(layer.candidates) if (c.setting["bits"], c.setting["input_bits"]) == (4, 2))
            if 0 < i < n - 1
            else 0
            for i, layer in enumerate(layers)
        ]
        probed = state["layers"][2]
        raw, seen = [], []
        first = modules[probed].register_forward_pre_hook(lambda _m, args: raw.append(args[0].detach()))
        with torch.no_grad(), space.quantized_inputs():
            space.put(choice)
            second = modules[probed].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
            logits = model(pixel_values=pixels).logits
            second.remove()
        model(pixel_values=pixels)  # outside the search the layer reads its inputs unquantized again
        first.remove()
    finally:
        model.load_state_dict(saved)
        model.train(training)
    quantizer = ActivationQuantizer()
    quantizer.load_state_dict(state["quantizers"]["inputs"][probed])
    quantizer.bits, quantizer.symmetric = 2, False
    torch.testing.assert_close(seen[0], quantizer(raw[0]))
    assert seen[0].unique().numel() <= 4 < raw[0].unique().numel()
    assert raw[1].unique().numel() > 4
    torch.testing.assert_close(logits, subnet_logits)


def test_classifier_kl_is_zero_for_the_original_and_positive_otherwise(trained):
    context = trained
    objective = ClassifierKL(context, "calibration")
    pieces = [(i, None) for i in range(len(objective.samples))]
    reference = context.reference_model()
    assert objective.loss(reference, pieces).item() == pytest.approx(0.0, abs=1e-6)
    assert objective.loss(context.model, pieces, batch_size=2).item() > 0  # the trained supernet moved


@pytest.mark.parametrize(
    ("method", "budget", "extra", "input_bits"),
    [
        ("rco", {"bits": EXACT_BITS}, SEARCH, None),
        ("rco", {"bitops_per_weight": 3500.0}, SEARCH, [2, 8]),
        ("evopress", {"bitops_per_weight": 3500.0}, {"generations": 2}, [2, 8]),
    ],
)
def test_a_search_after_eqnet_meets_the_budget_on_the_supernet(
    host, eqnet_assets, tmp_path, method, budget, extra, input_bits
):
    model, images = eqnet_assets
    extra = extra if method == "rco" else {**extra, "offspring": 4, "survivors": [1], "tokens": [6], "initial": 4}
    raw = rco_recipe(model, images, tmp_path / "out", budget, method, **extra)
    if input_bits is not None:
        raw["stages"][-1]["settings"]["input_bits"] = input_bits
    context = run(host, tmp_path, raw)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    details = report["stages"][1]["details"]
    key = next(iter(budget))
    assert details["achieved"][key] <= budget[key] + 1e-9
    if key == "bits":
        assert details["achieved"][key] == budget[key]  # rco's DP rounding lands on a reachable budget exactly
    state = context.state[STATE_KEY]
    space = space_of(state)
    layers = report["stages"][1]["layers"]
    w_bits = tuple(layers[name]["setting"]["bits"] for name in state["layers"])
    a_bits = tuple(layers[name]["setting"]["input_bits"] for name in state["layers"])
    assert w_bits[0] == w_bits[-1] == 8 and set(w_bits[1:-1]) <= {2, 3, 4}
    assert a_bits[0] == a_bits[-1] == 8 and set(a_bits[1:-1]) <= set(input_bits or [8])
    if key == "bitops_per_weight":  # the achieved BitOps count each layer's input bits
        efficiency = Efficiency([state["costs"][name] for name in state["layers"]], space.fixed_bits)
        weights = sum(state["costs"][name]["params"] for name in state["layers"])
        assert details["achieved"][key] * weights == pytest.approx(efficiency.bitops(w_bits, a_bits))
    # the written weights are the sub-network's: quantizing them again at their settings changes nothing
    modules = dict(context.model.named_modules())
    supernet = Supernet({name: modules[name] for name in state["layers"]}, space)
    supernet.load_state_dict(state["quantizers"])
    for name, bits in zip(state["layers"], w_bits):
        quantizer = supernet.weights[name]
        quantizer.bits, quantizer.channel, quantizer.symmetric = bits, False, True
        weight = modules[name].weight.detach()
        torch.testing.assert_close(quantizer(weight), weight)
        assert context.layers[name].quant.scheme.bits == bits


@pytest.mark.parametrize(
    ("space", "search", "message"),
    [
        ({"w_bits": [2, 4, 8]}, {}, "settings: bits: 3 is outside the eqnet supernet's space ([2, 4, 8])"),
        (
            {"a_bits": [4, 8]},
            {"settings": {"bits": [2, 4], "input_bits": [2, 4]}, "budget": {"bitops_per_weight": 3000}},
            "settings: input_bits: 2 is outside the eqnet supernet's space ([4, 8])",
        ),
        (
            {"a_bits": [2, 4]},
            {},
            "settings: input_bits: 8 (the default) is outside the eqnet supernet's space ([2, 4])",
        ),
        (
            {"w_symmetric": [False]},
            {"settings": {"bits": [2, 4], "symmetric": [False, True]}},
            "settings: symmetric: True is outside the eqnet supernet's space ([False])",
        ),
    ],
)
def test_recipe_check_refuses_requests_outside_the_trained_space(host, eqnet_assets, tmp_path, space, search, message):
    """The supernet's space is the recipe's eqnet stage's: a search asking for more is refused before
    any training, not when the candidates are collected."""
    model, images = eqnet_assets
    raw = rco_recipe(model, images, tmp_path / "out", {"bits_per_weight": 4.0}, **SEARCH)
    raw["stages"][0].update(space)
    raw["stages"][1].update(search)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=re.escape(message)):
        check_recipe(host, path, overwrite=True)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (1.5, "budget bits_per_weight: 1.5 is below the cheapest configuration (bits_per_weight: at least 2,"),
        (8.5, "budget bits_per_weight: 8.5 is above the dearest configuration (bits_per_weight: at most 8,"),
    ],
)
def test_recipe_check_refuses_a_bits_budget_no_subnet_meets(host, eqnet_assets, tmp_path, budget, message):
    """In bits eqnet's candidates cost parameters x weight bits, the first and last layers at fixed bits
    (2..8): recipe check bounds every configuration between 2 and 8 bits per weight."""
    model, images = eqnet_assets
    raw = rco_recipe(model, images, tmp_path / "out", {"bits_per_weight": budget}, **SEARCH)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=re.escape(message)):
        check_recipe(host, path, overwrite=True)


def test_recipe_check_refuses_eqnet_candidates_without_an_eqnet_stage(host, eqnet_assets, tmp_path):
    model, images = eqnet_assets
    raw = rco_recipe(model, images, tmp_path / "out", {"bits_per_weight": 4.0}, **SEARCH)
    raw["stages"] = raw["stages"][1:]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="provider 'eqnet' has no candidates here: eqnet offers the sub-networks"):
        check_recipe(host, path, overwrite=True)


def test_bits_budgets_pass_check_with_the_dense_format(host, eqnet_assets, tmp_path):
    model, images = eqnet_assets
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(rco_recipe(model, images, tmp_path / "out", {"bits_per_weight": 4.0}, **SEARCH)))
    check_recipe(host, path, overwrite=True)  # eqnet's costs are nominal: dense meets them


def test_the_eqnet_then_rco_recipe_checks(host, eqnet_assets, tmp_path):
    model, images = eqnet_assets
    raw = yaml.safe_load((Path(__file__).parents[3] / "recipes/eqnet/resnet20-cifar10-rco-3bits.yaml").read_text())
    raw["model"] = str(model)
    for entry in raw["data"].values():
        entry.update(path=str(images), samples=6)
    raw["output"]["dir"] = str(tmp_path / "out")
    raw["stages"][0]["batch_size"] = 6
    raw["stages"][1]["budget"] = {"bits_per_weight": 4.0}  # the tiny model's 8-bit stem is a fifth of its weights
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    stages = check_recipe(host, path, overwrite=True).recipe.stages
    assert [stage.method for stage in stages] == ["eqnet", "rco"]
