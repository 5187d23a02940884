"""The bitsandbytes writer on the two-layer SmolLM2, on CPU: round trip through transformers.

The writer is called directly on a loaded context (no stage runs): bitsandbytes
re-quantizes with its own codebook, so no quantization method may run before it (the
recipe check refuses rtn + bitsandbytes, tested below), and there is no no-op method.

Reference for the round trip: the in-memory model with every quantized Linear's weight
replaced by ``dequantize(quantize(weight))`` through ``bitsandbytes.functional``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from compress.checkpoint.bitsandbytes import BitsAndBytesOptions, quantized_modules
from compress.engine import load_context
from compress.errors import UserError
from compress.host import PluginHost
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST


@pytest.fixture(scope="module")
def context(tiny_lm_dir: Path, tmp_path_factory):
    host = PluginHost()
    host.load_plugins()
    path = tmp_path_factory.mktemp("bnb-recipe") / "recipe.yaml"
    recipe = {
        "model": str(tiny_lm_dir),
        "data": {"evaluation": {"path": str(WIKITEXT_TEST), "samples": 2, "seq_len": 64}},
        "stages": [{"method": "rtn", "bits": 8, "group_size": 64}],  # checked, never run
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ctx = load_context(host, check_recipe(host, path))
    ctx.recipe.output = SimpleNamespace(max_shard_size="2GB")
    return ctx


def write(context, directory: Path, **options) -> Path:
    directory.mkdir()
    context.host.writers()["bitsandbytes"].write(context, directory, BitsAndBytesOptions(**options))
    return directory


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def dequantized(weight: torch.Tensor, options: BitsAndBytesOptions) -> torch.Tensor:
    if options.quant_type == "int8":
        codes, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
        return (codes.float() * scales[:, None].float() / 127).to(weight.dtype)
    packed, state = F.quantize_4bit(
        weight, blocksize=options.blocksize, compress_statistics=options.double_quant, quant_type=options.quant_type
    )
    return F.dequantize_4bit(packed, state).to(weight.dtype)


def reference(context, options: BitsAndBytesOptions):
    model = copy.deepcopy(context.model)
    for module in quantized_modules(model, options).values():
        module.weight.data = dequantized(module.weight.data, options)
    return model


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def kl(reference_logits: torch.Tensor, other: torch.Tensor) -> float:
    p = reference_logits.log_softmax(-1)
    q = other.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


# (options, tolerance against the bnb-dequantized reference, max relative logit error vs original)
CASES = [
    ({"quant_type": "nf4", "double_quant": True}, 5e-3, 0.06),
    ({"quant_type": "nf4", "double_quant": False, "blocksize": 32}, 5e-3, 0.06),
    ({"quant_type": "fp4", "double_quant": False, "blocksize": 64}, 5e-3, 0.08),
    ({"quant_type": "fp4", "double_quant": True, "blocksize": 32}, 5e-3, 0.08),
    ({"quant_type": "int8"}, 2e-2, 0.02),
]


@pytest.mark.parametrize("options, tolerance, max_error", CASES, ids=lambda c: str(c))
def test_round_trip_through_transformers(context, tmp_path, options, tolerance, max_error):
    out = write(context, tmp_path / "out", **options)
    parsed = BitsAndBytesOptions(**options)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    if parsed.quant_type == "int8":
        assert config["load_in_8bit"] is True
    else:
        assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == parsed.quant_type
        assert config["bnb_4bit_use_double_quant"] is parsed.double_quant
    assert (out / "tokenizer.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    kind = "Linear8bitLt" if parsed.quant_type == "int8" else "Linear4bit"
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == kind
    assert type(reloaded.lm_head).__name__ == "Linear"  # ignored by default

    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
    got = logits(reloaded, ids)
    expected = logits(reference(context, parsed), ids)
    original = logits(context.model, ids)
    # Measured on CPU (bitsandbytes 0.50.2, torch 2.13): 4-bit 1.6e-3 .. 2.2e-3 relative
    # logit error against the weight-only reference (bitsandbytes' CPU 4-bit matmul, on its
    # repacked CPU layout, does not reproduce float32 F.linear exactly); int8 1.5e-2:
    # LLM.int8 also quantizes the activations row-wise at run time (threshold 6.0 outliers
    # kept in float), which the weight-only reference does not.
    assert relative_error(got, expected) < tolerance, relative_error(got, expected)
    assert relative_error(got, original) < max_error
    assert kl(original, got) < 0.1
    assert (got.argmax(-1) == original.argmax(-1)).float().mean() > 0.8


def test_stored_weights_are_what_transformers_writes(context, tiny_lm_dir, tmp_path):
    """nf4 + double quant, blocksize 64: byte for byte the tensors transformers' own
    quantize-on-load path saves for the same (unmodified) weights."""
    from safetensors.torch import load_file

    ours = load_file(write(context, tmp_path / "ours", quant_type="nf4", double_quant=True) / "model.safetensors")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs_model = AutoModelForCausalLM.from_pretrained(
        tiny_lm_dir, quantization_config=config, device_map="cpu", dtype=next(context.model.parameters()).dtype
    )
    theirs_model.save_pretrained(tmp_path / "theirs")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_size_on_disk(context, tmp_path):
    """Linear weights shrink to ~4.5 (nf4 + double quant) or ~8 bits; embeddings stay dense."""
    model = context.model
    linear = quantized_modules(model, BitsAndBytesOptions())
    linear_params = sum(m.weight.numel() for m in linear.values())
    other_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in linear
    )
    nf4 = weight_bytes(write(context, tmp_path / "nf4", quant_type="nf4", double_quant=True))
    int8 = weight_bytes(write(context, tmp_path / "int8", quant_type="int8"))
    # what the quantized Linear weights take, headers included
    assert (nf4 - other_bytes) * 8 / linear_params < 4.6
    assert (int8 - other_bytes) * 8 / linear_params < 8.2
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())  # tied lm_head counted once
    assert nf4 < bf16_bytes * 1.7  # the float32 embedding (71% of the parameters) dominates


def test_pruned_weights_stay_zero(context, tmp_path):
    ctx = copy.copy(context)
    ctx.loaded = copy.copy(context.loaded)
    ctx.loaded.model = copy.deepcopy(context.model)
    layer = ctx.model.model.layers[0].mlp.up_proj
    layer.weight.data[:, ::2] = 0
    out = write(ctx, tmp_path / "out", quant_type="nf4")
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    module = reloaded.model.layers[0].mlp.up_proj
    weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.all(weight[:, ::2] == 0)


def test_ignore_keeps_layers_dense(context, tmp_path):
    out = write(context, tmp_path / "out", ignore=["lm_head", "re:.*down_proj$"])
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(reloaded.model.layers[1].mlp.down_proj).__name__ == "Linear"
    assert type(reloaded.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"


def test_options_and_blocksize_errors(context, tmp_path):
    with pytest.raises(ValueError):
        BitsAndBytesOptions(quant_type="int4")
    with pytest.raises(ValueError):
        BitsAndBytesOptions(ignore=["re:("])
    with pytest.raises(UserError, match="blocksize 128 does not divide"):
        write(context, tmp_path / "out", blocksize=128)


def test_recipe_check_refuses_a_quantization_stage(host, write_recipe, tmp_path):
    path = write_recipe(output={"dir": str(tmp_path / "out"), "format": "bitsandbytes", "quant_type": "nf4"})
    with pytest.raises(UserError, match="bitsandbytes"):
        check_recipe(host, path)


def test_apply_without_stages_evaluates_the_written_nf4_checkpoint(host, write_recipe, tmp_path):
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    out = tmp_path / "out"
    path = write_recipe(stages=[], output={"dir": str(out), "format": "bitsandbytes", "quant_type": "nf4"})
    context = apply_recipe(host, check_recipe(host, path))
    evaluation = context.report.evaluation
    assert 0 < evaluation["kl"]["compressed"] < 0.1  # the written nf4 weights, not the in-memory ones
    assert evaluation["perplexity"]["compressed"] != evaluation["perplexity"]["original"]
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["kl"] == evaluation["kl"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
