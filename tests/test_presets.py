"""Preset schemes (``scheme: W4A16``): the expansion, its documentation, and recipe check."""

from __future__ import annotations

import re

import pytest
import yaml
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

from compress.errors import UserError
from compress.presets import expand_scheme, grid_params, method_params, supported
from compress.runner import check
from tests.conftest import ROOT


def expandable(name: str) -> bool:
    try:
        grid_params(name)
    except UserError:
        return False
    return True


EXPANDABLE = [name for name in PRESET_SCHEMES if expandable(name)]
DOCUMENTED = re.findall(r"^\| (\w+) \| (.+) \|$", (ROOT / "docs" / "cli.md").read_text(), re.MULTILINE)


@pytest.fixture
def methods(host):
    return host.methods()


@pytest.mark.parametrize(("name", "expansion"), DOCUMENTED[1:], ids=[row[0] for row in DOCUMENTED[1:]])
def test_the_documented_table_is_the_expansion(name: str, expansion: str) -> None:
    assert grid_params(name) == yaml.safe_load("{" + expansion + "}")


def test_the_table_is_there() -> None:
    assert DOCUMENTED[0] == ("scheme", "expands to")
    assert {"W4A16", "W4A16_ASYM", "W8A8", "W8A16"} <= {name for name, _ in DOCUMENTED}


def test_the_integer_presets_expand_and_the_float_ones_do_not() -> None:
    assert {"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "INT8", "W3A16", "W4A8", "W2A4"} <= set(EXPANDABLE)
    assert not {"NVFP4", "NVFP4A16", "FP8", "FP8_DYNAMIC", "MXFP4", "UNQUANTIZED"} & set(EXPANDABLE)


@pytest.mark.parametrize("name", EXPANDABLE)
def test_expansions_mean_what_compressed_tensors_means(name: str, methods) -> None:
    """The rtn parameters a preset sets describe compressed-tensors' scheme of that name."""
    reference = preset_name_to_scheme(name, ["Linear"])
    params = methods["rtn"].Params.model_validate(method_params(name, methods["rtn"].Params, "rtn"))
    weights = reference.weights
    assert (params.bits, params.symmetric, params.granularity) == (
        weights.num_bits,
        weights.symmetric,
        weights.strategy,
    )
    assert params.group_size == weights.group_size
    inputs = reference.input_activations
    if inputs is None:
        assert params.activations is None
    else:
        activations = params.activations
        assert (activations.bits, activations.symmetric, activations.strategy, activations.dynamic) == (
            inputs.num_bits,
            inputs.symmetric,
            inputs.strategy,
            inputs.dynamic,
        )


def test_names_are_case_insensitive_and_typos_get_a_suggestion(methods) -> None:
    params_class = methods["gptq"].Params
    assert method_params("w4a16", params_class, "gptq") == grid_params("W4A16")
    with pytest.raises(UserError, match=r"unknown scheme 'W4A61' \(did you mean 'W4A16'\?\)"):
        method_params("W4A61", params_class, "gptq")


@pytest.mark.parametrize(
    ("name", "method", "reason"),
    [
        ("NVFP4", "rtn", "4-bit float weights"),
        ("FP8_DYNAMIC", "rtn", "8-bit float weights"),
        ("W4AFP8", "rtn", "8-bit float activations"),
        ("UNQUANTIZED", "rtn", "quantizes no weights"),
        ("W8A8", "gptq", "gptq has no parameter 'activations'"),
        ("W4A16", "distill", "distill has no parameter 'bits'"),
    ],
)
def test_presets_a_method_cannot_make_are_refused_with_what_it_takes(name, method, reason, methods) -> None:
    with pytest.raises(UserError) as refused:
        method_params(name, methods[method].Params, method)
    message = refused.value.message
    assert reason in message
    taken = ", ".join(supported(methods[method].Params)) or "none"
    assert message.endswith(f"(schemes {method} takes: {taken})")


def test_stage_keys_win_and_grid_shape_keys_go_together(methods) -> None:
    params_class = methods["rtn"].Params
    assert expand_scheme("W4A16", params_class, "rtn", {"group_size": 64, "bits": 3}) == {
        "bits": 3,
        "symmetric": True,
        "group_size": 64,
    }
    channel = expand_scheme("W4A16", params_class, "rtn", {"granularity": "channel"})
    assert "group_size" not in channel and params_class.model_validate(channel).group_size is None
    assert "activations" not in supported(methods["gptq"].Params)


def recipe(tiny_model_dir, tiny_text_file, tmp_path, stage: dict, output_format: str = "compressed-tensors") -> dict:
    return {
        "model": str(tiny_model_dir),
        "data": {"calibration": {"path": str(tiny_text_file), "samples": 2, "seq_len": 32}},
        "stages": [stage],
        "output": {"dir": str(tmp_path / "out"), "format": output_format},
    }


@pytest.mark.parametrize(
    "stage",
    [
        {"method": "rtn", "scheme": "W4A16", "group_size": 32},
        {"method": "rtn", "scheme": "W8A8"},
        {"method": "gptq", "scheme": "W4A16_ASYM", "group_size": 64},
    ],
)
def test_recipe_check_accepts_presets(stage, host, tiny_model_dir, tiny_text_file, tmp_path) -> None:
    checked = check(recipe(tiny_model_dir, tiny_text_file, tmp_path, stage))
    params = checked.stages[0].method.params
    assert params.bits == grid_params(stage["scheme"])["bits"]


@pytest.mark.parametrize(
    ("stage", "output_format", "message"),
    [
        ({"method": "rtn", "scheme": "NVFP4"}, "compressed-tensors", "scheme 'NVFP4' has 4-bit float weights"),
        ({"method": "gptq", "scheme": "W8A8"}, "compressed-tensors", "gptq has no parameter 'activations'"),
        ({"method": "rtn", "scheme": "W4A16"}, "compressed-tensors", "group_size 128"),
        ({"method": "rtn", "scheme": "W8A8"}, "dense", "cannot store activation quantization"),
    ],
)
def test_recipe_check_refuses_presets(
    stage, output_format, message, host, tiny_model_dir, tiny_text_file, tmp_path
) -> None:
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        check(recipe(tiny_model_dir, tiny_text_file, tmp_path, stage, output_format))
    assert str(refused.value).startswith("<mapping> ")
