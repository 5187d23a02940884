"""The shipped unlearning recipes (recipes/unlearn/) pass ``compress recipe check`` once their
prerequisites exist: here the generated benchmark and the tiny Llama in place of the fine-tuned models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import compress_unlearn
from compress.validate import check_recipe
from scripts.make_unlearn_data import generate

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes" / "unlearn").glob("*.yaml"))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unlearn-data")
    generate(directory, authors=10, questions=10, seed=0)
    return directory


def test_there_is_a_recipe_per_method_and_one_with_quantization():
    assert {path.stem for path in RECIPES} == {"ga", "graddiff", "npo", "simnpo", "dipo", "npo-then-w4"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_unlearning_recipe_checks(recipe, benchmark, tiny_model_dir, register_plugin, tmp_path):
    host = register_plugin(compress_unlearn, "unlearn")
    text = recipe.read_text(encoding="utf-8")
    text = text.replace("out/unlearn-data/", f"{benchmark}/").replace("out/unlearn-models/target", str(tiny_model_dir))
    raw = yaml.safe_load(text.replace("out/unlearn-models/retain90", str(tiny_model_dir)))
    raw["output"]["dir"] = str(tmp_path / "out")
    for entry in raw["data"].values():  # fewer records and a smaller batch, the same checks
        entry["samples"] = min(entry["samples"], 10)
    raw["stages"][0]["batch_size"] = 2
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    checked = check_recipe(host, path)
    assert checked.recipe.stages[0].method == (recipe.stem.split("-")[0])
