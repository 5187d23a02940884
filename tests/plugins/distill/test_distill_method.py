"""The distill method end to end on the two-layer SmolLM2: recovery, teachers, bad input."""

from __future__ import annotations

import pytest
import torch

from compress.engine import apply_recipe
from compress.errors import UserError
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID


def distill_recipe(write_recipe, tmp_path, output_format="dense", **stage):
    return write_recipe(
        data={
            "train": {"path": str(WIKITEXT_VALID), "samples": 4, "seq_len": 32},
            "evaluation": {"path": str(WIKITEXT_TEST), "samples": 2, "seq_len": 32},
        },
        stages=[
            {"method": "rtn", "bits": 3, "group_size": 64},
            {
                "method": "distill",
                "steps": 8,
                "batch_size": 4,
                "lr": 1e-3,
                "warmup_steps": 0,
                "schedule": "constant",
                "log_every": 1,
                "latent_weights": "original",
                **stage,
            },
        ],
        output={"dir": str(tmp_path / "out"), "format": output_format},
        evaluate=["kl"],
    )


def test_distillation_lowers_the_loss_and_keeps_the_grid(host, write_recipe, tmp_path):
    recipe = distill_recipe(write_recipe, tmp_path, losses=[{"loss": "forward_kl"}, {"loss": "ce", "weight": 0.1}])
    context = apply_recipe(host, check_recipe(host, recipe))
    curve = [loss for _, loss in context.report.stages[1].details["loss_curve"]]
    assert len(curve) == 8
    assert curve[-1] < 0.8 * curve[0], curve
    modules = dict(context.model.named_modules())
    for name, state in context.layers.items():
        weight = modules[name].weight.detach()
        assert torch.equal(state.quant.fake_quantize(weight), weight), name


def test_hidden_state_loss_with_a_teacher_checkpoint(host, write_recipe, tmp_path, tiny_lm_dir):
    recipe = distill_recipe(
        write_recipe,
        tmp_path,
        teacher=str(tiny_lm_dir),
        steps=2,
        losses=[{"loss": "hidden_cosine", "layers": {1: 1, 2: 2}}, {"loss": "jsd", "beta": 0.9}, {"loss": "pld"}],
        top_k=16,
    )
    context = apply_recipe(host, check_recipe(host, recipe))
    assert context.report.stages[1].details["steps"] == 2


def test_unknown_loss_suggests_the_closest(host, write_recipe, tmp_path):
    with pytest.raises(UserError, match="unknown distillation loss 'forward_kll'.*did you mean 'forward_kl'"):
        check_recipe(host, distill_recipe(write_recipe, tmp_path, losses=[{"loss": "forward_kll"}]))


def test_unknown_loss_parameter_is_named(host, write_recipe, tmp_path):
    with pytest.raises(UserError, match="loss 'jsd' has no parameter 'betta' \\(it takes: beta\\)"):
        check_recipe(host, distill_recipe(write_recipe, tmp_path, losses=[{"loss": "jsd", "betta": 0.5}]))


def test_teacher_with_another_vocabulary_is_refused(host, write_recipe, tmp_path, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-vocabulary"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.resize_token_embeddings(1000)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(other)
    recipe = distill_recipe(write_recipe, tmp_path, teacher=str(other))
    with pytest.raises(UserError, match="teacher's vocabulary has 1000 tokens and the student's 49152"):
        apply_recipe(host, check_recipe(host, recipe))
    assert not (tmp_path / "out").exists()


def test_distilled_model_is_written_as_compressed_tensors_and_reloads_exactly(host, write_recipe, tmp_path):
    """Training keeps the 3-bit grids, so the writer stores the distilled weights as codes."""
    from transformers import AutoModelForCausalLM

    recipe = distill_recipe(write_recipe, tmp_path, output_format="compressed-tensors", steps=2)
    context = apply_recipe(host, check_recipe(host, recipe))
    out = tmp_path / "out"
    assert '"format": "pack-quantized"' in (out / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = context.data("train")[0]["input_ids"].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, context.model(input_ids=ids).logits)
