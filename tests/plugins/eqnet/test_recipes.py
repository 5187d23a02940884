"""eqnet and eqnet_search through compress apply: the exported sub-network, the supernet file, --resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from compress_eqnet.efficiency import Efficiency
from compress_eqnet.method import STATE_KEY
from compress_eqnet.quantizers import BITS
from compress_eqnet.search import space_of

from compress.errors import UserError
from compress.validate import check_recipe
from tests.plugins.eqnet.conftest import eqnet_recipe, run


@pytest.fixture(scope="module")
def searched(run_once):
    """eqnet, then eqnet_search at 4 average bits (per-channel weights), W2A2 and W8A8 measured too."""
    search = {"average_bits": 4, "evaluate_uniform": [2, 8], "test_data": "holdout", "granularity": "channel"}
    return run_once("searched", lambda model, images, out: eqnet_recipe(model, images, out, search=search))


def test_the_search_exports_a_subnet_under_the_budget(searched):
    _, out = searched
    report = json.loads((out / "report.json").read_text())
    details = report["stages"][1]["details"]
    assert 3.5 < details["average_bits"]["weights"] <= 4 and 3.5 < details["average_bits"]["inputs"] <= 4
    assert set(details["uniform"]) == {"W2A2", "W8A8"} and set(details["measured"]) == {"holdout", "test"}
    assert details["predicted_accuracy"] >= 0 and "kendall_tau" in details["predictor"]
    assert details["bitops"] > 0 and details["search"]["seconds"] >= 0
    layers = report["stages"][1]["layers"]
    first, *_, last = layers.values()
    assert first["w_bits"] == first["a_bits"] == last["w_bits"] == last["a_bits"] == 8
    assert first["input_grid"]["step"] > 0 and not first["input_grid"]["unsigned"]  # the image is signed
    assert (out / "eqnet-supernet.pt").is_file()


def test_exported_weights_lie_on_their_grids_and_reload(searched):
    from transformers import AutoModelForImageClassification

    context, out = searched
    modules = dict(context.model.named_modules())
    for name, state in context.layers.items():
        assert state.method == "eqnet_search" and state.quant is not None  # symmetric weights: recorded grids
        weight = modules[name].weight.detach().flatten(1)
        torch.testing.assert_close(state.quant.fake_quantize(weight), weight)
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("holdout")])
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(pixel_values=pixels).logits, context.model.eval()(pixel_values=pixels).logits)


def test_a_search_recipe_starts_from_the_supernet_file(host, searched, eqnet_assets, tmp_path):
    _, out = searched
    _, images = eqnet_assets
    raw = eqnet_recipe(out, images, tmp_path / "w4a4")
    raw["stages"] = [{"method": "eqnet_search", "bits": 4, "supernet": str(out / "eqnet-supernet.pt"), "bn_batches": 1}]
    context = run(host, tmp_path, raw)
    layers = context.report.stages[0].layers
    assert [entry["w_bits"] for entry in layers.values()][1:-1] == [4] * (len(layers) - 2)


def test_resume_restores_the_supernet(host, eqnet_assets, tmp_path):
    model, images = eqnet_assets
    export = {"bits": 3, "bn_batches": 1}
    reference = run(host, tmp_path / "a", eqnet_recipe(model, images, tmp_path / "a" / "out", search=export))
    elsewhere = tmp_path / "elsewhere.json"  # a configuration of other layers: the search stage fails when it runs
    elsewhere.write_text(json.dumps({"stages": [{"layers": {"other.layer": {"setting": {"bits": 4}}}}]}))
    failing_search = {"configuration": str(elsewhere), "bn_batches": 1}
    failing = eqnet_recipe(model, images, tmp_path / "b" / "out", search=failing_search, checkpoint_every=1)
    with pytest.raises(UserError, match="the configuration has no eqnet setting for this layer"):
        run(host, tmp_path / "b", failing)
    assert not (tmp_path / "b" / "out").exists()
    resumed_raw = eqnet_recipe(model, images, tmp_path / "b" / "out", search=export, checkpoint_every=1)
    resumed = run(host, tmp_path / "b", resumed_raw, resume=True)
    assert resumed.report.stages[0].details["resumed_from_step"] == 1
    for key in ("weights", "inputs"):
        for name, values in reference.state["eqnet"]["quantizers"][key].items():
            for tensor, value in values.items():
                torch.testing.assert_close(resumed.state["eqnet"]["quantizers"][key][name][tensor], value)


def test_a_vit_subnet_is_written_as_compressed_tensors_config_groups(host, eqnet_assets, tmp_path):
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    from tests.models import tiny_vit_config
    from tests.test_images import LABELS, save_classifier

    _, images = eqnet_assets
    torch.manual_seed(0)
    vit = save_classifier(ViTForImageClassification(tiny_vit_config(image_size=32, **LABELS)), tmp_path / "vit")
    search = {"bits": 4, "targets": ["Linear"], "record_inputs": False}  # compressed-tensors holds no LSQ+ inputs
    raw = eqnet_recipe(vit, images, tmp_path / "out", search=search, targets=["Linear"])
    raw["output"]["format"] = "compressed-tensors"
    context = run(host, tmp_path, raw)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    groups = sorted((group["weights"]["num_bits"], len(group["targets"])) for group in config["config_groups"].values())
    assert groups == [(4, 11), (8, 2)]  # the first and the last Linear at 8 bits
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("holdout")])
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(reloaded(pixel_values=pixels).logits, context.model.eval()(pixel_values=pixels).logits)


def reachable_bitops(context) -> tuple[float, float]:
    """The smallest and largest sub-network's BitOps, from the layer costs the run measured."""
    state = context.state[STATE_KEY]
    space = space_of(state)
    efficiency = Efficiency([state["costs"][name] for name in state["layers"]], space.fixed_bits)
    layers = len(state["layers"])
    return tuple(efficiency.bitops((b,) * layers, (b,) * layers) for b in (BITS[0], BITS[-1]))


def test_a_bitops_budget_below_every_subnet_is_refused_at_check_with_the_runs_figures(
    host, searched, eqnet_assets, tmp_path
):
    context, _ = searched
    smallest, largest = reachable_bitops(context)
    model, images = eqnet_assets
    path = tmp_path / "recipe.yaml"
    for bitops in (smallest * (1 - 1e-6), smallest):
        path.write_text(yaml.safe_dump(eqnet_recipe(model, images, tmp_path / "out", search={"bitops": bitops})))
        if bitops < smallest:
            with pytest.raises(UserError) as raised:
                check_recipe(host, path)
            assert (
                f"smallest reachable bitops: {smallest:.6g}, largest {largest:.6g}, per image" in raised.value.message
            )
            assert str(raised.value.where).startswith(f"{path}:")
        else:
            check_recipe(host, path)
    assert not (tmp_path / "out").exists()


def test_a_bitops_budget_is_checked_against_a_supernet_file(host, searched, eqnet_assets, tmp_path):
    context, out = searched
    smallest, _ = reachable_bitops(context)
    _, images = eqnet_assets
    raw = eqnet_recipe(out, images, tmp_path / "out")
    raw["stages"] = [{"method": "eqnet_search", "bitops": smallest / 2, "supernet": str(out / "eqnet-supernet.pt")}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as raised:
        check_recipe(host, path)
    assert f"smallest reachable bitops: {smallest:.6g}" in raised.value.message
