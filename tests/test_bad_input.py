"""Bad input that needs a patched engine or writer to provoke: an interrupt mid-write, a format
that cannot hold a method's output, weights that must not be read before the recipe is valid.
The plain bad inputs are cases of the fault corpus (``tests/faults/``)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

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
