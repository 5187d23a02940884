"""rco and evopress as recipe stages on a tiny model: the mixed-precision checkpoint, the report, the plot."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress_rco

RCO_STAGE = {
    "method": "rco",
    "targets": ["re:.*(q|k|v|o|gate|up|down)_proj$"],
    "providers": ["rtn"],
    "settings": {"bits": [2, 3, 4, 8], "group_size": [32]},
    "budget": {"bits_per_weight": 3.6},
    "steps": 6,
    "batch_size": 2,
}


def recipe(stage: dict) -> dict:
    return {"stages": [stage], "output": {"dir": "out", "format": "compressed-tensors"}}


@pytest.mark.parametrize(
    "stage",
    [
        RCO_STAGE,
        {
            **{key: value for key, value in RCO_STAGE.items() if key not in ("steps", "batch_size")},
            "method": "evopress",
            "generations": 3,
            "offspring": 4,
            "survivors": [2, 1],
            "tokens": [31, 124],
            "initial": 4,
            "initial_tokens": 31,
        },
    ],
    ids=["rco", "evopress"],
)
def test_search_writes_a_mixed_precision_checkpoint_that_reloads_exactly(register_plugin, run_recipe, stage):
    register_plugin(compress_rco, name="rco")
    run = run_recipe(recipe(stage))
    (record,) = run.report["stages"]
    details = record["details"]
    assert details["budget"] == {"bits_per_weight": 3.6}
    achieved = details["achieved"]["bits_per_weight"]
    assert details["cheapest"]["bits_per_weight"] <= achieved <= 3.6
    layers = record["layers"]
    assert len(layers) == 14
    weights = {name: module.weight.numel() for name, module in run.context.model.named_modules() if name in layers}
    total = sum(layer["cost"] for layer in layers.values())
    assert total / sum(weights.values()) == pytest.approx(achieved)
    assert len({layer["setting"]["bits"] for layer in layers.values()}) > 1  # mixed precision

    config = json.loads((run.output / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == len({layer["setting"]["bits"] for layer in layers.values()})
    assert (run.output / f"{stage['method']}-allocation.png").read_bytes()[:4] == b"\x89PNG"

    reloaded = AutoModelForCausalLM.from_pretrained(run.output).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, run.context.model(ids).logits)


def test_rco_over_sparsity_levels_meets_a_params_budget(register_plugin, run_recipe):
    import compress_nm

    register_plugin(compress_rco, name="rco")
    register_plugin(compress_nm, name="nm")
    stage = {
        **RCO_STAGE,
        "providers": ["magnitude"],
        "settings": {"sparsity": [0.0, 0.25, 0.5, 0.75]},
        "budget": {"params_kept": 0.55},
    }
    run = run_recipe(recipe(stage))
    (record,) = run.report["stages"]
    assert record["produces"]["sparsity"] == "unstructured"
    assert 0.5 <= record["details"]["achieved"]["params_kept"] <= 0.55
    levels = {name: layer["setting"]["sparsity"] for name, layer in record["layers"].items()}
    assert len(set(levels.values())) > 1
    for name, level in levels.items():
        weight = dict(run.context.model.named_modules())[name].weight
        assert (weight == 0).float().mean().item() == pytest.approx(level, abs=0.01)
        assert run.context.layers[name].sparsity == ("unstructured" if level else None)
