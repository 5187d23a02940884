"""End-to-end runs on a real two-layer SmolLM2: stages, sequential engine, output round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compress import hookimpl
from compress.engine import apply_recipe
from compress.method import BlockMethod
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST
from tests.models import tiny_vit_config


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
    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
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
    assert stage["kind"] == "data-free" and stage["produces"]["quant"]["bits"] == 4
    assert all(0 < layer["relative_error"] < 0.2 for layer in stage["layers"].values())
    assert report["evaluation"]["perplexity"]["tokens"] == 128
    assert report["evaluation"]["kl"]["compressed"] > 0
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "pipeline_tag: text-generation" in card
    assert "| perplexity |" in card and "method: rtn" in card
    assert "| 1 | rtn | rtn | data-free | 14 |" in card and "base_model_relation: quantized" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["method"] == "rtn"


def test_sequential_and_whole_model_modes_give_identical_weights(host, write_recipe, tmp_path):
    sequential = run(host, write_recipe(evaluate=[], output=None))
    whole = run(host, write_recipe(evaluate=[], output=None, run={"mode": "whole", "device": "cpu"}))
    for (name, a), (_, b) in zip(sequential.model.state_dict().items(), whole.model.state_dict().items()):
        assert torch.equal(a, b), name


class RecordInputs(BlockMethod):
    """Test method: quantizes each block like rtn and records the hidden states it was given."""

    name = "record-inputs"
    seen: ClassVar[dict[int, torch.Tensor]] = {}

    def compress_block(self, context, work):
        from compress.quant import QuantScheme, compute_grid

        RecordInputs.seen[work.index] = torch.stack([args[0][0] for args, _ in work.inputs])
        assert all(p.device == work.device for p in work.block.parameters())
        scheme = QuantScheme(bits=3, group_size=64)
        for module in work.targets.values():
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
    calibration = torch.stack([sample["input_ids"] for sample in context.data("calibration")])
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
    samples = [{"input_ids": ids, "labels": ids} for ids in sequences]
    compare_models(model, model, samples, metrics, torch.device("cpu"), batch_size=2)
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
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    config = tiny_vit_config(
        hidden_size=64, intermediate_size=128, image_size=32, num_labels=10, architectures=["ViTForImageClassification"]
    )
    source = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(source)
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(source),
                "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["classifier"]}],
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    context = run(host, recipe)
    assert context.task == "image-classification"
    assert len(context.report.stages[0].layers) == 2 * 6  # q, k, v, attention output, intermediate, output
    pixels = torch.randn(2, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, context.model(pixel_values=pixels).logits)


def test_capture_onloads_only_the_modules_before_the_first_block(tiny_lm_dir):
    from compress.blocks import capture_block_inputs, find_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    moved = []
    for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"):
        module = model.get_submodule(name)
        original_to = module.to
        module.to = lambda *args, _name=name, _to=original_to, **kwargs: (moved.append(_name), _to(*args, **kwargs))[1]
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, blocks_name, [{"input_ids": torch.arange(16)}], torch.device("cpu"))
    assert len(inputs) == 1 and inputs[0][0][0].shape == (1, 16, 576)
    assert set(moved) == {"model.embed_tokens", "model.rotary_emb"}  # there and back; lm_head never


class RecordStreams(BlockMethod):
    """Test method: records each work's inputs and original inputs, changes nothing."""

    name = "record-streams"
    needs_original_inputs = True
    seen: ClassVar[dict[str, tuple[int, torch.nn.Module, torch.Tensor, torch.Tensor]]] = {}

    def compress_block(self, context, work):
        from compress.blocks import hidden_states

        def stacked(inputs):
            return torch.cat([hidden_states(args, kwargs) for args, kwargs in inputs])

        RecordStreams.seen[work.name] = (work.index, work.block, stacked(work.inputs), stacked(work.original_inputs))
        return {name: {} for name in work.targets}


