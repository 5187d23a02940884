"""The compressed-tensors writer: pack-quantized checkpoints that transformers reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from compress.engine import apply_recipe
from compress.validate import check_recipe

pytest.importorskip("compressed_tensors")

ATTENTION = "re:.*(q|k|v|o)_proj$"
MLP = "re:.*(gate|up|down)_proj$"


def run(host, path: Path):
    return apply_recipe(host, check_recipe(host, path))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def compress(host, write_recipe, tmp_path, stages):
    out = tmp_path / "out"
    recipe = write_recipe(stages=stages, evaluate=[], output={"dir": str(out), "format": "compressed-tensors"})
    return run(host, recipe), out


def quantization_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            found.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118 (not iterable)
    return found


def assert_round_trip(context, out: Path, dequantize: bool = False) -> None:
    """Reloaded logits equal the in-memory model's exactly: the model is float32 and the
    scales are stored in float32, so transformers' decompression rebuilds the same weights.

    ``dequantize`` loads through transformers' other compressed-tensors route (the
    library's decompressor run on each checkpoint tensor, no compressed model layout).
    """
    before = {name: value.clone() for name, value in context.model.state_dict().items()}
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    reloaded = AutoModelForCausalLM.from_pretrained(out, **extra).eval()
    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
    expected = logits(context.model, ids)
    assert torch.equal(logits(reloaded, ids), expected)
    # the writer left the in-memory model as it was
    for name, value in context.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    modules = dict(reloaded.named_modules())
    for name in context.layers:
        assert torch.equal(modules[name].weight, dict(context.model.named_modules())[name].weight), name


def assert_grids_stored(context, out: Path) -> None:
    """The stored scales and zero points are the recorded ones, bit for bit."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    stored = tensors(out)
    modules = dict(context.model.named_modules())
    for name, state in context.layers.items():
        grid = state.quant
        assert torch.equal(stored[f"{name}.weight_scale"], grid.scale), name
        assert f"{name}.weight" not in stored
        shape = stored[f"{name}.weight_shape"]
        codes = unpack_from_int32(stored[f"{name}.weight_packed"], grid.scheme.bits, shape)
        assert torch.equal(codes, grid.quantize(modules[name].weight)), name
        if grid.zero_point is None:
            assert f"{name}.weight_zero_point" not in stored
        else:
            zp_shape = (*shape[:-1], grid.scale.shape[-1])
            zero_point = unpack_from_int32(
                stored[f"{name}.weight_zero_point"], grid.scheme.bits, zp_shape, packed_dim=0
            )
            assert torch.equal(zero_point, grid.zero_point), name


@pytest.mark.parametrize(
    "scheme",
    [
        {"bits": 4, "group_size": 64},
        {"bits": 4, "group_size": 64, "symmetric": False},
        {"bits": 8, "granularity": "channel"},
        {"bits": 8, "granularity": "channel", "symmetric": False},
    ],
    ids=["w4g64-sym", "w4g64-asym", "w8-channel-sym", "w8-channel-asym"],
)
def test_round_trip_through_transformers(host, write_recipe, tmp_path, scheme):
    context, out = compress(host, write_recipe, tmp_path, [{"method": "rtn", **scheme}])
    config = quantization_config(out)
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    assert list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    weights = group["weights"]
    assert weights["num_bits"] == scheme["bits"] and weights["type"] == "int"
    assert weights["symmetric"] == scheme.get("symmetric", True)
    assert weights["strategy"] == scheme.get("granularity", "group")
    assert weights["group_size"] == scheme.get("group_size")
    assert config["ignore"] == ["lm_head"]
    assert len(context.layers) == 14
    assert_grids_stored(context, out)
    asymmetric = not scheme.get("symmetric", True)
    # compressed-tensors 0.20 builds the compressed layout of asymmetric pack-quantized
    # layers with unpacked zero points (see the xfail below): those load with dequantize=True.
    assert_round_trip(context, out, dequantize=asymmetric)
    if not asymmetric:
        assert_round_trip(context, out, dequantize=True)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="compressed-tensors 0.20 compress_model on the meta model keeps weight_zero_point "
    "unpacked (out, groups) while the pack-quantized checkpoint holds it packed (out/8, groups): "
    "transformers' default load reports a size mismatch (llm-compressor issue #1618)",
)
def test_asymmetric_default_transformers_load(host, write_recipe, tmp_path):
    context, out = compress(
        host, write_recipe, tmp_path, [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}]
    )
    assert_round_trip(context, out)


