"""magnitude, wanda and sparsegpt through `compress apply` on the tiny Llama: the recorded state,
the reports, and checkpoints that plain ``from_pretrained`` reloads with the very same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.checkpoint.sparse import semi_structured_layers
from compress_nm.patterns import NMPattern, is_nm_sparse

pytest.importorskip("compressed_tensors")

LINEARS = "re:.*(q|k|v|o|gate|up|down)_proj$"


def stage(method: str, **params) -> dict:
    return {"method": method, "targets": [LINEARS], **params}


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def assert_reloads_identically(run) -> AutoModelForCausalLM:
    reloaded = AutoModelForCausalLM.from_pretrained(run.output).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the first forward decompresses packed layers
        assert torch.equal(reloaded(input_ids=ids).logits, run.context.model(input_ids=ids).logits)
    return reloaded


@pytest.mark.parametrize(
    ("fmt", "quant"),
    [
        ("dense", {}),
        ("compressed-tensors", {}),
        ("compressed-tensors", {"bits": 4}),
        ("compressed-tensors", {"bits": 8}),
    ],
    ids=["dense", "ct-2of4", "ct-2of4-w4", "ct-2of4-w8"],
)
def test_sparsegpt_2of4_round_trip(run_recipe, fmt, quant):
    params = {"pattern": "2:4", **quant, **({"group_size": 32} if quant else {})}
    run = run_recipe({"stages": [stage("sparsegpt", **params)], "output": {"format": fmt}})
    config = json.loads((run.output / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert sorted(config["sparsity_config"]["targets"]) == sorted(linears(run.context.model))
    assert semi_structured_layers(run.output) == sorted(linears(run.context.model))
    if quant:
        assert config["config_groups"]["group_0"]["weights"]["num_bits"] == quant["bits"]
    reloaded = assert_reloads_identically(run)
    modules = dict(reloaded.named_modules())
    for name, module in linears(run.context.model).items():
        assert is_nm_sparse(modules[name].weight, NMPattern(2, 4)), name
        state = run.context.layers[name]
        assert state.sparsity == "2:4"
        if quant:  # the kept weights lie on the recorded grid
            assert torch.equal(state.quant.fake_quantize(module.weight.data), module.weight.data)


@pytest.mark.parametrize(
    ("method", "params"),
    [("magnitude", {"pattern": "4:8"}), ("wanda", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"})],
)
def test_magnitude_and_wanda_record_the_pattern(run_recipe, method, params):
    run = run_recipe({"stages": [stage(method, **params)], "output": {"format": "dense"}})
    structure = params.get("pattern", "unstructured")
    layers = run.report["stages"][0]["layers"]
    for name, module in linears(run.context.model).items():
        weight = module.weight.data
        assert run.context.layers[name].sparsity == structure
        if "pattern" in params:
            assert is_nm_sparse(weight, NMPattern.parse(structure))
        else:  # Wanda compares per output row: exactly half of every row
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()
        assert layers[name]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    config = json.loads((run.output / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["sparsity_structure"] == structure
    assert_reloads_identically(run)


def test_sparsegpt_reports_a_smaller_error_than_magnitude(run_recipe):
    run = run_recipe({"stages": [stage("sparsegpt", sparsity=0.5)], "output": None})
    layers = run.report["stages"][0]["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["solved_with"] == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    for name, report in layers.items():
        assert 0 < report["objective"] < report["magnitude_objective"], name
        assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)