class QuantizeAndRecordStreams(RecordStreams):
    """Test method: records as record-streams does, then quantizes the blocks' layers at 3 bits (not lm_head)."""

    name = "quantize-record-streams"

    def compress_block(self, context, work):
        from compress.quant import QuantScheme, compute_grid

        reports = super().compress_block(context, work)
        if work.name != "lm_head":
            for module in work.targets.values():
                module.weight.data = compute_grid(module.weight.data, QuantScheme(bits=3, group_size=32)).fake_quantize(
                    module.weight.data
                )
        return reports


class StreamsPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(RecordStreams)
        register(QuantizeAndRecordStreams)


def lm_head_inputs(model, samples) -> torch.Tensor:
    """What ``model.lm_head`` receives on each sample, concatenated."""
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        for sample in samples:
            model(input_ids=sample["input_ids"].unsqueeze(0))
    handle.remove()
    return torch.cat(seen)


def block_inputs(model, samples) -> tuple[torch.Tensor, ...]:
    ids = torch.stack([sample["input_ids"] for sample in samples])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_a_method_that_changes_nothing_sees_two_equal_streams_and_lm_head_last(register_plugin, run_recipe):
    register_plugin(StreamsPlugin, name="streams")
    RecordStreams.seen.clear()
    context = run_recipe({"stages": [{"method": "record-streams", "ignore": []}]}).context
    assert list(RecordStreams.seen) == ["model.layers.0", "model.layers.1", "lm_head"]
    for _index, _block, inputs, original in RecordStreams.seen.values():
        assert torch.equal(inputs, original)
    index, block, inputs, _ = RecordStreams.seen["lm_head"]
    assert index == 2 and block is context.model.lm_head
    assert "lm_head" in context.report.stages[0].layers
    torch.testing.assert_close(inputs, lm_head_inputs(context.model, context.data("calibration")))


def test_after_quantizing_blocks_the_original_stream_is_the_reference_models(register_plugin, run_recipe):
    register_plugin(StreamsPlugin, name="streams")
    RecordStreams.seen.clear()
    context = run_recipe({"stages": [{"method": "quantize-record-streams", "ignore": []}]}).context
    samples = context.data("calibration")
    reference = context.reference_model()
    original_hidden = block_inputs(reference, samples)
    compressed_hidden = block_inputs(context.model, samples)
    for index in (0, 1):
        _, _, inputs, original = RecordStreams.seen[f"model.layers.{index}"]
        torch.testing.assert_close(original, original_hidden[index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(inputs, compressed_hidden[index], rtol=1e-5, atol=1e-6)
    _, _, inputs, original = RecordStreams.seen["model.layers.1"]
    assert not torch.allclose(inputs, original, atol=1e-4)  # block 0 was quantized
    # lm_head: what the compressed blocks feed it, and what the original model fed it
    _, _, inputs, original = RecordStreams.seen["lm_head"]
    torch.testing.assert_close(inputs, lm_head_inputs(context.model, samples), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(original, lm_head_inputs(reference, samples), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(inputs, original, atol=1e-4)


@pytest.mark.parametrize("mode", ["sequential", "whole"])
def test_gptq_compresses_lm_head_after_the_blocks(run_recipe, mode):
    stage = {"method": "gptq", "bits": 4, "group_size": 32, "ignore": []}
    context = run_recipe({"stages": [stage], "run": {"mode": mode, "device": "cpu"}}).context
    layers = context.report.stages[0].layers
    assert len(layers) == 15 and "lm_head" in layers  # 7 projections x 2 blocks, and the head
    report = layers["lm_head"]
    assert report["calibration_tokens"] == 4 * 32
    assert report["objective"] < report["rtn_objective"]
    weight = context.model.lm_head.weight.data
    assert torch.equal(context.layers["lm_head"].quant.fake_quantize(weight), weight)


def test_a_tied_lm_head_is_untied_before_it_is_quantized(run_recipe, tiny_model_dir):
    """The embedding keeps its weights; the written checkpoint reloads untied, with the quantized head."""
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert original.lm_head.weight is original.model.embed_tokens.weight
    stage = {"method": "rtn", "bits": 4, "group_size": 32, "targets": ["lm_head"], "ignore": []}
    result = run_recipe({"stages": [stage], "output": {"dir": "out"}})
    model = result.context.model
    assert result.context.report.stages[0].details["untied"] == ["lm_head"]
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)
    written = AutoModelForCausalLM.from_pretrained(result.output)
    assert written.lm_head.weight is not written.model.embed_tokens.weight
    assert torch.equal(written.lm_head.weight, model.lm_head.weight)
    assert torch.equal(written.model.embed_tokens.weight, original.model.embed_tokens.weight)


def record_streams_without_a_recipe(
    model, targets: list[str], samples: list[dict], method: type[RecordStreams] = RecordStreams
) -> dict:
    """Run ``record-streams`` (or a subclass) on ``targets`` of ``model`` through ``compress_blocks``
    itself; returns the layer reports."""
    import types

    from compress.sequential import compress_blocks

    context = types.SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        sequential=True,
        data=lambda _name: samples,
        host=types.SimpleNamespace(hook=types.SimpleNamespace(compress_block_done=lambda **_: None)),
    )
    run = types.SimpleNamespace(
        method=method(method.Params()),
        targets={name: model.get_submodule(name) for name in targets},
        record=types.SimpleNamespace(layers={}),
        stage=None,
    )
    RecordStreams.seen.clear()
    compress_blocks(context, run, run.method.compress_block)
    return run.record.layers


def test_a_target_the_forward_pass_never_reaches_is_refused_naming_it(tiny_model_dir):
    from compress.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.unused = torch.nn.Linear(64, 64)
    samples = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}]
    with pytest.raises(UserError) as caught:
        record_streams_without_a_recipe(model, ["unused"], samples)
    assert str(caught.value) == "unused: the model's forward pass does not reach this layer; it cannot be calibrated"


