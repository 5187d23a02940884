"""Recipes are read with bounded work and memory, whatever their shape; ordinary YAML still works."""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import UserError
from compress.recipe import MAX_ALIASES, MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES, load_recipe, parse_recipe_file
from tests.faults.cases_recipes import alias_bomb


def refusal(path: Path) -> str:
    with pytest.raises(UserError) as error:
        parse_recipe_file(path)
    return str(error.value)


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_alias_bomb_is_refused_in_milliseconds_and_little_memory(tmp_path):
    # the CLI under a 1 GB address-space limit: the corpus case recipe/alias-bomb
    path = write(tmp_path, alias_bomb())
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refusal(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # level 6 is the first to pass MAX_VALUES: 9**6 strings behind it
    assert message == f"{path}:6:5: invalid YAML: aliases expand this to more than {MAX_VALUES} values"
    assert seconds < 2
    assert peak < 20 * 2**20


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x 1\nb: [" + ", ".join(["*x"] * (MAX_ALIASES + 1)) + "]\n", "2:.*: too many aliases"),
        ("a: &x [1, *x]\n", "1:11: invalid YAML: recursive alias \\*x"),
        ("a: &x {b: *x}\n", "1:11: invalid YAML: recursive alias \\*x"),
        ("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", f"1:{3 + MAX_DEPTH}: .*nested deeper than"),
        ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", f"1:{3 + MAX_DEPTH}: .*nested deeper than"),
        ("a: 1\nb: " + "7" * 5000 + "\n", "2:4: invalid YAML: Exceeds the limit \\(4300 digits\\)"),
        ("a: 1\nb: c\x00\n", "2:5: invalid YAML: character U\\+0000 is not allowed"),
        ("a: 1\nb: !!python/name:os.system\n", "2:4: invalid YAML: could not determine a constructor"),
    ],
)
def test_hostile_yaml_is_one_located_line(tmp_path, text, message):
    path = write(tmp_path, text)
    assert re.search(f"^{path}:{message}", refusal(path))


def depth(value: object) -> int:
    return 1 + max(map(depth, value), default=0) if isinstance(value, list) else 0


def test_limits_are_inclusive(tmp_path):
    aliases = "a: &x 1\nb: [" + ", ".join(["*x"] * MAX_ALIASES) + "]\n"
    assert len(parse_recipe_file(write(tmp_path, aliases)).raw["b"]) == MAX_ALIASES
    deep = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # the top mapping is one level
    assert depth(parse_recipe_file(write(tmp_path, deep)).raw["a"]) == MAX_DEPTH - 1
    # 99 aliases of a 100-value list: 9,900 values, well within the limit
    values = "a: &x [" + ", ".join(["1"] * 99) + "]\nb: [" + ", ".join(["*x"] * 99) + "]\n"
    assert sum(map(len, parse_recipe_file(write(tmp_path, values)).raw["b"])) == 99 * 99


def test_size_limit_is_checked_before_parsing(tmp_path):
    path = write(tmp_path, b"a: 1\n" + b"#" * MAX_RECIPE_BYTES)
    assert refusal(path) == f"{path}: the recipe is larger than 1 MiB; a recipe is a few KB"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"model: x\n# caf\xe9\n", "2:6: not UTF-8 text: byte 0xe9 at byte offset 14"),
        ("model: x\n".encode("utf-16"), "1:1: not UTF-8 text: byte 0xff at byte offset 0"),
        (b"model: x\nstages: [\xc3]\n", "2:10: not UTF-8 text: byte 0xc3 at byte offset 18"),
    ],
)
def test_recipe_that_is_not_utf8_names_line_and_byte(tmp_path, data, where):
    path = write(tmp_path, data)
    assert refusal(path) == f"{path}:{where}"


def test_anchors_aliases_and_merge_keys_still_work(tmp_path, tiny_model_dir):
    text = f"""\
model: {tiny_model_dir}
stages:
  - &first {{method: rtn, bits: 4, group_size: 32, targets: &layers [model.layers.0.mlp.up_proj]}}
  - <<: *first
    bits: 8
    targets: *layers
output: {{dir: {tmp_path / "out"}}}
"""
    path = write(tmp_path, text)
    recipe, located = load_recipe(path)
    assert [(stage.method, stage.params["bits"], stage.targets) for stage in recipe.stages] == [
        ("rtn", 4, ["model.layers.0.mlp.up_proj"]),
        ("rtn", 8, ["model.layers.0.mlp.up_proj"]),
    ]
    # a merged key is placed where the anchor wrote it, an overriding one where the stage does
    assert str(located.where(("stages", 1, "group_size"))) == f"{path}:3:47"
    assert str(located.where(("stages", 1, "bits"))) == f"{path}:5:11"
    result = CliRunner().invoke(cli, ["recipe", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["stage 1: rtn on 1 modules", "stage 2: rtn on 1 modules", f"{path}: ok"]


def test_a_key_written_twice_is_refused_where_it_repeats(tmp_path):
    path = write(tmp_path, "a: 1\nb:\n  c: 1\n  d: 2\n  c: 3\n")
    assert refusal(path) == f"{path}:5:3: duplicate key 'c'"
