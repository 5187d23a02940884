"""The fimaq method: its losses and rounding against hand computations, and whole runs on a tiny
ViT (dense output, evaluation through the recorded points) and a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from compress_fimaq.grids import searched_grid
from compress_fimaq.losses import FisherFactors, ReconstructionLoss, temperature
from compress_fimaq.method import Fimaq, FimaqParams
from compress_fimaq.rounding import attach, settle_rounding
from torch import nn

from compress.activation_points import quantized_points
from compress.api import QuantScheme
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.validate import check_recipe
from tests.models import tiny_vit_config
from tests.test_images import CLASSES, LABELS, save_classifier, write_images


def test_dplr_loss_is_the_normalized_sum_of_its_two_terms():
    torch.manual_seed(0)
    fisher = FisherFactors()
    gradients, differences = torch.rand(2, 6), torch.rand(2, 6)
    for g, d in zip(gradients, differences):
        fisher.add(g, d)
    inverse = torch.linalg.inv(differences.double() @ differences.double().T).float()
    torch.testing.assert_close(fisher.inverse, inverse)
    output, target = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    delta = (output - target).abs().reshape(3, -1)
    lowrank = torch.stack([(delta[i] @ gradients.T) @ inverse @ (gradients @ delta[i]) for i in range(3)]).mean()
    diag = (delta.pow(2) * gradients.mean(0)).mean()
    loss = ReconstructionLoss("dplr")
    assert loss(output, target, fisher).item() == pytest.approx(2.0)  # each term over its first value
    later = loss(output * 0.5, target, fisher)
    delta2 = (output * 0.5 - target).abs().reshape(3, -1)
    lowrank2 = torch.stack([(delta2[i] @ gradients.T) @ inverse @ (gradients @ delta2[i]) for i in range(3)]).mean()
    diag2 = (delta2.pow(2) * gradients.mean(0)).mean()
    assert later.item() == pytest.approx((lowrank2 / lowrank + diag2 / diag).item(), rel=1e-5)
    loss.reset()
    assert loss(output * 0.5, target, fisher).item() == pytest.approx(2.0)


def test_single_term_losses_are_doubled_and_mse_is_not():
    fisher = FisherFactors()
    fisher.add(torch.rand(4), torch.rand(4))
    output, target = torch.randn(2, 4), torch.randn(2, 4)
    for kind, first in (("diag", 2.0), ("lowrank", 2.0), ("mse", 1.0)):
        assert ReconstructionLoss(kind)(output, target, fisher).item() == pytest.approx(first)


def test_rounding_temperature_waits_out_the_warmup_then_falls_linearly():
    assert temperature(19, 100, 0.2, 20, 2) is None
    assert temperature(20, 100, 0.2, 20, 2) == pytest.approx(20)
    assert temperature(60, 100, 0.2, 20, 2) == pytest.approx(11)
    assert temperature(100, 100, 0.2, 20, 2) == pytest.approx(2)


def test_adaround_starts_at_the_fraction_and_untrained_settles_to_nearest():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    weight = layer.weight.detach().clone()
    grid = searched_grid(layer, weight, QuantScheme(bits=3, symmetric=False, granularity="channel"), 16, 0)
    rounding = attach(layer, grid)
    scaled = weight / grid.scale
    torch.testing.assert_close(rounding.rounding(), scaled - scaled.floor(), atol=1e-5, rtol=0)
    settle_rounding(layer, rounding)
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "parametrizations")
    torch.testing.assert_close(layer.weight.detach(), grid.fake_quantize(weight))


def test_fewer_calibration_samples_than_a_batch_are_refused():
    from compress.recipe import DataSpec

    method = Fimaq(FimaqParams(batch_size=32))
    with pytest.raises(UserError, match="batches of 32 calibration samples, but data: calibration: has 8"):
        method.check_data({"calibration": DataSpec(path=Path("x"), samples=8)})


# --- whole runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    from transformers import ViTForImageClassification

    from compress.host import PluginHost

    host = PluginHost()
    host.load_plugins()
    root = tmp_path_factory.mktemp("fimaq")
    data = write_images(root / "images", CLASSES, 6)
    torch.manual_seed(0)
    model = save_classifier(ViTForImageClassification(tiny_vit_config(image_size=32, **LABELS)), root / "vit")
    stage = {"method": "fimaq", "bits": 4, "activation_bits": 4, "iterations": 8, "batch_size": 4, "rank": 2}
    stage |= {"targets": ["Linear", "Conv2d"]}
    stage |= {"search_steps": 8, "search_samples": 8}
    raw = {
        "model": str(model),
        "data": {
            "calibration": {"path": str(data), "source": "images", "samples": 8},
            "evaluation": {"path": str(data), "source": "images", "samples": 12},
        },
        "stages": [stage],
        "output": {"dir": str(root / "out"), "format": "dense"},
        "evaluate": ["class_kl"],
        "run": {"mode": "sequential", "device": "cpu"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    context = apply_recipe(host, check_recipe(host, root / "recipe.yaml"))
    return context, root / "out", model


def test_every_block_and_the_outside_targets_are_reconstructed(vit_run):
    context, _, _ = vit_run
    layers = context.report.stages[0].layers
    assert set(layers) == set(context.layers)
    assert "vit.embeddings.patch_embeddings.projection" in layers and "classifier" in layers
    assert {details["loss"] for name, details in layers.items() if name.startswith("vit.layers.")} == {"dplr"}
    assert {details["fisher_rank"] for name, details in layers.items() if name.startswith("vit.layers.")} == {2}
    assert layers["classifier"]["loss"] == "kl"
    projection = "vit.embeddings.patch_embeddings.projection"
    assert next(iter(layers)) == projection  # before the blocks, with the Fisher loss, as FIMA-Q's code
    assert layers[projection]["loss"] == "dplr" and layers[projection]["fisher_rank"] == 2
    for name, state in context.layers.items():
        weight = context.model.get_submodule(name).weight.detach().flatten(1)
        assert torch.equal(state.quant.fake_quantize(weight), weight)  # hard-rounded onto the recorded grid
        assert all(len(row.unique()) <= 16 for row in weight)


def test_points_cover_the_attention_operands_and_layer_inputs(vit_run):
    context, _, _ = vit_run
    points = context.points
    for index in (0, 1):
        for site in ("query", "key", "value", "probs"):
            point = points[f"vit.layers.{index}.attention:{site}"]
            assert point.scheme.bits == 4 and point.scheme.granularity == "token"
            assert point.scale.shape == (1, 2, 17, 1)  # heads; 16 patches and the class token
        for layer in ("attention.q_proj", "attention.k_proj", "mlp.fc1"):  # after LayerNorm: folded, per token
            assert points[f"vit.layers.{index}.{layer}:input"].scheme.granularity == "token"
        assert points[f"vit.layers.{index}.mlp.fc2:input"].scheme.granularity == "token"
    # FIMA-Q's conv quant_input (quant_layers/conv.py) leaves the image unquantized at qconv_a_bit = 8
    assert "vit.embeddings.patch_embeddings.projection:input" not in points
    assert all(point.drop == 0 and not point.scale.requires_grad for point in points.values())


def test_the_report_names_the_folded_layernorms(vit_run):
    context, _, _ = vit_run
    layers = context.report.stages[0].layers
    folded = {name: details["folded_norm"] for name, details in layers.items() if "folded_norm" in details}
    expected = {}
    for index in (0, 1):
        block = f"vit.layers.{index}"
        expected |= {f"{block}.attention.{p}_proj": f"{block}.layernorm_before" for p in "qkv"}
        expected[f"{block}.mlp.fc1"] = f"{block}.layernorm_after"
    assert folded == expected
    reference = context.reference_model()
    for norm in set(expected.values()):
        assert not torch.equal(context.model.get_submodule(norm).bias, reference.get_submodule(norm).bias)
    final = "vit.layernorm"  # read by the classifier, outside the blocks: not folded (nor in FIMA-Q's code)
    assert torch.equal(context.model.get_submodule(final).weight, reference.get_submodule(final).weight)


def test_evaluation_computes_through_the_points(vit_run):
    from compress.images import ClassKL

    context, _, _ = vit_run
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("evaluation")])
    reference = context.reference_model()
    with torch.no_grad():
        target = reference(pixel_values=pixels).logits
        with quantized_points(context.model, context.points):
            through = context.model(pixel_values=pixels).logits
        without = context.model(pixel_values=pixels).logits
    assert not torch.allclose(through, without)
    kl = torch.nn.functional.kl_div(through.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none")
    assert context.report.evaluation["class_kl"]["compressed"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-4)
    assert ClassKL  # the metric the recipe evaluated


def test_dense_output_lists_the_points_a_runtime_must_quantize(vit_run):
    from transformers import AutoModelForImageClassification

    context, out, _ = vit_run
    listing = json.loads((out / "activation_points.json").read_text())
    assert set(listing["points"]) == set(context.points)
    written = AutoModelForImageClassification.from_pretrained(out).eval()
    for name in context.layers:
        torch.testing.assert_close(written.get_submodule(name).weight, context.model.get_submodule(name).weight)


def test_compressed_tensors_cannot_take_the_points(vit_run, compress_host, tmp_path):
    _, _, model = vit_run
    raw = {
        "model": str(model),
        "data": {"calibration": {"path": str(model.parent / "images"), "source": "images", "samples": 12}},
        "stages": [{"method": "fimaq", "batch_size": 4}],
        "output": {"dir": str(tmp_path / "out"), "format": "compressed-tensors"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="cannot store activation quantization at input, query, key, value, probs"):
        check_recipe(compress_host, tmp_path / "recipe.yaml")


def test_llama_blocks_reconstruct_with_points_in_their_attention(run_recipe, tiny_text_file):
    stage = {"method": "fimaq", "bits": 4, "activation_bits": 8, "loss": "dplr", "iterations": 4, "batch_size": 2}
    stage |= {"rank": 2, "search_steps": 4, "token_scales": False, "channel_inputs": False}
    result = run_recipe(
        {
            "stages": [stage],
            "data": {"calibration": {"path": str(tiny_text_file), "samples": 4, "seq_len": 16}},
        }
    )
    context = result.context
    assert {name.rsplit(":", 1)[1] for name in context.points} == {"input", "query", "key", "value", "probs"}
    layers = context.report.stages[0].layers
    assert {details["fisher_rank"] for details in layers.values()} == {2}


def test_compress_eval_of_the_dense_output_computes_through_its_points(vit_run):
    from click.testing import CliRunner

    from compress.cli import cli

    context, out, model = vit_run
    data = model.parent / "images"
    argv = ["eval", str(out), "--against", str(model), "--data", str(data), "--source", "images"]
    result = CliRunner().invoke(cli, [*argv, "--samples", "12", "--metric", "class_kl", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    (evaluation,) = json.loads(result.stdout)["evaluation"].values()  # keyed by metric and data
    expected = context.report.evaluation["class_kl"]["compressed"]
    assert evaluation["compressed"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("search", [True, False], ids=["init", "rtn"])
def test_without_reconstruction_weights_round_to_nearest(run_recipe, tiny_text_file, search):
    stage = {"method": "fimaq", "reconstruct": False, "range_search": search, "batch_size": 2, "search_steps": 4}
    stage |= {"token_scales": False, "points": ["input", "probs"], "probs_grid": "log2"}
    data = {"path": str(tiny_text_file), "samples": 4, "seq_len": 16}
    context = run_recipe({"stages": [stage], "data": {"calibration": data}}).context
    original = context.reference_model()
    for name, state in context.layers.items():
        weight = context.model.get_submodule(name).weight.detach()
        assert torch.equal(weight, state.quant.fake_quantize(original.get_submodule(name).weight.detach()))
    probs = [point for name, point in context.points.items() if name.endswith(":probs")]
    assert probs and all(point.scheme.grid == "log2" and point.scheme.granularity == "head" for point in probs)
