"""Every bad input gets one clear line naming the problem and where, exit 2, nothing written."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from compress.cli import cli


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result, pattern: str, output_dir: Path | None = None) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    if output_dir is not None:
        assert not output_dir.exists()
        assert not list(output_dir.parent.glob(f".{output_dir.name}.partial-*"))
    return lines[0]


def recipe_text(model: Path, out: Path, stage: str, extra: str = "") -> str:
    return f"model: {model}\nstages:\n{stage}output: {{dir: {out}}}\n{extra}"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_unknown_key_names_file_line_and_column(write_recipe, tiny_lm_dir, out):
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: 4\n    group_sise: 64\n"))
    line = assert_user_error(run_cli("apply", str(path)), r"unknown key 'group_sise'", out)
    assert f"{path}:5:5:" in line


def test_wrong_type(write_recipe, tiny_lm_dir, out):
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: four\n"))
    line = assert_user_error(run_cli("apply", str(path)), r"stages\.0\.bits: .*integer", out)
    assert f"{path}:4:11:" in line


def test_unknown_method_suggests_the_closest(write_recipe, tiny_lm_dir, out):
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rnt\n    bits: 4\n"))
    line = assert_user_error(run_cli("apply", str(path)), r"unknown method 'rnt' \(did you mean 'rtn'\?\)", out)
    assert f"{path}:3:13:" in line


def test_target_regex_matching_nothing(write_recipe, tiny_lm_dir, out):
    stage = '  - method: rtn\n    bits: 4\n    group_size: 64\n    targets: ["re:.*qkv_proj$"]\n'
    path = write_recipe(recipe_text(tiny_lm_dir, out, stage))
    line = assert_user_error(run_cli("recipe", "check", str(path)), r"target 're:\.\*qkv_proj\$' matches no module")
    assert f"{path}:6:15:" in line


def test_invalid_regex(write_recipe, tiny_lm_dir, out):
    stage = '  - method: rtn\n    bits: 4\n    targets: ["re:(unclosed"]\n'
    path = write_recipe(recipe_text(tiny_lm_dir, out, stage))
    assert_user_error(run_cli("recipe", "check", str(path)), r"invalid regular expression")


def test_group_size_that_does_not_divide_names_the_layer(write_recipe, tiny_lm_dir, out):
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: 4\n    group_size: 128\n"))
    assert_user_error(
        run_cli("apply", str(path)),
        r"model\.layers\.0\.self_attn\.q_proj: group_size 128 does not divide the input width 576",
        out,
    )


def test_missing_model(write_recipe, tmp_path, out):
    path = write_recipe(recipe_text(tmp_path / "no-such-model", out, "  - method: rtn\n    bits: 4\n"))
    assert_user_error(run_cli("apply", str(path)), r"1:8: model .*no-such-model.*not a built-in model name", out)


def test_missing_data_file(write_recipe, tiny_lm_dir, tmp_path, out):
    extra = f"data:\n  evaluation: {{path: {tmp_path / 'missing.txt'}}}\nevaluate: [perplexity]\n"
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: 4\n    group_size: 64\n", extra))
    assert_user_error(run_cli("apply", str(path)), r"data file not found: .*missing\.txt", out)


def test_missing_recipe_file(tmp_path):
    assert_user_error(run_cli("apply", str(tmp_path / "nope.yaml")), r"nope\.yaml: recipe file not found")


def test_invalid_yaml(write_recipe):
    path = write_recipe("model: [unclosed\nstages: []\n")
    assert_user_error(run_cli("recipe", "check", str(path)), r"invalid YAML")


def test_duplicate_key(write_recipe, tiny_lm_dir, out):
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: 4\n    bits: 3\n"))
    assert_user_error(run_cli("recipe", "check", str(path)), r":5:5: duplicate key 'bits'")


def test_output_directory_exists(write_recipe, out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_recipe()
    assert_user_error(run_cli("apply", str(path)), r"output directory .* exists \(pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_safetensors(tiny_lm_dir, tmp_path, write_recipe, out):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for file in tiny_lm_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    path = write_recipe(recipe_text(broken, out, "  - method: rtn\n    bits: 4\n    group_size: 64\n"))
    assert_user_error(run_cli("apply", str(path)), r"corrupt safetensors file", out)


def test_nan_weights_name_the_layer(tiny_lm_dir, tmp_path, write_recipe, out):
    poisoned = tmp_path / "nan-model"
    poisoned.mkdir()
    for file in tiny_lm_dir.iterdir():
        (poisoned / file.name).write_bytes(file.read_bytes())
    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    path = write_recipe(recipe_text(poisoned, out, "  - method: rtn\n    bits: 4\n    group_size: 64\n"))
    assert_user_error(run_cli("apply", str(path)), r"model\.layers\.1\.mlp\.up_proj: weights contain NaN or inf", out)


def test_interrupt_during_write_leaves_nothing(write_recipe, out, monkeypatch):
    from compress.checkpoint.output import DenseWriter

    write = DenseWriter.write

    def write_then_interrupt(self, context, directory, options):
        write(self, context, directory, options)
        assert any(directory.iterdir())  # the shards are half of the output
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(DenseWriter, "write", write_then_interrupt)
    result = run_cli("apply", str(write_recipe(evaluate=[])))
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert not out.exists()
    assert not list(out.parent.glob(".out.*"))


def test_overwrite_replaces_only_when_complete(write_recipe, out):
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run_cli("apply", str(write_recipe(evaluate=[])), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists()
    assert (out / "report.json").is_file()


def test_unknown_writer_option(write_recipe, tmp_path, out):
    path = write_recipe(output={"dir": str(out), "shard": "1GB"})
    assert_user_error(run_cli("recipe", "check", str(path)), r"unknown key 'shard'")


def test_unknown_method_in_methods_command():
    assert_user_error(run_cli("methods", "rtm"), r"unknown method 'rtm' \(did you mean 'rtn'\?\)")


def test_nothing_is_loaded_before_validation(write_recipe, tiny_lm_dir, out, monkeypatch):
    from compress.checkpoint.loaders import DirectoryLoader

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read before the recipe was valid")

    monkeypatch.setattr(DirectoryLoader, "load", refuse)
    path = write_recipe(recipe_text(tiny_lm_dir, out, "  - method: rtn\n    bits: 9\n"))
    assert_user_error(run_cli("apply", str(path)), r"stages\.0\.bits: .*less than or equal to 8", out)
    assert torch.is_grad_enabled()


def test_format_that_cannot_hold_the_methods_output_fails_at_check(write_recipe, out, host, monkeypatch):
    from compress.checkpoint import WriterCapabilities
    from compress.checkpoint.output import DenseWriter

    monkeypatch.setattr(DenseWriter, "capabilities", WriterCapabilities(weight_bits=frozenset({4, 8})))
    path = write_recipe(stages=[{"method": "rtn", "bits": 3, "group_size": 64}])
    assert_user_error(
        run_cli("recipe", "check", str(path)),
        r"output format 'dense' cannot store 3-bit weight grids \(it stores: 4, 8\), but stage 1 \(rtn\) produces it",
    )


def test_capabilities_refusals():
    from compress.checkpoint import WriterCapabilities
    from compress.method import Produces
    from compress.quant import QuantScheme

    group_only = WriterCapabilities(granularities=frozenset({"group"}), symmetric_only=True)
    assert "per-channel" in group_only.refusal(Produces(quant=QuantScheme(bits=4, granularity="channel")))
    assert "symmetric" in group_only.refusal(Produces(quant=QuantScheme(bits=4, symmetric=False)))
    assert group_only.refusal(Produces(quant=QuantScheme(bits=4))) is None
    assert "2:4" in group_only.refusal(Produces(sparsity="2:4"))
    assert "activation" in group_only.refusal(Produces(activation_bits=8))
    assert WriterCapabilities(weight_bits=frozenset()).refusal(Produces()) is None
    assert "outlier" in WriterCapabilities().refusal(Produces(quant=QuantScheme(bits=4), outliers=True))
    assert WriterCapabilities(outliers=True).refusal(Produces(quant=QuantScheme(bits=4), outliers=True)) is None
