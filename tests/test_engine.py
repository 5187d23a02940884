"""End-to-end runs on a real two-layer SmolLM2: stages, sequential engine, output round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compress import hookimpl
from compress.engine import apply_recipe
from compress.method import BlockMethod
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST


def run(host, path: Path):
    return apply_recipe(host, check_recipe(host, path))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_output_reloads_with_transformers_and_gives_the_same_logits(host, write_recipe, tmp_path):
    context = run(host, write_recipe(output={"dir": str(tmp_path / "out"), "max_shard_size": "20MB"}))
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "recipe.yaml", "report.json", "README.md"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = context.data("evaluation")[0].unsqueeze(0)
    assert torch.equal(logits(reloaded, ids), logits(context.model, ids))


def test_every_targeted_weight_lies_on_its_recorded_grid(host, write_recipe):
    context = run(host, write_recipe(evaluate=[]))
    modules = dict(context.model.named_modules())
    targeted = context.report.stages[0].layers
    assert len(targeted) == 14  # 7 projections x 2 layers, lm_head ignored by default
    for name in targeted:
        weight = modules[name].weight.data
        grid = context.layers[name].quant
        assert torch.equal(grid.fake_quantize(weight), weight), name
        codes_per_group = grid.quantize(weight).view(weight.shape[0], -1, 64)
        assert all(len(torch.unique(group)) <= 16 for group in codes_per_group.flatten(0, 1))


def test_report_and_model_card(host, write_recipe, tmp_path):
    run(host, write_recipe())
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["method"] == "rtn" and stage["seconds"] > 0 and stage["peak_host_bytes"] > 0
    assert all(0 < layer["relative_error"] < 0.2 for layer in stage["layers"].values())
    assert report["evaluation"]["perplexity"]["tokens"] == 128
    assert report["evaluation"]["kl"]["compressed"] > 0
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "pipeline_tag: text-generation" in card
    assert "| perplexity |" in card and "method: rtn" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["method"] == "rtn"


def test_sequential_and_whole_model_modes_give_identical_weights(host, write_recipe, tmp_path):
    sequential = run(host, write_recipe(evaluate=[], output=None))
    whole = run(host, write_recipe(evaluate=[], output=None, run={"mode": "whole", "device": "cpu"}))
    for (name, a), (_, b) in zip(sequential.model.state_dict().items(), whole.model.state_dict().items()):
        assert torch.equal(a, b), name


class RecordInputs(BlockMethod):
    """Test method: quantizes each block like rtn and records the hidden states it was given."""

    name = "record-inputs"
    seen: dict[int, torch.Tensor] = {}

    def compress_block(self, context, work):
        from compress.quant import QuantScheme, compute_grid

        RecordInputs.seen[work.index] = torch.stack([args[0][0] for args, _ in work.inputs])
        assert all(p.device == work.device for p in work.block.parameters())
        scheme = QuantScheme(bits=3, group_size=64)
        for name, module in work.targets.items():
            module.weight.data = compute_grid(module.weight.data, scheme).fake_quantize(module.weight.data)
        return {name: {} for name in work.targets}


class RecordPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(RecordInputs)


def test_each_block_sees_the_outputs_of_the_compressed_blocks_before_it(host, write_recipe):
    host.register(RecordPlugin, name="record")
    context = run(host, write_recipe(stages=[{"method": "record-inputs"}], evaluate=[], output=None))
    calibration = torch.stack(context.data("calibration"))
    with torch.no_grad():
        hidden = context.model(input_ids=calibration, output_hidden_states=True).hidden_states
    assert set(RecordInputs.seen) == {0, 1}
    for index, seen in RecordInputs.seen.items():
        torch.testing.assert_close(seen, hidden[index], rtol=1e-5, atol=1e-5)
    # block 1 saw the compressed block 0: its input differs from the original model's
    original = context.reference_model()
    with torch.no_grad():
        original_hidden = original(input_ids=calibration, output_hidden_states=True).hidden_states
    assert not torch.allclose(RecordInputs.seen[1], original_hidden[1], atol=1e-4)


def test_perplexity_matches_transformers_loss_and_identical_models_agree(host, tiny_lm_dir):
    from compress.evaluate import KLDivergence, Perplexity, Top1Agreement, compare_models

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    sequences = [torch.randint(0, 49152, (32,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    metrics = [Perplexity(), KLDivergence(), Top1Agreement()]
    compare_models(model, model, sequences, metrics, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        ids = torch.stack(sequences)
        loss = model(input_ids=ids, labels=ids).loss.item()
    perplexity, kl, top1 = (metric.result() for metric in metrics)
    assert perplexity["original"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert perplexity["compressed"] == perplexity["original"]
    assert kl["compressed"] == pytest.approx(0.0, abs=1e-6)
    assert top1["compressed"] == 1.0


def test_encoder_embedding_cosine(host, minilm_dir, tmp_path):
    recipe = {
        "model": "all-minilm-l6-v2",
        "data": {"evaluation": {"path": str(WIKITEXT_TEST), "samples": 4, "seq_len": 64}},
        "stages": [{"method": "rtn", "bits": 3, "group_size": 32, "ignore": []}],
        "evaluate": ["cosine"],
    }
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    context = run(host, path)
    cosine = context.report.evaluation["cosine"]["compressed"]
    assert context.task == "encoder"
    assert 0.5 < cosine < 0.9999


def test_image_classifier_data_free_round_trip(host, tmp_path):
    """A ViT classifier (random weights: only the engine and IO paths are under test here)."""
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10, architectures=["ViTForImageClassification"],
    )
    source = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(source)
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(source),
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["classifier"]}],
        "output": {"dir": str(tmp_path / "out")},
    }))
    context = run(host, recipe)
    assert context.task == "image-classification"
    assert len(context.report.stages[0].layers) == 2 * 6  # q, k, v, attention output, intermediate, output
    pixels = torch.randn(2, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, context.model(pixel_values=pixels).logits)


def test_capture_onloads_only_the_modules_before_the_first_block(tiny_lm_dir):
    from compress.sequential import capture_block_inputs, find_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    moved = []
    for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"):
        module = model.get_submodule(name)
        original_to = module.to
        module.to = lambda *args, _name=name, _to=original_to, **kwargs: (moved.append(_name), _to(*args, **kwargs))[1]
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, blocks_name, [torch.arange(16)], torch.device("cpu"))
    assert len(inputs) == 1 and inputs[0][0][0].shape == (1, 16, 576)
    assert set(moved) == {"model.embed_tokens", "model.rotary_emb"}  # there and back; lm_head never
