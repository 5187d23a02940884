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


def test_measure_reports_eager_and_graph_timings_per_shape_and_end_to_end(sparse_checkpoint, monkeypatch):
    """The bookkeeping of ``measure`` on the CPU: the kernels and CUDA events replaced by stand-ins
    (dense calls take 2 s eager and 1 s replayed, sparse ones 4 s and 0.5 s)."""
    from transformers import AutoModelForCausalLM

    from compress_nm import semi_structured

    converted = []

    def fake_seconds(function, reps, graph=False):
        function()
        return (0.5 if graph else 4.0) if converted else (1.0 if graph else 2.0)

    def fake_convert(model, names):
        converted.extend(names)

    monkeypatch.setattr(semi_structured, "cuda_seconds", fake_seconds)
    monkeypatch.setattr(semi_structured, "to_semi_structured", fake_convert)
    monkeypatch.setattr(semi_structured, "cusparselt_search", lambda x, weight: 5 if x.shape[0] == 8 else None)
    directory, marked = sparse_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    result = semi_structured.measure(model, marked, tokens=8, reps=1, backend="cusparselt")
    assert converted == marked
    assert set(result["cusparselt_algorithms"].values()) == {5}  # each shape tuned on 8 rows
    assert all(model.get_submodule(name).weight.alg_id_cusparselt == 5 for name in marked)
    assert sum(row["layers"] for row in result["per_shape"]) == len(marked) == result["layers"]
    for row in result["per_shape"]:
        assert (row["dense_ms"], row["sparse_ms"], row["speedup"]) == (2000.0, 4000.0, 0.5)
        assert (row["dense_graph_ms"], row["sparse_graph_ms"], row["speedup_graph"]) == (1000.0, 500.0, 2.0)
    assert result["linear_dense_ms"] == 2000.0 * len(marked)
    assert (result["linear_speedup"], result["linear_graph_speedup"]) == (0.5, 2.0)
    assert (result["prefill_speedup"], result["prefill_graph_speedup"]) == (0.5, 2.0)
    lines = semi_structured.report_lines(result)
    assert lines[-2].startswith(f"linear layers: eager {2000 * len(marked):.2f} ms dense") and lines[-2].endswith(
        "2.00x"
    )
    assert "prefill end to end" in lines[-1]


def test_a_failed_graph_capture_keeps_the_eager_figures_and_says_why(monkeypatch):
    from compress_nm import semi_structured

    def fake_seconds(function, reps, graph=False):
        if graph:
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        return 1.0

    monkeypatch.setattr(semi_structured, "cuda_seconds", fake_seconds)
    timing = semi_structured.both_seconds(lambda: None, 1)
    assert timing == {"eager": 1.0, "graph": None, "graph_error": "operation not permitted when stream is capturing"}


def test_a_torch_without_cusparselt_is_told_to_use_cutlass(monkeypatch):
    from compress_nm.semi_structured import backend_problem

    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert backend_problem("cusparselt") == "this torch is built without cuSPARSELt (use --backend cutlass)"
    assert backend_problem("cutlass") is None
