"""Sparsity metadata: N:M patterns recorded in checkpoints, verified, and loaded as sparse kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from compress import hookimpl
from compress.checkpoint import WriterCapabilities, WriterOptions
from compress.checkpoint.sparse import semi_structured_layers, to_semi_structured, verify_n_m
from compress.context import Context
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.method import LayerMethod, MethodParams, Produces
from compress.validate import check_recipe

pytest.importorskip("compressed_tensors")

MLP = "re:.*(gate|up|down)_proj$"


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """A real 2:4 magnitude mask: the two smallest |w| of every 4 consecutive inputs set to 0."""
    rows, columns = weight.shape
    groups = weight.detach().reshape(rows, columns // 4, 4)
    smallest = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, smallest, 0.0).reshape(rows, columns)


class Prune24(LayerMethod):
    """Test method: 2:4 magnitude pruning; keeps an earlier stage's state (grid) and adds the pattern."""

    name = "test_prune_2_4"
    Params = MethodParams

    def produces(self) -> Produces:
        return Produces(sparsity="2:4")

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        module.weight.data = prune_2_4(module.weight.data)
        context.update_layer(name, method=self.name, sparsity="2:4")
        return {}


class Prune24Plugin:
    @hookimpl
    def compress_register_methods(register):
        register(Prune24)


class NoSparsityWriter:
    """Test format that cannot record sparsity."""

    name = "test-no-sparsity"
    Options = WriterOptions
    capabilities = WriterCapabilities(sparsity=False)
    requantizes = False

    def write(self, context, directory, options):
        raise AssertionError("never reached")


class NoSparsityPlugin:
    @hookimpl
    def compress_register_writers(register):
        register(NoSparsityWriter())


@pytest.fixture
def sparse_host(host):
    host.register(Prune24Plugin, name="test-prune")
    return host


def run(host, write_recipe, tmp_path, stages, fmt):
    out = tmp_path / "out"
    recipe = write_recipe(stages=stages, evaluate=[], output={"dir": str(out), "format": fmt})
    return apply_recipe(host, check_recipe(host, recipe)), out


