"""``targets``/``ignore`` select what compressed-tensors' matcher (LLM Compressor's semantics) selects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from compressed_tensors.utils.match import match_named_modules
from torch import nn
from transformers import AutoConfig, LlamaForCausalLM

from compress.errors import UserError
from compress.targets import match_modules
from compress.validate import check_recipe

RECIPES = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml")
    if "source: images" not in path.read_text()  # image classifiers' recipes target a ViT's layers
)


class ScaledLinear(nn.Linear):
    """A subclass of nn.Linear: class-name targets match base classes too."""


@pytest.fixture(scope="module")
def llama(tiny_model_dir) -> nn.Module:
    """The tiny test Llama's modules (on the meta device), one down_proj a ScaledLinear."""
    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_model_dir))
    model.model.layers[1].mlp.down_proj = ScaledLinear(128, 64, bias=False, device="meta")
    return model


@pytest.mark.parametrize(
    ("targets", "ignore"),
    [
        (["Linear"], ["lm_head"]),
        (["re:.*(q|k|v|o|gate|up|down)_proj$"], []),
        (["LlamaDecoderLayer"], []),
        (["Linear"], ["re:.*self_attn.*", "model.layers.0.mlp.up_proj"]),
        (["model.layers.1.mlp.down_proj", "re:.*q_proj$"], ["re:model\\.layers\\.0\\..*"]),
    ],
)
def test_selection_is_compressed_tensors_selection(llama, targets, ignore):
    selected, unmatched = match_modules(llama, targets, ignore)
    expected = [name for name, _ in match_named_modules(llama, targets, ignore) if name]
    assert list(selected) == expected and selected
    assert unmatched == []


def test_a_class_name_matches_subclasses_and_names_match_exactly(llama):
    selected, _ = match_modules(llama, ["Linear"], ["lm_head"])
    assert "model.layers.1.mlp.down_proj" in selected  # a ScaledLinear
    assert len(selected) == 14
    selected, unmatched = match_modules(llama, ["self_attn.q_proj", "ScaledLinear"], [])
    assert list(selected) == ["model.layers.1.mlp.down_proj"] and unmatched == ["self_attn.q_proj"]


def test_a_target_whose_modules_are_all_ignored_is_matched_but_selects_nothing(llama):
    selected, unmatched = match_modules(llama, ["lm_head"], ["re:lm_.*"])
    assert selected == {} and unmatched == []


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_targets_the_projections_of_every_block(llama, recipe):
    stages = yaml.safe_load(recipe.read_text()).get("stages") or []
    for stage in stages:
        if stage.get("targets") is None:
            continue
        selected, unmatched = match_modules(llama, stage["targets"], stage.get("ignore") or [])
        assert unmatched == [] and selected, stage
        assert all(name.startswith("model.layers.") and name.endswith("_proj") for name in selected), stage


def test_a_target_matching_nothing_is_refused_with_the_names_near_it(compress_host, tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\n"
        "stages:\n"
        "  - method: rtn\n"
        "    bits: 4\n"
        "    group_size: 32\n"
        "    targets: ['re:.*qkv_proj$', Linear]\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    with pytest.raises(UserError) as error:
        check_recipe(compress_host, recipe)
    assert str(error.value.where).endswith("recipe.yaml:6:15")
    assert error.value.message == (
        "target 're:.*qkv_proj$' matches no module of the model (near it: model.layers.N.self_attn.v_proj, "
        "model.layers.N.self_attn.q_proj, model.layers.N.self_attn.k_proj, model.layers.N.self_attn.o_proj)"
    )
