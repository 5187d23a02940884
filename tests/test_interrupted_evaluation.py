"""An interrupt during the evaluation keeps the checkpoint written before it; one during the
write leaves nothing. In-process, on the tiny random model, with a metric or writer that
raises the interrupt itself (tests/faults/cases_signals_evaluation.py sends real signals)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from compress import hookimpl
from compress.cli import Terminated, main
from compress.errors import OutputKept
from compress.evaluate import Metric

INTERRUPT: dict[str, type[BaseException]] = {"raise": KeyboardInterrupt}


class Interrupting(Metric):
    """Raises the interrupt in ``INTERRUPT`` at its first batch, as Ctrl-C would."""

    name = "interrupting"
    tasks = frozenset({"causal-lm"})

    def update(self, original, compressed, batch) -> None:
        raise INTERRUPT["raise"]

    def result(self) -> dict[str, float]:
        raise AssertionError("never reached")


@hookimpl
def compress_register_metrics(register):
    register(Interrupting)


def recipe(
    directory: Path, model: Path, text: Path, output_format: str = "compressed-tensors", metric: str = "interrupting"
) -> Path:
    data = {"path": str(text), "samples": 2, "seq_len": 32}
    path = directory / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "data": {"evaluation": data},
                "stages": [{"method": "rtn", "bits": 4, "group_size": 32}],
                "output": {"dir": str(directory / "out"), "format": output_format, "dtype": "bfloat16"},
                "evaluate": ["perplexity", metric],
            }
        )
    )
    return path


def apply(monkeypatch: pytest.MonkeyPatch, recipe_file: Path) -> int:
    monkeypatch.setattr(sys, "argv", ["compress", "apply", str(recipe_file)])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


@pytest.fixture
def interrupting(register_plugin, monkeypatch):
    register_plugin(sys.modules[__name__], name="interrupting")
    monkeypatch.setitem(INTERRUPT, "raise", KeyboardInterrupt)


def test_ctrl_c_in_evaluation_keeps_the_written_output(
    interrupting, monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_text_file
):
    assert apply(monkeypatch, recipe(tmp_path, tiny_model_dir, tiny_text_file)) == 130
    out = tmp_path / "out"
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"interrupted by SIGINT during evaluation: the output is complete, without evaluation results: {out}"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["phases"]["evaluation"]["interrupted"] is True and report["evaluation"] == {}
    assert "The evaluation was interrupted before it finished" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".out")]  # no staging, no lock


def test_sigterm_in_evaluation_keeps_it_too_and_exits_143(
    interrupting, monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_text_file
):
    monkeypatch.setitem(INTERRUPT, "raise", Terminated)
    assert apply(monkeypatch, recipe(tmp_path, tiny_model_dir, tiny_text_file, "dense")) == 143
    assert "interrupted by SIGTERM during evaluation: the output is complete" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_run_raises_output_kept_from_the_interrupt(
    interrupting, compress_host, tmp_path, tiny_model_dir, tiny_text_file
):
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    checked = check_recipe(compress_host, recipe(tmp_path, tiny_model_dir, tiny_text_file))
    with pytest.raises(OutputKept) as kept:
        apply_recipe(compress_host, checked)
    assert type(kept.value.__cause__) is KeyboardInterrupt


def test_ctrl_c_in_the_write_leaves_nothing(
    compress_host, monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_text_file
):
    writer = compress_host.writers()["compressed-tensors"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(writer), "write", interrupted)
    assert apply(monkeypatch, recipe(tmp_path, tiny_model_dir, tiny_text_file, metric="kl")) == 130
    assert "interrupted by SIGINT: no output was written" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"]
