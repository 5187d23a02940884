"""A given configuration evaluated and exported by eqnet_search: the supernet's sub-network, input points included."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from compress_eqnet.method import STATE_KEY
from compress_eqnet.points import input_point
from compress_eqnet.quantizers import ActivationQuantizer
from compress_eqnet.search import space_of
from compress_eqnet.supernet import Subnet, Supernet
from torch import nn

from compress.activation_points import checkpoint_points, quantized_points
from compress.api import UserError
from compress.validate import check_recipe
from tests.plugins.eqnet.conftest import eqnet_recipe, run
from tests.plugins.eqnet.test_candidates import SEARCH, rco_recipe

EVALUATE = {"method": "eqnet_search", "configuration": "rco", "bn_batches": 1, "batch_size": 6, "test_data": "holdout"}


@pytest.fixture(scope="module")
def evaluated(run_once):
    """eqnet, rco over its candidates (weight and input bits, BitOps), then eqnet_search of rco's choice."""

    def recipe(model: Path, images: Path, out: Path) -> dict:
        raw = rco_recipe(model, images, out, {"bitops_per_weight": 3500.0}, **SEARCH)
        raw["stages"][-1]["settings"]["input_bits"] = [2, 8]
        raw["stages"].append(EVALUATE)
        return raw

    return run_once("configured", recipe)


def holdout_pixels(context) -> torch.Tensor:
    return torch.stack([sample["pixel_values"] for sample in context.data("holdout")])


@pytest.mark.parametrize("unsigned", [False, True])
def test_an_input_point_is_the_learned_input_quantizer(unsigned):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 2
    x = x.relu() if unsigned else x
    quantizer = ActivationQuantizer()
    quantizer.initialize(x)
    with torch.no_grad():
        quantizer.beta_asym.add_(0.1 * torch.randn(7))  # offsets that are no multiple of the step
    for bits in range(2, 9):
        for symmetric in (True, False):
            quantizer.bits, quantizer.symmetric = bits, symmetric
            point = input_point(quantizer.state_dict(), bits, symmetric)
            assert point.scheme.grid == ("uniform" if symmetric else "affine")
            with torch.no_grad():
                torch.testing.assert_close(point(x), quantizer(x), rtol=0, atol=1e-6)


def test_the_configuration_is_the_search_stages_choice(evaluated):
    context, _ = evaluated
    rco, chosen = context.report.stages[1].layers, context.report.stages[2].layers
    assert list(chosen) == list(rco)
    for name, entry in rco.items():
        setting = entry["setting"]
        assert (chosen[name]["w_bits"], chosen[name]["a_bits"]) == (setting["bits"], setting["input_bits"])
        assert chosen[name]["granularity"] == setting["granularity"]
    assert {entry["setting"]["input_bits"] for entry in list(rco.values())[1:-1]} <= {2, 8}


def test_the_export_computes_the_supernet_subnet(evaluated):
    context, _ = evaluated
    state, model = context.state[STATE_KEY], context.model.eval()
    details = context.report.stages[2].details
    settings = [context.report.stages[1].layers[name]["setting"] for name in state["layers"]]  # rco's choice
    subnet = Subnet(
        tuple(s["bits"] for s in settings),
        tuple(s["input_bits"] for s in settings),
        tuple(s["granularity"] == "channel" for s in settings),
        tuple(s["symmetric"] for s in settings),
        tuple(s["input_symmetric"] for s in settings),
    )
    # the supernet on the latent weights at that sub-network, with the recalibrated batch norms of the export
    reference = copy.deepcopy(model)
    norms = {key: value for key, value in model.state_dict().items() if "running_" in key or "num_batches" in key}
    reference.load_state_dict({**state["latent"], **norms})
    modules = dict(reference.named_modules())
    supernet = Supernet({name: modules[name] for name in state["layers"]}, space_of(state))
    supernet.load_state_dict(state["quantizers"])
    supernet.install()
    supernet.set(subnet)
    pixels = holdout_pixels(context)
    with torch.no_grad():
        expected = reference.eval()(pixel_values=pixels).logits
        with quantized_points(model, context.points):
            exported = model(pixel_values=pixels).logits
        plain = model(pixel_values=pixels).logits
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the points matter: inputs at 2 bits somewhere
    labels = torch.stack([sample["labels"] for sample in context.data("holdout")])
    accuracy = (exported.argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(details["measured"]["test"])


def test_the_checkpoint_lists_the_input_points_of_the_configuration(evaluated):
    context, out = evaluated
    records = context.report.stages[2].layers
    listing = json.loads((out / "activation_points.json").read_text())["points"]
    assert list(listing) == [f"{name}:input" for name in records]
    for name, entry in records.items():
        point = listing[f"{name}:input"]
        assert entry["input_point"] == f"{name}:input"
        assert point["bits"] == entry["a_bits"]
        assert point["grid"] == ("uniform" if entry["a_symmetric"] else "affine")
    # compress eval's reading of the checkpoint computes the in-memory export
    from transformers import AutoModelForImageClassification

    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = holdout_pixels(context)
    with torch.no_grad(), quantized_points(reloaded, checkpoint_points(out)):
        logits = reloaded(pixel_values=pixels).logits
    with torch.no_grad(), quantized_points(context.model, context.points):
        torch.testing.assert_close(logits, context.model(pixel_values=pixels).logits)


def test_a_configuration_from_a_report_file_is_measured_as_its_search_measured_it(
    host, evaluated, eqnet_assets, tmp_path
):
    context, out = evaluated
    _, images = eqnet_assets
    raw = eqnet_recipe(out, images, tmp_path / "again")
    raw["stages"] = [
        {**EVALUATE, "configuration": str(out / "report.json"), "supernet": str(out / "eqnet-supernet.pt")}
    ]
    again = run(host, tmp_path, raw)
    assert again.report.stages[0].layers == context.report.stages[2].layers


@pytest.mark.parametrize(
    ("source", "refusal"),
    [
        ("nowhere", "'nowhere' is neither the label of an earlier stage of this recipe (earlier stages: eqnet)"),
        ("eqnet", "stage 'eqnet' (eqnet) records no per-layer eqnet settings"),
        ("empty.json", "empty.json recorded per-layer eqnet settings"),
        ("broken.json", "broken.json is not JSON"),
    ],
)
def test_a_configuration_source_without_settings_is_refused_at_check(host, eqnet_assets, tmp_path, source, refusal):
    (tmp_path / "empty.json").write_text(json.dumps({"stages": [{"name": "rtn", "layers": {"x": {"bits": 4}}}]}))
    (tmp_path / "broken.json").write_text("{")
    model, images = eqnet_assets
    given = source if source in ("nowhere", "eqnet") else str(tmp_path / source)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(eqnet_recipe(model, images, tmp_path / "out", search={"configuration": given})))
    with pytest.raises(UserError) as raised:
        check_recipe(host, path)
    assert refusal in raised.value.message
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "configuration:" in text)
    assert str(raised.value.where).startswith(f"{path}:{line}:")


def test_a_layer_missing_from_the_configuration_is_named(evaluated):
    from compress_eqnet.configuration import configured_subnet

    context, _ = evaluated
    state = context.state[STATE_KEY]
    entries = dict(context.report.stages[1].layers)
    dropped = state["layers"][2]
    del entries[dropped]
    with pytest.raises(UserError) as raised:
        configured_subnet(entries, state["layers"], space_of(state))
    assert raised.value.where == dropped
    assert isinstance(dict(context.model.named_modules())[dropped], nn.Module)
