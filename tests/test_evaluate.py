"""Evaluation over samples: padding changes nothing, real tokens are counted, metrics take parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from compress.data import JsonLinesSource
from compress.engine import apply_recipe
from compress.evaluate import BUILTIN_METRICS, EmbeddingCosine, KLDivergence, Perplexity, compare_models
from compress.recipe import DataSpec
from compress.validate import check_recipe
from tests.test_bad_input import assert_user_error, run_cli

QA = [
    {"q": "Question: what is the capital of France?", "a": " Answer: Paris, a city on the Seine."},
    {"q": "Q: 2+2?", "a": " 4"},
    {"q": "Translate to German: good morning", "a": " Guten Morgen"},
    {"q": "Name a prime number larger than ten and explain briefly why it is prime.", "a": " 13 has no divisor but 1."},
    {"q": "Say hi", "a": " hi there, nice to meet you today"},
]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in QA))
    return path


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """``model`` with noise added to every Linear weight: a stand-in compressed model."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dim() == 2:
                noise = torch.randn(module.weight.shape, generator=generator) * module.weight.std() * scale
                module.weight += noise
    return model


def results(original, compressed, samples, metric_classes, batch_size):
    metrics = [metric_class() for metric_class in metric_classes]
    compare_models(original, compressed, samples, metrics, torch.device("cpu"), batch_size=batch_size)
    return [metric.result() for metric in metrics], metrics


def test_perplexity_and_kl_are_their_definitions_over_scored_tokens():
    """The metrics (one sequence at a time) against the formulas on the whole batch at once."""
    generator = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 3, 6, 11, generator=generator).unbind(0)
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    labels[0, :3] = labels[2, 4:] = -100
    batch = {"labels": labels}
    perplexity, kl = Perplexity(), KLDivergence()
    for metric in (perplexity, kl):
        metric.update(SimpleNamespace(logits=p_logits), SimpleNamespace(logits=q_logits), batch)
    targets = labels[:, 1:]
    scored = targets != -100
    p_log, q_log = p_logits[:, :-1].log_softmax(-1), q_logits[:, :-1].log_softmax(-1)
    nll = -q_log.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[scored]
    assert perplexity.result()["compressed"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    expected_kl = (p_log.exp() * (p_log - q_log)).sum(-1)[scored].mean().item()
    assert kl.result()["compressed"] == pytest.approx(expected_kl, rel=1e-5)


@pytest.mark.parametrize("loss_on", ["all", "answers"])
def test_batched_with_padding_equals_one_sample_at_a_time(tiny_lm_dir, qa_file, loss_on):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    compressed = perturbed(AutoModelForCausalLM.from_pretrained(tiny_lm_dir)).eval()
    spec = DataSpec(path=qa_file, source="jsonl", samples=5, prompt_field="q", answer_field="a", loss_on=loss_on)
    samples = JsonLinesSource().load(spec, tokenizer)
    assert len({len(sample["input_ids"]) for sample in samples}) > 1  # batches are padded

    causal = [metric for metric in BUILTIN_METRICS if "causal-lm" in metric.tasks]
    alone, _ = results(original, compressed, samples, causal, batch_size=1)
    batched, metrics = results(original, compressed, samples, causal, batch_size=3)
    for single, together in zip(alone, batched):
        assert together.keys() == single.keys()
        for key in single:
            assert together[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert batched[1]["compressed"] > 0 and 0 < batched[2]["compressed"] < 1  # kl, top1: the models differ

    scored = sum(int((sample["labels"][1:] != -100).sum()) for sample in samples)
    perplexity = next(metric for metric in metrics if isinstance(metric, Perplexity))
    assert perplexity.tokens == scored
    if loss_on == "answers":
        assert scored == sum(len(tokenizer(r["a"], add_special_tokens=False).input_ids) for r in QA)


def test_top_k_agreement_grows_with_k(tiny_lm_dir, qa_file):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    compressed = perturbed(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), scale=0.3).eval()
    samples = JsonLinesSource().load(DataSpec(path=qa_file, source="jsonl", samples=5, field="a"), tokenizer)
    top1 = next(metric for metric in BUILTIN_METRICS if metric.name == "top1")
    agreement = {}
    for k in (1, 5):
        metric = top1(top1.Params(k=k))
        compare_models(original, compressed, samples, [metric], torch.device("cpu"))
        agreement[k] = metric.result()["compressed"]
    assert agreement[1] < agreement[5] <= 1


def test_cosine_pools_only_real_tokens(minilm_dir, qa_file):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    original = AutoModel.from_pretrained(minilm_dir).eval()
    compressed = perturbed(AutoModel.from_pretrained(minilm_dir)).eval()
    samples = JsonLinesSource().load(DataSpec(path=qa_file, source="jsonl", samples=5, field="q"), tokenizer)
    (alone,), _ = results(original, compressed, samples, [EmbeddingCosine], batch_size=1)
    (batched,), _ = results(original, compressed, samples, [EmbeddingCosine], batch_size=5)
    assert batched["compressed"] == pytest.approx(alone["compressed"], rel=1e-5)
    assert batched["compressed"] < 1


def test_recipe_evaluates_variable_length_records_with_metric_parameters(host, write_recipe, tmp_path, qa_file):
    qa = {"path": str(qa_file), "source": "jsonl", "samples": 5, "prompt_field": "q", "answer_field": "a"}
    recipe = write_recipe(
        data={"evaluation": {**qa, "loss_on": "answers"}},
        evaluate=["perplexity", "top1", {"metric": "top1", "k": 5}, {"metric": "kl"}],
        output=None,
    )
    context = apply_recipe(host, check_recipe(host, recipe))
    evaluation = context.report.evaluation
    assert list(evaluation) == ["perplexity", "top1", "top1(k=5)", "kl"]
    assert evaluation["top1"]["compressed"] <= evaluation["top1(k=5)"]["compressed"]
    real = sum(len(sample["input_ids"]) for sample in context.data("evaluation"))
    assert evaluation["perplexity"]["tokens"] == real and evaluation["perplexity"]["samples"] == 5
    assert real < 5 * max(len(sample["input_ids"]) for sample in context.data("evaluation"))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"metric": "top1", "k": 0}, r"evaluate\.0\.k: Input should be greater than 0"),
        ({"metric": "top1", "kk": 5}, r"unknown key 'kk' \(did you mean 'k'\?\)"),
        ({"metric": "perplexity", "k": 5}, r"unknown key 'k' \(available: data\)"),
        ({"metric": "perplexity", "dat": "evaluation"}, r"unknown key 'dat' \(did you mean 'data'\?\)"),
    ],
)
def test_bad_metric_parameters_fail_at_recipe_check(entry, message, write_recipe):
    path = write_recipe(output=None, evaluate=[entry])
    bad = next(key for key in entry if key != "metric")
    lines = path.read_text().splitlines()
    number = next(index for index, line in enumerate(lines, 1) if line.strip().startswith(f"{bad}:"))
    assert f"{path}:{number}:" in assert_user_error(run_cli("recipe", "check", str(path)), message)
