"""The 2:4 speed path's CPU-testable parts: layer selection, pattern verification, the refusals."""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner

from compress.checkpoint.sparse import sparsity_config, write_sparsity_config
from compress.context import LayerState
from compress.errors import UserError
from compress_nm.commands import add_commands
from compress_nm.patterns import NMPattern, nm_keep_mask
from compress_nm.semi_structured import accelerator_problem, select_layers, verify_layers

MLP = "re:.*mlp.*_proj$"


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with its MLP layers pruned 2:4 and marked so in sparsity_config."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-2of4")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if "mlp" in name and isinstance(module, torch.nn.Linear):
                module.weight.mul_(nm_keep_mask(module.weight.abs(), NMPattern(2, 4)))
                layers[name] = LayerState(method="test", sparsity="2:4")
    model.save_pretrained(directory)
    write_sparsity_config(directory, sparsity_config(model, layers))
    return directory, sorted(layers)


def refusal(*args: str) -> str:
    """Run the command, check it exits 2 with one error line last on stderr, return that line."""
    group = click.Group()
    add_commands(group)
    result = CliRunner().invoke(group, ["semi-structured", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert not result.stdout
    return lines[-1]


def test_selection_defaults_to_the_marked_layers_and_resolves_patterns(sparse_checkpoint):
    from transformers import AutoModelForCausalLM

    directory, marked = sparse_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert select_layers(model, marked, []) == marked
    assert sorted(select_layers(model, marked, [MLP])) == marked
    assert select_layers(model, [], ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(UserError, match="matches no Linear layer") as error:
        select_layers(model, marked, ["model.layers.0.mlp.upp_proj"])
    assert "upp_proj" in str(error.value)
    with pytest.raises(UserError, match="marks no layer 2:4"):
        select_layers(model, [], [])


def test_a_broken_group_is_named(sparse_checkpoint):
    from transformers import AutoModelForCausalLM

    directory, marked = sparse_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory)
    verify_layers(model, marked)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 4:8] = 1.0
    with pytest.raises(UserError, match="not 2:4 sparse: row 3, group 1") as error:
        verify_layers(model, marked)
    assert "model.layers.1.mlp.down_proj" in str(error.value)


def test_cpu_is_refused_in_one_line_after_verifying(sparse_checkpoint):
    directory, marked = sparse_checkpoint
    line = refusal(str(directory), "--device", "cpu")
    assert "need a CUDA GPU of compute capability 8.0+, not cpu" in line
    assert f"{len(marked)} layers verified 2:4, nothing timed" in line
    assert accelerator_problem(torch.device("cpu")) in line


def test_broken_pattern_in_a_checkpoint_exits_2_naming_the_layer(sparse_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = sparse_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"][0, :4] = 1.0
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    line = refusal(str(broken), "--device", "cpu")
    assert line.startswith("error: model.layers.0.mlp.gate_proj: not 2:4 sparse: row 0, group 0")


def test_a_layer_the_user_names_must_hold_the_pattern(sparse_checkpoint):
    directory, _ = sparse_checkpoint
    line = refusal(str(directory), "--device", "cpu", "--layer", "model.layers.0.self_attn.q_proj")
    assert line.startswith("error: model.layers.0.self_attn.q_proj: not 2:4 sparse")
