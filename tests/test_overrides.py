"""``--set KEY=VALUE`` on ``compress recipe check`` and ``compress apply``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import UserError
from compress.overrides import apply_overrides, parse_override
from compress.recipe import parse_recipe_file

RECIPE = """\
model: {model}
data:
  calibration: {{path: {text}, samples: 2, seq_len: 32}}
  evaluation: {{path: {text}, samples: 2, seq_len: 32}}
stages:
  - method: rtn
    name: quantize
    bits: 4
    group_size: 32
output: {{dir: {out}}}
evaluate: [perplexity]
"""


@pytest.fixture
def recipe_file(tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path, host) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(model=tiny_model_dir, text=tiny_text_file, out=tmp_path / "out"))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def refused(result) -> str:
    """The one ``error:`` line of a run that exited 2."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages.0.bits", "--set stages.0.bits: expected KEY=VALUE"),
        ("=3", "--set =3: expected KEY=VALUE"),
        ("stages..bits=3", "empty part in key 'stages..bits'"),
        ("stages.0.bits=[", "--set stages.0.bits=[: value is not valid YAML"),
    ],
)
def test_malformed_overrides_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError) as error:
        parse_override(text)
    assert message in str(error.value)


def test_values_are_yaml() -> None:
    assert parse_override("a.b=3").value == 3
    assert parse_override("a=null").value is None
    assert parse_override("a=[x, y]").value == ["x", "y"]
    assert parse_override("a=b=c").value == "b=c"
    assert parse_override("output.dir=out/x").parts == ("output", "dir")


def test_keys_reach_list_entries_by_index_and_by_name(recipe_file: Path) -> None:
    located = parse_recipe_file(recipe_file)
    changed = apply_overrides(
        located,
        [
            "stages.quantize.bits=3",
            "stages.0.symmetric=false",
            "evaluate.perplexity.data=calibration",
            "model.dtype=bfloat16",
        ],
    )
    stage = changed.raw["stages"][0]
    assert (stage["bits"], stage["symmetric"]) == (3, False)
    assert changed.raw["evaluate"] == [{"metric": "perplexity", "data": "calibration"}]
    assert changed.raw["model"] == {"name": located.raw["model"], "dtype": "bfloat16"}
    assert located.raw["stages"][0]["bits"] == 4, "the parsed recipe is left as it was"
    assert apply_overrides(located, ["stages.rtn.bits=2"]).raw["stages"][0]["bits"] == 2


def test_check_accepts_overrides_and_applies_them(recipe_file: Path) -> None:
    result = invoke("recipe", "check", str(recipe_file), "--set", "stages.0.group_size=64", "--set", "run.seed=3")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": ok")


@pytest.mark.parametrize(
    ("override", "place", "message"),
    [
        # a key the method does not have: placed at the stage's line in the file
        ("stages.0.bitz=3", ":6:5 (--set stages.0.bitz=3)", "unknown key 'bitz' (did you mean 'bits'?)"),
        ("outptu.dir=x", ":1:1 (--set outptu.dir=x)", "unknown key 'outptu' in the recipe (did you mean 'output'?)"),
        ("data.calibraton.samples=4", ":3:3 (--set data.calibraton.samples=4)", "(did you mean 'calibration'?)"),
        ("stages.3.bits=2", ":6:3 (--set stages.3.bits=2)", "stages has 1 entry; there is no entry 3"),
        ("stages.gptq.bits=2", ":6:3 (--set stages.gptq.bits=2)", "stages has no entry named 'gptq'"),
        ("run.seed.x=1", ":1:1 (--set run.seed.x=1)", "unknown key 'seed' in run"),
        ("run.device=gpu", ":1:1 (--set run.device=gpu)", "run.device: Value error, must be auto, cpu, cuda or cuda:N"),
        # a value the schema refuses: placed at the value the override replaced
        (
            "stages.0.bits=eleven",
            ":8:11 (--set stages.0.bits=eleven)",
            "stages.0.bits: Input should be a valid integer",
        ),
        ("stages.0.bits=9", ":8:11 (--set stages.0.bits=9)", "less than or equal to 8"),
        ("output.format=dens", ":10:9 (--set output.format=dens)", "unknown output format 'dens'"),
    ],
)
def test_bad_overrides_name_the_file_position_and_the_override(
    recipe_file: Path, override: str, place: str, message: str
) -> None:
    for command in (("recipe", "check"), ("apply",)):
        line = refused(invoke(*command, str(recipe_file), "--set", override))
        assert line.startswith(f"error: {recipe_file}{place}: "), line
        assert message in line
    assert not (recipe_file.parent / "out").exists()


def test_an_error_the_file_causes_names_no_override(recipe_file: Path) -> None:
    recipe_file.write_text(recipe_file.read_text().replace("bits: 4", "bits: 40"))
    line = refused(invoke("recipe", "check", str(recipe_file), "--set", "output.dir=elsewhere"))
    assert f"error: {recipe_file}:8:11: stages.0.bits" in line


def test_apply_records_the_effective_recipe_and_the_overrides(recipe_file: Path, tmp_path: Path) -> None:
    overrides = ["stages.quantize.bits=3", f"output.dir={tmp_path / 'other'}", "evaluate=[perplexity, kl]"]
    result = invoke("apply", str(recipe_file), *[arg for text in overrides for arg in ("--set", text)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "other"
    assert not (tmp_path / "out").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == {"source": str(recipe_file), "overrides": [f"--set {text}" for text in overrides]}
    assert report["stages"][0]["params"]["bits"] == 3
    assert set(report["evaluation"]) == {"perplexity", "kl"}
    written = (out / "recipe.yaml").read_text()
    assert written.startswith(f"# the recipe as run: {recipe_file} with --set stages.quantize.bits=3")
    effective = yaml.safe_load(written)
    assert effective["stages"][0]["bits"] == 3 and effective["output"]["dir"] == str(out)
    assert "bits: 3" in (out / "README.md").read_text()


def test_without_overrides_the_recipe_file_is_written_as_it_is(recipe_file: Path, tmp_path: Path) -> None:
    recipe_file.write_text("# my notes\n" + recipe_file.read_text())
    assert invoke("apply", str(recipe_file)).exit_code == 0
    assert (tmp_path / "out" / "recipe.yaml").read_text() == recipe_file.read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["recipe"]["overrides"] == []
