"""W8A8 int checkpoints (dynamic per-token and static per-tensor input scales) round trip
through transformers' compressed-tensors integration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.checkpoint.inspect import inspect_checkpoint
from compress.errors import UserError
from compress.method import Produces
from compress.quant.activations import quantized_inputs
from compress.validate import check_recipe
from tests.test_compressed_tensors_writer import ATTENTION, MLP, compress, logits, quantization_config, tensors

W8 = {"method": "rtn", "bits": 8, "granularity": "channel"}
DYNAMIC = {**W8, "activations": {"bits": 8, "dynamic": True, "strategy": "token"}}


def assert_round_trip(context, out) -> None:
    """The reloaded model's logits equal the in-memory model's with its inputs fake-quantized.

    Exact equality: the model is float32, the weight and input scales are stored in
    float32, and ``ActivationQuant.fake_quantize`` does compressed-tensors' operations in
    the same order and dtype, so both sides compute the same numbers.
    """
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
    with quantized_inputs(context.model, context.layers):
        expected = logits(context.model, ids)
    weight_only = logits(context.model, ids)
    assert not torch.equal(expected, weight_only)  # the inputs really are quantized
    assert torch.equal(logits(reloaded, ids), expected)


def test_dynamic_per_token(host, write_recipe, tmp_path):
    context, out = compress(host, write_recipe, tmp_path, [DYNAMIC])
    config = quantization_config(out)
    assert config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["format"] == "int-quantized" and group["targets"] == ["Linear"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    inputs = group["input_activations"]
    assert inputs["dynamic"] is True and inputs["strategy"] == "token"
    assert inputs["num_bits"] == 8 and inputs["type"] == "int" and inputs["symmetric"] is True
    stored = tensors(out)
    assert not [key for key in stored if key.endswith(("input_scale", "input_zero_point"))]
    name = next(iter(context.layers))
    assert stored[f"{name}.weight"].dtype == torch.int8
    summary = inspect_checkpoint(out)
    assert summary.format == "compressed-tensors (int-quantized)"
    quantized = [layer for layer in summary.layers if layer.name in context.layers]
    assert {layer.storage for layer in quantized} == {"int8 channel sym, a8 dynamic token"}
    # int8 codes and a scale per channel: about half of bf16
    assert 0.5 < sum(layer.disk_bytes for layer in quantized) / sum(layer.bf16_bytes for layer in quantized) < 0.52
    assert_round_trip(context, out)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_static_per_tensor(host, write_recipe, tmp_path, symmetric):
    stages = [W8, {"method": "activation_scales", "symmetric": symmetric}]
    context, out = compress(host, write_recipe, tmp_path, stages)
    inputs = quantization_config(out)["config_groups"]["group_0"]["input_activations"]
    assert inputs["dynamic"] is False and inputs["strategy"] == "tensor" and inputs["symmetric"] is symmetric
    stored = tensors(out)
    assert len(context.layers) == 14
    for name, state in context.layers.items():
        assert stored[f"{name}.input_scale"].shape == (1,)
        assert torch.equal(stored[f"{name}.input_scale"], state.activations.scale), name
        if symmetric:
            assert f"{name}.input_zero_point" not in stored
        else:
            assert torch.equal(stored[f"{name}.input_zero_point"], state.activations.zero_point), name
            assert stored[f"{name}.input_zero_point"].dtype == torch.int8
    assert_round_trip(context, out)


def test_weight_only_and_w8a8_layers_mix(host, write_recipe, tmp_path):
    stages = [
        {"method": "rtn", "targets": [MLP], "bits": 4, "group_size": 64},
        {**DYNAMIC, "targets": [ATTENTION]},
    ]
    context, out = compress(host, write_recipe, tmp_path, stages)
    config = quantization_config(out)
    assert config["format"] == "mixed-precision"
    formats = {group["format"]: group for group in config["config_groups"].values()}
    assert formats["pack-quantized"]["input_activations"] is None
    assert formats["int-quantized"]["input_activations"]["dynamic"] is True
    assert_round_trip(context, out)


def test_static_and_dynamic_layers_mix(host, write_recipe, tmp_path):
    """Static scales where activations are tame, dynamic per-token where they are not (down_proj)."""
    down = "re:.*down_proj$"
    rest = "re:.*(q|k|v|o|gate|up)_proj$"
    stages = [
        {**W8, "targets": [rest]},
        {**DYNAMIC, "targets": [down]},
        {"method": "activation_scales", "targets": [rest]},
    ]
    context, out = compress(host, write_recipe, tmp_path, stages)
    config = quantization_config(out)
    assert config["format"] == "int-quantized"
    dynamic = {group["input_activations"]["dynamic"]: group for group in config["config_groups"].values()}
    assert all(name.endswith("down_proj") for name in dynamic[True]["targets"])
    assert len(dynamic[False]["targets"]) == 12
    assert_round_trip(context, out)


def test_formats_without_activation_quantization_refuse_at_check(host, write_recipe, tmp_path):
    path = write_recipe(stages=[DYNAMIC], output={"dir": str(tmp_path / "out"), "format": "dense"})
    with pytest.raises(UserError, match="output format 'dense' cannot store activation quantization"):
        check_recipe(host, path)
    # bitsandbytes already refuses any weight grid; it refuses activation quantization too
    produced = Produces(activation_bits=8)
    assert "activation" in host.writers()["bitsandbytes"].capabilities.refusal(produced)


def test_static_scales_need_a_weight_quantizer_first(host, write_recipe, tmp_path):
    path = write_recipe(stages=[{"method": "activation_scales"}, W8])
    with pytest.raises(UserError, match="after a weight-quantizing stage"):
        check_recipe(host, path)


def test_rtn_refuses_static_activations(host, write_recipe, tmp_path):
    static = {**W8, "activations": {"dynamic": False, "strategy": "tensor"}}
    with pytest.raises(UserError, match="activation_scales stage"):
        check_recipe(host, write_recipe(stages=[static]))
    per_token = {**W8, "activations": {"dynamic": False}}
    with pytest.raises(UserError, match="static activation scales are per tensor"):
        check_recipe(host, write_recipe(stages=[per_token]))
