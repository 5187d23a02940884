"""The unlearning methods end to end on a tiny random Llama and a tiny generated TOFU-style set:
each method's recipe runs and moves the model the way its loss says; the metrics run in a
recipe's evaluate:; bad recipes are refused at recipe check."""

from __future__ import annotations

import json

import pytest
import torch

from compress.errors import UserError
from compress.validate import check_recipe
from compress_unlearn.losses import sequence_nll
from tests.plugins.unlearn.conftest import forget_batch
from tests.plugins.unlearn.conftest import qa_entry as entry

FORGET, RETAIN = 2, 4


def unlearn_recipe(qa_data, method, **stage):
    return {
        "data": {
            "forget": entry(qa_data / "forget10.jsonl", FORGET),
            "retain": entry(qa_data / "retain90.jsonl", RETAIN),
        },
        "stages": [{"method": method, "steps": 2, "batch_size": 2, "lr": 3e-3, "log_every": 1, **stage}],
        "run": {"device": "cpu", "mode": "whole"},
    }


@torch.no_grad()
def forget_stats(model, batch):
    """The summed forget-answer NLL, and the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_nll(logits, batch["labels"])[0].sum().item(), logits


# a random model's per-token NLL (ln 256, about 5.5) is already past SimNPO's default margin δ = 0, where
# its forget term saturates: the test sets δ above it
RUNS = {
    "ga": {},
    "graddiff": {},
    "graddiff-kl": {"method": "graddiff", "retain_loss": "kl"},
    "npo": {},
    "simnpo": {"delta": 6.0, "gamma": 1.0},
    "dipo": {},
}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_unlearns_the_forget_answers(host, run_recipe, qa_data, tiny_model_dir, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = dict(RUNS[name])
    method = settings.pop("method", name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = forget_batch(qa_data, tokenizer, FORGET)
    before, original_logits = forget_stats(original, batch)
    run = run_recipe(unlearn_recipe(qa_data, method, **settings))
    after, logits = forget_stats(run.context.model.eval(), batch)
    curve = run.report["stages"][0]["details"]["loss_curve"]
    assert len(curve) == 2 and all(torch.isfinite(torch.tensor(value)) for _, value in curve)
    if method == "dipo":
        # DiPO moves probability off the original model's high-confidence tokens
        scored = batch["labels"][:, 1:] != -100
        top = original_logits[:, :-1].argmax(-1, keepdim=True)

        def top_probability(values):
            return values[:, :-1].softmax(-1).gather(-1, top).squeeze(-1)[scored].mean().item()

        assert top_probability(logits) < top_probability(original_logits)
    else:
        assert after > before


def test_metrics_run_in_a_recipe(host, run_recipe, qa_data, tiny_model_dir):
    recipe = unlearn_recipe(qa_data, "npo", steps=1)
    recipe["data"]["holdout"] = entry(qa_data / "holdout10.jsonl", FORGET)
    recipe["data"]["facts"] = entry(qa_data / "world_facts.jsonl", 2)
    small = {"batch_size": 2}
    recipe["evaluate"] = [
        {"metric": "forget_quality", "data": "forget", "retain_model": str(tiny_model_dir), **small},
        {"metric": "answer_rouge", "data": "forget", "max_new_tokens": 4, **small},
        {"metric": "privacy_leak", "data": "forget", "holdout": "holdout", **small},
        {"metric": "extraction_strength", "data": "forget"},
        {"metric": "exact_memorization", "data": "forget"},
        {"metric": "truth_ratio", "data": "retain", "aggregator": "true_better"},
        {"metric": "answer_prob", "data": "facts", "normalised": True},
        {"metric": "model_utility", "data": "retain", "general": ["facts"], "max_new_tokens": 4, **small},
    ]
    evaluation = run_recipe(recipe).report["evaluation"]
    quality = evaluation["forget_quality(retain_model=" + str(tiny_model_dir) + ", batch_size=2):forget"]
    # the original model is the retain model here: its truth ratios are the reference's exactly
    assert quality["original"] == pytest.approx(1.0)
    assert 0 <= quality["compressed"] <= 1
    for key, values in evaluation.items():
        assert set(values) >= {"original", "compressed"}, key
        assert all(isinstance(values[k], float) for k in ("original", "compressed")), key
    json.dumps(evaluation)


def write(tmp_path, recipe_dict, tiny_model_dir):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), **recipe_dict}), encoding="utf-8")
    return path


def test_overlapping_forget_and_retain_are_refused_with_the_count(host, qa_data, tiny_model_dir, tmp_path):
    recipe = unlearn_recipe(qa_data, "npo")
    recipe["data"]["retain"] = entry(qa_data / "full.jsonl", 40)  # holds the forget author's items too
    with pytest.raises(UserError, match=r"share 2 item\(s\) \(first: .*forget10.jsonl:1 = .*full.jsonl:37\)"):
        check_recipe(host, write(tmp_path, recipe, tiny_model_dir))


def test_missing_retain_is_refused(host, qa_data, tiny_model_dir, tmp_path):
    recipe = unlearn_recipe(qa_data, "ga")
    del recipe["data"]["retain"]
    with pytest.raises(UserError, match="reads data: retain:, which the recipe lacks"):
        check_recipe(host, write(tmp_path, recipe, tiny_model_dir))


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [("npo", "beta", 0, "greater than 0"), ("simnpo", "delta", -1, "greater than or equal to 0")],
)
def test_out_of_range_hyperparameters_are_refused(host, qa_data, tiny_model_dir, tmp_path, method, key, value, message):
    recipe = unlearn_recipe(qa_data, method, **{key: value})
    with pytest.raises(UserError, match=message):
        check_recipe(host, write(tmp_path, recipe, tiny_model_dir))


def test_generation_beyond_the_context_is_refused(host, qa_data, tiny_model_dir, tmp_path):
    recipe = unlearn_recipe(qa_data, "ga")
    recipe["evaluate"] = [{"metric": "answer_rouge", "data": "forget", "max_new_tokens": 200}]
    with pytest.raises(UserError, match=r"seq_len 128 \+ max_new_tokens 200 exceeds the model's 256 positions"):
        check_recipe(host, write(tmp_path, recipe, tiny_model_dir))


def test_compress_eval_reads_qa_data_and_metric_parameters(host, qa_data, tiny_model_dir):
    from click.testing import CliRunner

    from compress.cli import cli

    model = str(tiny_model_dir)
    common = ["eval", model, "--against", model, "--data", str(qa_data / "forget10.jsonl"), "--source", "qa"]
    common += ["--loss-on", "answers", "--samples", "2", "--seq-len", "128", "--device", "cpu", "--json"]
    metrics = ["--metric", f"forget_quality(retain_model={model}, batch_size=2)", "--metric", "exact_memorization"]
    result = CliRunner().invoke(cli, common + metrics)
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation[f"forget_quality(retain_model={model}, batch_size=2):eval"]["compressed"] == pytest.approx(1.0)
    refused = CliRunner().invoke(cli, [*common, "--metric", "answer_rouge(max_new_tokens=500)"])
    assert refused.exit_code == 2
    assert "seq_len 128 + max_new_tokens 500 exceeds the model's 256 positions" in refused.output


def test_model_utility_is_the_harmonic_mean_of_its_named_parts(qa_data, tiny_model_dir):
    """``parts`` names the six statistics (each entry's probability, ROUGE-L and truth ratio) that
    the utility combines, so a utility near 0 can be traced to the part that is near 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.api import MetricInputs
    from compress.recipe import DataSpec
    from compress_unlearn.data import QASource
    from compress_unlearn.metrics import ModelUtility

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    specs = {
        "retain": DataSpec(**entry(qa_data / "retain90.jsonl", RETAIN)),
        "facts": DataSpec(**entry(qa_data / "world_facts.jsonl", 2)),
    }
    data = {name: QASource().load(spec, tokenizer) for name, spec in specs.items()}
    inputs = MetricInputs(data["retain"], specs["retain"], tokenizer, torch.device("cpu"), data.__getitem__)
    metric = ModelUtility(ModelUtility.Params(general=["facts"], max_new_tokens=4, batch_size=2))
    parts = metric.parts(model, inputs)
    assert list(parts) == [
        f"{entry_name}/{statistic}"
        for entry_name in ("data", "facts")
        for statistic in ("probability", "rouge", "truth_ratio")
    ]
    assert all(0 <= value <= 1 for value in parts.values())
    expected = len(parts) / sum(1 / value for value in parts.values()) if all(parts.values()) else 0.0
    assert metric.value(model, inputs) == pytest.approx(expected)
