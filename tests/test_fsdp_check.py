"""What ``compress recipe check`` accepts and refuses under FSDP (``ACCELERATE_USE_FSDP``); the
one-line refusals are in the fault corpus (``tests/faults/cases_scale.py``)."""

from __future__ import annotations

import pytest
import yaml

from compress.errors import UserError
from compress.training.sharding import fsdp_refusal
from compress.validate import check_recipe


def write(tmp_path, model, text_file, stages, evaluate=()):
    recipe = {
        "model": str(model),
        "data": {"train": {"path": str(text_file), "samples": 4, "seq_len": 16}},
        "stages": stages,
        "output": {"dir": str(tmp_path / "out")},
        "evaluate": list(evaluate),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_a_stage_before_the_training_stage_is_refused_where_the_model_loads_lazily(
    host, tiny_model_dir, tiny_text_file, monkeypatch, tmp_path
):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    stages = [
        {"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"re:.*self_attn\..*_proj$"]},
        {"method": "distill", "steps": 2, "batch_size": 2, "targets": [r"re:.*mlp\..*_proj$"]},
    ]
    with pytest.raises(
        UserError, match="memory-mapped shards until the training stage shards them, so stage 1 \\(rtn\\)"
    ):
        check_recipe(host, write(tmp_path, tiny_model_dir, tiny_text_file, stages))
    checked = check_recipe(host, write(tmp_path, tiny_model_dir, tiny_text_file, stages[1:]))
    assert [stage.method.name for stage in checked.stages] == ["distill"]


def test_a_loader_that_gives_whole_models_may_train_other_layers_than_an_earlier_quantizing_stage():
    from compress_distill.method import Distill
    from compress_rtn.method import RoundToNearest

    methods = [
        RoundToNearest(RoundToNearest.Params.model_validate({"bits": 4, "group_size": 32})),
        Distill(Distill.Params.model_validate({"steps": 2, "batch_size": 2})),
    ]
    whole = object()  # no weights_directory: the model is loaded whole, as a GGUF file is
    attention, mlp = ["model.layers.0.self_attn.q_proj"], ["model.layers.0.mlp.up_proj"]
    assert fsdp_refusal(methods, [attention, mlp], None, False, whole) == ("", ())
    reason, key = fsdp_refusal(methods, [attention, attention], None, False, whole)
    assert "through the grids or masks that stage 1 (rtn) leaves in model.layers.0.self_attn.q_proj" in reason
    assert key == ("stages", 1, "method")


def test_the_same_recipe_without_fsdp_is_not_refused(host, tiny_model_dir, tiny_text_file, monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    stages = [{"method": "distill", "steps": 2, "batch_size": 2}, {"method": "rtn", "bits": 4, "group_size": 32}]
    check_recipe(
        host,
        write(tmp_path, tiny_model_dir, tiny_text_file, stages, evaluate=[{"metric": "perplexity", "data": "train"}]),
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="so no stage may follow it"):
        check_recipe(
            host,
            write(
                tmp_path, tiny_model_dir, tiny_text_file, stages, evaluate=[{"metric": "perplexity", "data": "train"}]
            ),
        )


def test_uoe_says_why_it_cannot_train_sharded():
    from compress_unlearn.uoe import UOE

    reason, key = fsdp_refusal([UOE(UOE.Params.model_validate({}))], [["model.layers.0.mlp"]], None, False, object())
    assert "uoe cannot train sharded: it trains slices of fused expert parameters" in reason
    assert key == ("stages", 0, "method")