def test_a_vit_classifier_gets_the_class_token_after_the_final_norm():
    """The head of an image classifier pools inside the model's forward: the captured input is what it pools."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()
    samples = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.tensor(1)} for _ in range(3)]
    record_streams_without_a_recipe(model, ["classifier"], samples)
    seen = []
    model.classifier.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        model(pixel_values=torch.stack([sample["pixel_values"] for sample in samples]))
    index, block, inputs, original = RecordStreams.seen["classifier"]
    assert index == 2 and block is model.classifier and inputs.shape == (3, 32)
    torch.testing.assert_close(inputs, seen[0])
    torch.testing.assert_close(original, seen[0])


class SpyLoader:
    """A recipe's loader that reads directories and records what it was asked to load."""

    name = "spy"

    def __init__(self, reads_directories: bool) -> None:
        self.reads_directories = reads_directories
        self.loaded: list = []

    def claims(self, spec):
        return self.reads_directories and Path(spec.name).is_dir()

    def load(self, spec):
        self.loaded.append(spec)
        return type("Loaded", (), {"model": torch.nn.Linear(1, 1)})()


def test_a_written_checkpoint_is_read_back_like_the_recipes_model(host, tmp_path):
    from types import SimpleNamespace

    from compress.api import ModelSpec, UserError
    from compress.engine import read_written

    model = ModelSpec(name="team:llama", dtype="bfloat16", trust_remote_code=True, revision="v1")
    context = SimpleNamespace(recipe=SimpleNamespace(model=model), task="causal-lm", host=host)
    context.loader = SpyLoader(reads_directories=True)
    read_written(context, tmp_path)
    (spec,) = context.loader.loaded
    assert (spec.name, spec.dtype, spec.trust_remote_code, spec.revision) == (str(tmp_path), "bfloat16", True, None)
    # a recipe's loader that reads no directories: the host's loaders resolve it (the directory loader here)
    context.loader = SpyLoader(reads_directories=False)
    with pytest.raises(UserError, match="no config.json"):
        read_written(context, tmp_path)
    assert context.loader.loaded == []
