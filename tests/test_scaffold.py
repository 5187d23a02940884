"""``compress plugins new``: the path a third party takes, from scaffold to ``compress apply``.

The scaffolded distribution is pip-installed (editable, no dependencies, no build
isolation: offline and fast) into the running interpreter's environment and uninstalled
afterwards; the commands run as subprocesses, as a user types them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.scaffold import plugin_names, scaffold_plugin
from tests.conftest import ROOT

COMPRESS = str(Path(sys.executable).parent / "compress")
DISTRIBUTION = f"compress-scaffoldcheck{os.getpid()}"  # unique, so no earlier install is in the way
NAMES = plugin_names(DISTRIBUTION)
ENV = {**os.environ, "COLUMNS": "200"}  # rich tables: full names


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    parent = tmp_path_factory.mktemp("scaffold")
    result = CliRunner().invoke(cli, ["plugins", "new", DISTRIBUTION, "--dir", str(parent)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    directory = parent / DISTRIBUTION
    pip = [sys.executable, "-m", "pip"]
    installing = run(*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(directory))
    assert installing.returncode == 0, installing.stderr
    try:
        yield directory
    finally:
        run(*pip, "uninstall", "-y", DISTRIBUTION)


def test_scaffold_has_the_distribution_files(installed: Path):
    files = sorted(
        str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file() and "egg-info" not in str(p)
    )
    assert files == [
        "README.md",
        f"{NAMES.package}/__init__.py",
        f"{NAMES.package}/method.py",
        "pyproject.toml",
        "recipe.yaml",
        "tests/test_method.py",
    ]
    assert f'{NAMES.entry_point} = "{NAMES.package}"' in (installed / "pyproject.toml").read_text()


def test_installed_plugin_is_listed(installed: Path, tmp_path: Path):
    result = run(COMPRESS, "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if f" {NAMES.entry_point} " in line)
    assert "0.1.0" in row and "compress_register_methods" in row
    assert f"broken {NAMES.entry_point}" not in result.stdout


def test_compress_apply_runs_its_recipe(installed: Path, tiny_lm_dir: Path, tmp_path: Path):
    recipe = yaml.safe_load((installed / "recipe.yaml").read_text())
    recipe["model"] = str(tiny_lm_dir)
    recipe["output"]["dir"] = str(tmp_path / "out")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = run(COMPRESS, "apply", str(recipe_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (stage,) = json.loads((tmp_path / "out" / "report.json").read_text())["stages"]
    assert stage["method"] == NAMES.method and len(stage["layers"]) == 14
    assert all(abs(layer["sparsity"] - 0.3) < 0.01 for layer in stage["layers"].values())


def test_its_own_tests_pass_with_the_pytest_fixtures(installed: Path):
    result = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=installed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_docs_print_the_scaffold_as_it_is(tmp_path: Path):
    """docs/plugins.md's authoring guide shows the files `compress plugins new compress-myplugin` writes."""
    directory = scaffold_plugin("compress-myplugin", tmp_path)
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        text = path.read_text().strip()
        assert text in guide, f"docs/plugins.md does not show {path.relative_to(directory)} as scaffolded"


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("trailing-dash-", "not a valid distribution name"),
        ("has space", "not a valid distribution name"),
        ("café", "not a valid distribution name"),
        ("2bit", "its package name '2bit' is not a Python identifier"),
        ("import", "its package name 'import' is not a Python identifier"),
        ("compress", "a module named 'compress' is already importable"),
    ],
)
def test_bad_names_are_refused(name: str, message: str, tmp_path: Path):
    result = CliRunner().invoke(cli, ["plugins", "new", name, "--dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert re.fullmatch(rf"error: {re.escape(name)}: {re.escape(message)}.*\n", result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_refused(tmp_path: Path):
    (tmp_path / "compress-taken").mkdir()
    (tmp_path / "compress-taken" / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(
        cli, ["plugins", "new", "compress-taken", "--dir", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 2
    assert f"{tmp_path / 'compress-taken'}: already exists" in result.stderr
    assert [p.name for p in (tmp_path / "compress-taken").iterdir()] == ["mine.txt"]
