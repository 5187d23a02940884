"""eqnet's supernet as search candidates: prices as eqnet_search's, exact sub-network weights, rco after eqnet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from compress_eqnet.efficiency import Efficiency
from compress_eqnet.method import STATE_KEY
from compress_eqnet.search import space_of
from compress_eqnet.supernet import Subnet, Supernet

from compress.api import CandidateRequest, ClassifierKL, UserError, collect_candidates
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
def trained(eqnet_assets, tmp_path_factory):
    """The context after an eqnet stage alone: the supernet in context.state."""
    from compress.host import PluginHost

    host = PluginHost()
    host.load_plugins()
    model, images = eqnet_assets
    tmp = tmp_path_factory.mktemp("supernet")
    return host, run(host, tmp, eqnet_recipe(model, images, tmp / "out"))


def candidates_of(context, bits: list[int], cost: str, **settings) -> dict[str, list]:
    request = CandidateRequest({"bits": bits, **settings}, frozenset({"eqnet"}), cost)
    modules = dict(context.model.named_modules())
    return {
        name: collect_candidates(context, name, modules[name], request) for name in context.state[STATE_KEY]["layers"]
    }


def test_costs_are_eqnet_search_prices(trained):
    _, context = trained
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
    _, context = trained
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


def test_values_outside_the_space_are_refused(trained):
    _, context = trained
    with pytest.raises(UserError, match="input_bits: give one value"):
        candidates_of(context, [2, 4], "bits", input_bits=[4, 8])
    with pytest.raises(UserError, match="bits: 9 is outside the eqnet supernet's space"):
        candidates_of(context, [2, 9], "bits")


def test_classifier_kl_is_zero_for_the_original_and_positive_otherwise(trained):
    _, context = trained
    objective = ClassifierKL(context, "calibration")
    pieces = [(i, None) for i in range(len(objective.samples))]
    reference = context.reference_model()
    assert objective.loss(reference, pieces).item() == pytest.approx(0.0, abs=1e-6)
    assert objective.loss(context.model, pieces, batch_size=2).item() > 0  # the trained supernet moved


@pytest.mark.parametrize(
    ("method", "budget", "extra"),
    [("rco", {"bits": EXACT_BITS}, SEARCH), ("evopress", {"bitops_per_weight": 3500.0}, {"generations": 2})],
)
def test_a_search_after_eqnet_meets_the_budget_on_the_supernet(host, eqnet_assets, tmp_path, method, budget, extra):
    model, images = eqnet_assets
    extra = extra if method == "rco" else {**extra, "offspring": 4, "survivors": [1], "tokens": [6], "initial": 4}
    raw = rco_recipe(model, images, tmp_path / "out", budget, method, **extra)
    if method == "evopress":
        raw["stages"][-1]["settings"]["input_bits"] = [4]
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
    assert w_bits[0] == w_bits[-1] == 8 and set(w_bits[1:-1]) <= {2, 3, 4}
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
