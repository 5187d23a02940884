"""The commands a user types, on real models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import cli
from tests.conftest import ROOT, WIKITEXT_TEST

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_are_valid(recipe: Path, smollm2_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke("recipe", "check", str(recipe.relative_to(ROOT)))
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": ok")


def test_methods_lists_and_documents(host):
    listing = invoke("methods")
    assert listing.exit_code == 0 and "rtn" in listing.output and "data-free" in listing.output
    doc = invoke("methods", "rtn")
    assert doc.exit_code == 0
    for field in ("bits", "symmetric", "granularity", "group_size"):
        assert field in doc.output
    assert "Literal" in doc.output and "'channel'" in doc.output


def test_eval_compares_a_written_checkpoint_with_its_base(write_recipe, tiny_lm_dir, tmp_path):
    assert invoke("apply", str(write_recipe(evaluate=[]))).exit_code == 0
    result = invoke(
        "eval",
        str(tmp_path / "out"),
        "--against",
        str(tiny_lm_dir),
        "--data",
        str(WIKITEXT_TEST),
        "--samples",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    for metric in ("perplexity", "kl", "top1"):
        assert metric in result.output
    assert "64 (32/seq)" in result.output


def test_eval_reads_a_shipped_sample_as_a_recipe_does(tiny_lm_dir):
    common = ["eval", str(tiny_lm_dir), "--against", str(tiny_lm_dir), "--samples", "2", "--seq-len", "32"]
    result = invoke(*common, "--data", "builtin:wikitext-2-test", "--metric", "perplexity", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    perplexity = json.loads(result.stdout)["evaluation"]["perplexity:eval"]
    assert (perplexity["data"], perplexity["tokens"]) == ("builtin:wikitext-2-test", 64)
    unknown = CliRunner().invoke(cli, [*common, "--data", "builtin:wikitext-3"])
    assert unknown.exit_code == 2
    assert unknown.stderr.strip().splitlines()[-1] == (
        "error: --data: no shipped data sample named 'wikitext-3' (did you mean 'wikitext-2-test'?)"
    )


def test_eval_unknown_metric(tiny_lm_dir):
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tiny_lm_dir),
            "--against",
            str(tiny_lm_dir),
            "--data",
            str(WIKITEXT_TEST),
            "--metric",
            "perplexty",
        ],
    )
    assert result.exit_code == 2
    assert "unknown metric 'perplexty' (did you mean 'perplexity'?)" in result.stderr


def test_too_little_data_is_a_user_error(write_recipe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    recipe = write_recipe(
        data={"evaluation": {"path": str(short), "samples": 2, "seq_len": 64}}, evaluate=["perplexity"]
    )
    result = CliRunner().invoke(cli, ["apply", str(recipe)])
    assert result.exit_code == 2
    assert "fewer than samples x seq_len = 2 x 64 = 128" in result.stderr
    assert not (tmp_path / "out").exists()
    assert os.environ.get("COMPRESS_CACHE")
