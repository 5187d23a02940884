"""The shipped unlearning recipes (recipes/unlearn/) pass ``compress recipe check`` once their
prerequisites exist: here the generated benchmark and the tiny Llama in place of the fine-tuned models."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.validate import check_recipe
from scripts.make_unlearn_data import generate
from tests.plugins.unlearn.conftest import local_recipe

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes" / "unlearn").glob("*.yaml"))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unlearn-data")
    generate(directory, authors=10, questions=10, seed=0)
    return directory


def test_there_is_a_recipe_per_method_and_one_with_quantization():
    assert {path.stem for path in RECIPES} == {"ga", "graddiff", "npo", "simnpo", "dipo", "npo-then-w4"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_unlearning_recipe_checks(recipe, benchmark, tiny_model_dir, host, tmp_path):
    models = {"target": tiny_model_dir, "retain90": tiny_model_dir}
    checked = check_recipe(host, local_recipe(recipe, benchmark, models, 10, tmp_path))
    assert checked.recipe.stages[0].method == (recipe.stem.split("-")[0])