def quantization_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def mlp_names(context) -> list[str]:
    return sorted(n for n, m in context.model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj")))


def assert_library_parses(out: Path, context) -> None:
    from compressed_tensors.config import DenseSparsityConfig, SparsityCompressionConfig, SparsityStructure

    raw = quantization_config(out)["sparsity_config"]
    parsed = SparsityCompressionConfig.load_from_registry(raw["format"], **raw)
    assert isinstance(parsed, DenseSparsityConfig)
    assert SparsityStructure(parsed.sparsity_structure) == SparsityStructure.TWO_FOUR
    assert sorted(parsed.targets) == mlp_names(context)
    zeros = sum(int((p == 0).sum()) for p in context.model.parameters())
    total = sum(p.numel() for p in context.model.parameters())
    assert parsed.global_sparsity == pytest.approx(zeros / total)
    assert 0.05 < parsed.global_sparsity < 0.5  # half of the MLP weights, over all parameters (embeddings too)


def assert_zeros_survive(context, out: Path) -> AutoModelForCausalLM:
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = context.data("evaluation")[0]["input_ids"].unsqueeze(0)
    with torch.no_grad():  # the first forward decompresses packed layers
        assert torch.equal(reloaded(input_ids=ids).logits, context.model(input_ids=ids).logits)
    modules = dict(reloaded.named_modules())
    for name in mlp_names(context):
        weight = modules[name].weight
        assert torch.equal(weight, dict(context.model.named_modules())[name].weight), name
        verify_n_m(weight, 2, 4, name)
        assert (weight == 0).float().mean().item() >= 0.5
    return reloaded


def test_dense_writer_records_sparsity_config(sparse_host, write_recipe, tmp_path):
    context, out = run(sparse_host, write_recipe, tmp_path, [{"method": "test_prune_2_4", "targets": [MLP]}], "dense")
    config = quantization_config(out)
    assert config["quant_method"] == "compressed-tensors"
    assert "config_groups" not in config  # dense weights: nothing for transformers to quantize
    assert config["sparsity_config"]["format"] == "dense"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert_library_parses(out, context)
    assert semi_structured_layers(out) == mlp_names(context)
    reloaded = assert_zeros_survive(context, out)
    # a plain dense model: no compressed-tensors layout, nothing quantized
    assert all(type(m) in (nn.Linear,) or not isinstance(m, nn.Linear) for m in reloaded.modules())
    assert not any(hasattr(m, "quantization_scheme") for m in reloaded.modules())


def test_compressed_tensors_writer_records_sparsity_with_quantization(sparse_host, write_recipe, tmp_path):
    # RTN first, then 2:4 pruning: a zero is on every symmetric grid (code 0), so the pruned
    # weights still lie on the grids the writer packs, and the state keeps both.
    stages = [
        {"method": "rtn", "targets": [MLP], "bits": 4, "group_size": 64},
        {"method": "test_prune_2_4", "targets": [MLP]},
    ]
    context, out = run(sparse_host, write_recipe, tmp_path, stages, "compressed-tensors")
    config = quantization_config(out)
    assert config["format"] == "pack-quantized"
    assert list(config["config_groups"]) == ["group_0"]
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert_library_parses(out, context)
    assert semi_structured_layers(out) == mlp_names(context)  # found through weight_packed names
    assert_zeros_survive(context, out)


def test_compressed_tensors_writer_sparsity_only(sparse_host, write_recipe, tmp_path):
    context, out = run(
        sparse_host, write_recipe, tmp_path, [{"method": "test_prune_2_4", "targets": [MLP]}], "compressed-tensors"
    )
    config = quantization_config(out)
    assert config["config_groups"] == {}
    assert_library_parses(out, context)
    assert semi_structured_layers(out) == mlp_names(context)
    assert_zeros_survive(context, out)


def test_no_sparsity_no_sparsity_config(host, write_recipe, tmp_path):
    _context, out = run(host, write_recipe, tmp_path, [{"method": "rtn", "bits": 4, "group_size": 64}], "dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert semi_structured_layers(out) == []


def test_writer_refuses_weights_that_lost_the_pattern(sparse_host, write_recipe, tmp_path):
    class Refill(LayerMethod):
        """Test method: fills the zeros back in and keeps the recorded pattern."""

        name = "test_refill"
        Params = MethodParams
        keeps_zeros = True  # a false claim: recipe check lets it through, the writer must still catch it

        def compress_layer(self, context, name, module):
            module.weight.data = module.weight.data + 1e-3
            return {}

    class RefillPlugin:
        @hookimpl
        def compress_register_methods(register):
            register(Refill)

    sparse_host.register(RefillPlugin, name="test-refill")
    stages = [{"method": "test_prune_2_4", "targets": [MLP]}, {"method": "test_refill", "targets": [MLP]}]
    with pytest.raises(UserError, match=r"not 2:4 sparse: row 0, group 0"):
        run(sparse_host, write_recipe, tmp_path, stages, "dense")
    assert not (tmp_path / "out").exists()


def test_verify_n_m_accepts_pruned_smollm2_weights(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert len(linears) == 14
    for name, module in linears.items():
        with pytest.raises(UserError, match="not 2:4 sparse"):
            verify_n_m(module.weight, 2, 4, name)  # the pretrained weights are dense
        pruned = prune_2_4(module.weight)
        verify_n_m(pruned, 2, 4, name)
        assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        verify_n_m(pruned, 4, 8, name)  # 2:4 implies 4:8


def test_verify_n_m_names_row_and_group_of_one_bad_group(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    weight = prune_2_4(model.model.layers[0].mlp.down_proj.weight)
    group = weight[37, 4 * 11 : 4 * 12]
    group[group == 0] = 0.5  # row 37, group 11 now has 4 nonzeros
    with pytest.raises(UserError) as error:
        verify_n_m(weight, 2, 4, "model.layers.0.mlp.down_proj")
    message = str(error.value)
    assert message.startswith("model.layers.0.mlp.down_proj: not 2:4 sparse")
    assert "row 37, group 11 (input columns 44-47) has 4 nonzeros" in message
    assert "1 of" in message


def test_verify_n_m_shape_errors():
    with pytest.raises(UserError, match="not a multiple of M=4"):
        verify_n_m(torch.zeros(8, 6), 2, 4, "odd")
    with pytest.raises(UserError, match="2-D weight"):
        verify_n_m(torch.zeros(8), 2, 4, "flat")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_to_semi_structured_on_cpu_verifies_then_refuses(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16)
    names = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    # not pruned: the verification runs first and names the layer
    with pytest.raises(UserError, match=r"model.layers.0.mlp.gate_proj: not 2:4 sparse: row 0, group \d+"):
        to_semi_structured(model, names)
    for name in names:
        module = model.get_submodule(name)
        module.weight.data = prune_2_4(module.weight.data)
    with pytest.raises(UserError, match=r"need a CUDA GPU of compute capability 8\.0\+; 6 layers are on cpu"):
        to_semi_structured(model, names)
    assert all(type(model.get_submodule(n).weight) is nn.Parameter for n in names)  # left as it was


def test_to_semi_structured_rejects_non_linear(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(UserError, match="Linear layers, not Embedding"):
        to_semi_structured(model, ["model.embed_tokens"])
    with pytest.raises(UserError, match="no such layer"):
        to_semi_structured(model, ["model.layers.9.mlp.up_proj"])


def test_semi_structured_layers_reads_targets_and_ignore(tmp_path, tiny_lm_dir):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(tiny_lm_dir, out)
    config = json.loads((out / "config.json").read_text())
    sparsity = {
        "format": "dense",
        "sparsity_structure": "2:4",
        "global_sparsity": 0.3,
        "targets": ["re:.*mlp\\.(up|down)_proj$"],
        "ignore": ["model.layers.1.mlp.down_proj"],
    }
    config["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": sparsity}
    (out / "config.json").write_text(json.dumps(config))
    assert semi_structured_layers(out) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
    ]
    sparsity.update(targets=["Linear"], ignore=["lm_head"])  # llm-compressor style
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'Linear' is a class name"):
        semi_structured_layers(out)
    sparsity["sparsity_structure"] = "unstructured"
    (out / "config.json").write_text(json.dumps(config))
    assert semi_structured_layers(out) == []


def test_recipe_check_refuses_2_4_for_a_format_without_sparsity(sparse_host, write_recipe, tmp_path):
    sparse_host.register(NoSparsityPlugin, name="test-no-sparsity")
    recipe = write_recipe(
        stages=[{"method": "test_prune_2_4", "targets": [MLP]}],
        evaluate=[],
        output={"dir": str(tmp_path / "out"), "format": "test-no-sparsity"},
    )
    with pytest.raises(
        UserError, match=r"'test-no-sparsity' cannot record 2:4 sparsity, but stage 1 \(test_prune_2_4\)"
    ):
        check_recipe(sparse_host, recipe)
    for fmt in ("dense", "compressed-tensors"):
        recipe = write_recipe(
            stages=[{"method": "test_prune_2_4"}], evaluate=[], output={"dir": str(tmp_path / "o"), "format": fmt}
        )
        check_recipe(sparse_host, recipe)


def test_quantizing_after_pruning_keeps_the_pattern_and_its_record(host, write_recipe):
    from compress.checkpoint.sparse import verify_n_m
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    host.register(Prune24Plugin, name="prune")
    stages = [{"method": "test_prune_2_4"}, {"method": "rtn", "bits": 4, "group_size": 64}]
    context = apply_recipe(host, check_recipe(host, write_recipe(stages=stages, evaluate=[], output=None)))
    modules = dict(context.model.named_modules())
    for name, state in context.layers.items():
        assert state.method == "rtn" and state.sparsity == "2:4" and state.quant is not None
        verify_n_m(modules[name].weight.data, 2, 4, name)  # symmetric grids keep zeros exact
