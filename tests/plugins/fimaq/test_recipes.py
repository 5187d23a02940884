"""The shipped fimaq recipes (recipes/fimaq/) pass ``compress recipe check`` with a tiny model of
the same kind and local data in place of the trained ViT, SmolLM2 and the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compress.validate import check_recipe
from tests.faults.cases_fimaq import CLASSES, images, tiny_vit

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes" / "fimaq").glob("*.yaml"))


def test_there_are_the_vit_and_smollm2_recipes():
    assert {path.stem for path in RECIPES} == {"vit-cifar10-w4a4", "vit-cifar10-w3a3", "smollm2-w4a8"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_fimaq_recipe_checks(recipe, compress_host, tmp_path, tiny_model_dir, tiny_text_file):
    raw = yaml.safe_load(recipe.read_text())
    image = raw["data"]["calibration"].get("source") == "images"
    raw["model"] = str(tiny_vit(tmp_path) if image else tiny_model_dir)
    if image:
        data = {"path": str(images(tmp_path, CLASSES)), "source": "images", "samples": 6}
    else:
        data = {"path": str(tiny_text_file), "samples": 8, "seq_len": 32}
    raw["data"] = {name: data for name in raw["data"]}
    raw["stages"][0]["batch_size"] = 2
    raw["output"]["dir"] = str(tmp_path / "out")
    local = tmp_path / recipe.name
    local.write_text(yaml.safe_dump(raw))
    checked = check_recipe(compress_host, local)
    stage = checked.recipe.stages[0]
    assert stage.method == "fimaq"
    assert checked.stages[0].method.produces().activation_points == ("input", "query", "key", "value", "probs")