def test_mixed_precision_has_one_config_group_per_scheme(host, write_recipe, tmp_path):
    stages = [
        {"method": "rtn", "targets": [MLP], "bits": 4, "group_size": 64},
        {"method": "rtn", "targets": [ATTENTION], "bits": 8, "granularity": "channel"},
    ]
    context, out = compress(host, write_recipe, tmp_path, stages)
    config = quantization_config(out)
    groups = config["config_groups"]
    assert len(groups) == 2
    by_bits = {group["weights"]["num_bits"]: group for group in groups.values()}
    assert sorted(by_bits[4]["targets"]) == sorted(
        n for n in context.layers if n.endswith(("gate_proj", "up_proj", "down_proj"))
    )
    assert sorted(by_bits[8]["targets"]) == sorted(
        n for n in context.layers if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    )
    assert by_bits[8]["weights"]["strategy"] == "channel" and by_bits[8]["weights"]["symmetric"]
    assert by_bits[4]["weights"]["strategy"] == "group" and by_bits[4]["weights"]["group_size"] == 64
    assert config["ignore"] == ["lm_head"]
    assert_grids_stored(context, out)
    assert_round_trip(context, out)


def test_unquantized_linears_are_ignored(host, write_recipe, tmp_path):
    context, out = compress(
        host, write_recipe, tmp_path, [{"method": "rtn", "targets": [MLP], "bits": 4, "group_size": 64}]
    )
    config = quantization_config(out)
    attention = sorted(
        n.removesuffix(".weight")
        for n in context.model.state_dict()
        if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
    )
    assert sorted(config["ignore"]) == sorted([*attention, "lm_head"])
    assert_round_trip(context, out)


def test_w4g64_linear_bytes_are_under_0_3x_of_bf16(host, write_recipe, tmp_path):
    context, out = compress(host, write_recipe, tmp_path, [{"method": "rtn", "bits": 4, "group_size": 64}])
    stored = tensors(out)
    linear_bytes = sum(
        value.numel() * value.element_size() for key, value in stored.items() if key.rsplit(".", 1)[0] in context.layers
    )
    modules = dict(context.model.named_modules())
    bf16_bytes = sum(modules[name].weight.numel() * 2 for name in context.layers)
    ratio = linear_bytes / bf16_bytes
    print(f"W4 g64 linear bytes {linear_bytes} vs bf16 {bf16_bytes}: {ratio:.4f}")
    assert ratio <= 0.3


def test_bfloat16_model_stores_bfloat16_scales(host, write_recipe, tmp_path, tiny_lm_dir):
    """compressed-tensors gives weight_scale the weight's dtype when it loads, so a bf16 model's
    scales are stored in bf16: each is rounded once (relative error <= 2^-9), and each reloaded
    weight differs from the in-memory one by at most that plus two bf16 roundings (< 2^-7 relative)."""
    out = tmp_path / "out"
    recipe = write_recipe(
        model={"name": str(tiny_lm_dir), "dtype": "bfloat16"},
        stages=[{"method": "rtn", "bits": 4, "group_size": 64}],
        evaluate=[],
        output={"dir": str(out), "format": "compressed-tensors"},
    )
    context = run(host, recipe)
    stored = tensors(out)
    modules = dict(context.model.named_modules())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
    expected, got = logits(context.model, ids).float(), logits(reloaded, ids).float()  # decompresses
    difference = (got - expected).abs().max().item()
    print(f"bf16 max logit difference {difference:.4f} (logit range {expected.abs().max().item():.1f})")
    # bf16 logits of magnitude 64-128 are spaced 0.5 apart: allow a few such steps (2% of the range)
    assert difference <= 0.02 * expected.abs().max().item()
    reloaded_modules = dict(reloaded.named_modules())
    for name, state in context.layers.items():
        assert stored[f"{name}.weight_scale"].dtype == torch.bfloat16
        assert torch.equal(stored[f"{name}.weight_scale"], state.quant.scale.to(torch.bfloat16))
        weight = modules[name].weight.float()
        reloaded_weight = reloaded_modules[name].weight
        assert reloaded_weight.dtype == torch.bfloat16
        assert ((reloaded_weight.float() - weight).abs() <= weight.abs() * 2**-7).all(), name
