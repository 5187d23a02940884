"""The Python API: ``compress.apply`` runs what ``compress apply`` runs and returns the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import compress
from compress.errors import UserError
from compress.recipe import Recipe
from compress.runner import plain


@pytest.fixture
def recipe(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path, host) -> dict:
    data = {"path": tiny_text_file, "samples": 2, "seq_len": 32}
    return {
        "model": tiny_model_dir,
        "data": {"calibration": data, "evaluation": data},
        "stages": [{"method": "rtn", "name": "quantize", "scheme": "W4A16", "group_size": 32}],
        "output": {"dir": tmp_path / "out", "format": "compressed-tensors"},
        "evaluate": ["perplexity"],
    }


def test_importing_compress_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, compress; print(sorted(m for m in ('torch', 'transformers', 'yaml') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_apply_a_mapping_returns_the_report_it_writes(recipe: dict, tmp_path: Path) -> None:
    report = compress.apply(recipe, overrides=["stages.quantize.bits=3"])
    assert report.stages[0].params["bits"] == 3 and report.stages[0].params["group_size"] == 32
    assert report.evaluation["perplexity"]["compressed"] > 0
    assert report.recipe == {"source": "<mapping>", "overrides": ["--set stages.quantize.bits=3"]}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report.to_json()))
    written = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert written["stages"][0] == {"method": "rtn", "name": "quantize", "scheme": "W4A16", "group_size": 32, "bits": 3}


def test_apply_a_file_or_a_recipe_object(recipe: dict, tmp_path: Path) -> None:
    recipe["evaluate"] = []
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(plain(recipe)))
    assert compress.apply(str(path)).recipe == {"source": str(path), "overrides": []}
    with pytest.raises(UserError, match=r"recipe.yaml:\d+:\d+: output directory .* exists \(pass --overwrite"):
        compress.apply(path)
    report = compress.apply(Recipe.model_validate(plain(recipe)), overwrite=True)
    assert report.stages[0].params["bits"] == 4


@pytest.mark.parametrize(
    ("change", "overrides", "message"),
    [
        ({}, ["stages.0.bitz=3"], "<mapping> stages.0.bitz (--set stages.0.bitz=3): unknown key 'bitz'"),
        (
            {"stages": [{"method": "rtn", "bits": "four"}]},
            [],
            "<mapping> stages.0.bits: stages.0.bits: Input should be",
        ),
        ({"run": {"seed": object()}}, [], "<mapping> run.seed: a recipe holds text, numbers"),
    ],
)
def test_bad_input_raises_user_error_and_writes_nothing(recipe, tmp_path, change, overrides, message) -> None:
    with pytest.raises(UserError) as refused:
        compress.apply({**recipe, **change}, overrides=overrides)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_and_the_api_share_one_path(monkeypatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compress import runner
    from compress.cli import cli

    calls = []
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    path = tmp_path / "r.yaml"
    path.write_text("model: x\n")
    assert CliRunner().invoke(cli, ["apply", str(path), "--set", "a=1", "--overwrite"]).exit_code == 0
    compress.apply(path, overrides=("a=1",), overwrite=True)
    assert calls == [((path, ("a=1",)), {"overwrite": True, "resume": False})] * 2
