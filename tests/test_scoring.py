"""The scorer: zero for the unchanged model, the evaluation's numbers after rtn, the same
in both run modes, and repeat calls that never run the reference's blocks again."""

from __future__ import annotations

import types

import pytest
import torch

from compress.errors import UserError
from compress.scoring import Scorer
from tests.models import tiny_vit_config

RTN_W3 = {"stages": [{"method": "rtn", "bits": 3, "group_size": 32}], "evaluate": ["kl", "top1"]}


def test_the_unchanged_model_scores_kl_zero_and_full_agreement(run_recipe, tiny_model_dir):
    context = run_recipe(RTN_W3).context
    scorer = Scorer(context, "evaluation")
    assert scorer.score(scorer.reference) == {"kl": 0.0, "top1": 1.0}
    copy = context.load_model(str(tiny_model_dir))  # another object holding the same weights
    scores = scorer.score(copy)
    assert scores["kl"] == pytest.approx(0.0, abs=1e-6) and scores["top1"] == 1.0


def test_scores_after_rtn_equal_the_evaluation(run_recipe):
    context = run_recipe(RTN_W3).context
    evaluation = context.report.evaluation
    scores = Scorer(context, "evaluation").score()
    assert scores["kl"] > 1e-4
    assert scores["kl"] == pytest.approx(evaluation["kl"]["compressed"], rel=1e-4)
    assert scores["top1"] == pytest.approx(evaluation["top1"]["compressed"])


def test_sequential_and_whole_modes_score_alike(run_recipe):
    sequential = run_recipe(RTN_W3).context
    whole = run_recipe({**RTN_W3, "run": {"mode": "whole", "device": "cpu"}}).context
    a = Scorer(sequential, "calibration", ["kl", "top1", "perplexity"]).score()
    b = Scorer(whole, "calibration", ["kl", "top1", "perplexity"]).score()
    assert a.keys() == b.keys() == {"kl", "top1", "perplexity"}
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_repeat_scores_run_no_reference_block_and_read_no_data(run_recipe, monkeypatch):
    context = run_recipe(RTN_W3).context
    scorer = Scorer(context, "evaluation", ["top1", {"metric": "top1", "k": 5}])
    reference_calls = []
    for block in scorer.reference.model.layers:  # the blocks' own modules: skipped blocks still "run"
        block.mlp.register_forward_hook(lambda *_: reference_calls.append(1))
    monkeypatch.setattr(type(context), "data", lambda *_: pytest.fail("data read again"))
    first = scorer.score()
    assert scorer.score() == first
    assert reference_calls == []
    assert first["top1"] < first["top1(k=5)"] <= 1.0  # the parameter reached the metric


def test_another_checkpoint_as_the_reference(run_recipe, tiny_model_dir):
    context = run_recipe(RTN_W3).context
    default = Scorer(context, "evaluation").score()
    explicit = Scorer(context, "evaluation", reference=str(tiny_model_dir)).score()
    assert explicit == pytest.approx(default)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"data": "forget"}, "the scorer reads data 'forget', which the recipe's data: lacks"),
        ({"metrics": ["kll"]}, "unknown metric 'kll' (did you mean 'kl'?)"),
        (
            {"metrics": [{"metric": "top1", "k": 0}]},
            "metric {'metric': 'top1', 'k': 0}: Input should be greater than 0",
        ),
        ({"reference": "no-such-model"}, "no-such-model"),
    ],
)
def test_bad_scorer_arguments_are_refused_in_one_line(run_recipe, arguments, message):
    context = run_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 32}]}).context
    with pytest.raises(UserError) as caught:
        Scorer(context, **{"data": "evaluation", **arguments})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def tiny_vit():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config(num_labels=5)).eval()


def test_an_image_classifier_scores_as_its_evaluation(compress_host):
    """A ViT (the head reads the class token after the final norm) against the evaluation's math."""
    from compress.evaluate import compare_models
    from compress.quant import QuantScheme, compute_grid

    reference = tiny_vit()
    model = tiny_vit()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = compute_grid(module.weight.data, QuantScheme(bits=2, group_size=16)).fake_quantize(
                module.weight.data
            )
    generator = torch.Generator().manual_seed(1)
    samples = [
        {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": torch.tensor(index % 5)}
        for index in range(6)
    ]
    context = types.SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        host=compress_host,
        recipe=types.SimpleNamespace(data={"calibration": None}),
        data=lambda _name: samples,
        reference_model=lambda: reference,
    )
    names = ["class_kl", "agreement", "accuracy"]
    scores = Scorer(context, "calibration", names).score()
    metrics = [compress_host.metrics()[name]() for name in names]
    compare_models(reference, model, samples, metrics, torch.device("cpu"))
    assert scores["class_kl"] > 1e-4
    results = {name: metric.result()["compressed"] for name, metric in zip(names, metrics)}
    assert scores["class_kl"] == pytest.approx(results["class_kl"], rel=1e-3)  # batches of 1 and of 4: float32 sums
    assert scores["agreement"] == results["agreement"] and scores["accuracy"] == results["accuracy"]
