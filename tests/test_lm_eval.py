"""lm-evaluation-harness as an evaluation, offline: a local multiple-choice task over a local file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import UserError
from compress.validate import check_recipe

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
DOCS = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
ROW = "lm_eval/compress_tiny_mc/acc"


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root


@torch.no_grad()
def accuracy(model, tokenizer) -> float:
    """The task's accuracy computed here: the choice whose continuation (after the harness's
    default target delimiter, a space) has the highest summed log-likelihood."""
    right = 0
    for doc in DOCS:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            log_probs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, :-1].float(), -1)
            targets = torch.tensor(whole[1:])
            scores.append(log_probs[torch.arange(len(targets)), targets][len(context) - 1 :].sum().item())
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(DOCS)


def lm_eval_recipe(**entry):
    return {
        "stages": [{"method": "rtn", "bits": 2, "group_size": 32}],
        "output": {"dir": "out"},
        "evaluate": ["perplexity", {"lm_eval": {"tasks": ["compress_tiny_mc"], "include_path": str(TASKS), **entry}}],
    }


def test_the_harness_measures_the_models_in_memory_into_the_report_and_card(run_recipe):
    result = run_recipe(lm_eval_recipe())
    context = result.context
    row = result.report["evaluation"][ROW]
    assert row["compressed"] == pytest.approx(accuracy(context.model, context.tokenizer))
    assert row["original"] == pytest.approx(accuracy(context.reference_model(), context.tokenizer))
    assert row["data"] == "lm-eval compress_tiny_mc" and row["samples"] == len(DOCS)
    assert "perplexity" in result.report["evaluation"]
    assert json.loads((result.output / "report.json").read_text())["evaluation"][ROW] == row
    assert f"| {ROW} | lm-eval compress_tiny_mc |" in (result.output / "README.md").read_text()


def test_limit_and_no_original_reach_the_harness(run_recipe):
    row = run_recipe(lm_eval_recipe(limit=4, original=False)).report["evaluation"][ROW]
    assert row["samples"] == 4 and "original" not in row


def write_recipe(tmp_path, tiny_model_dir, entry: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\nstages: [{{method: rtn, bits: 4, group_size: 32}}]\nevaluate:\n  - lm_eval:\n{entry}"
    )
    return recipe


def test_an_unknown_task_is_refused_at_recipe_check_with_a_did_you_mean(compress_host, tiny_model_dir, tmp_path):
    """The harness's own task names are indexed once per process (seconds): the CLI test below reuses them."""
    entry = "      tasks: [hellaswg]\n"
    with pytest.raises(UserError) as error:
        check_recipe(compress_host, write_recipe(tmp_path, tiny_model_dir, entry))
    assert error.value.message == "unknown lm-eval task 'hellaswg' (did you mean 'hellaswag'?)"
    assert str(error.value.where).endswith("recipe.yaml:5:14")


def test_a_missing_harness_is_one_line_naming_the_extra(compress_host, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # import fails as if not installed
    with pytest.raises(UserError) as error:
        check_recipe(compress_host, write_recipe(tmp_path, tiny_model_dir, "      tasks: [hellaswag]\n"))
    assert error.value.message == "lm-evaluation-harness is not installed: pip install 'compress[lm-eval]'"
    assert str(error.value.where).endswith("recipe.yaml:5:7")


def test_compress_eval_runs_task_files_on_both_models(compress_host, tiny_model_dir):
    task_file = str(TASKS / "tiny_mc.yaml")
    model = str(tiny_model_dir)
    argv = ["eval", model, "--against", model, "--lm-eval", task_file, "--lm-eval-limit", "6", "--json"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout[result.stdout.index("{") :])["evaluation"][ROW]
    assert row["original"] == row["compressed"] and row["samples"] == 6


def test_compress_eval_refuses_an_unknown_task_before_loading(compress_host, tiny_model_dir):
    model = str(tiny_model_dir)
    result = CliRunner().invoke(cli, ["eval", model, "--against", model, "--lm-eval", "hellaswg"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --lm-eval: unknown lm-eval task 'hellaswg' (did you mean 'hellaswag'?)"
