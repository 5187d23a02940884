"""``compress apply`` tokenizes each data entry once: the samples ``compress recipe check`` makes
to count tokens (``DataSource.check_tokens``) are the ones the run uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from compress.data import TextFileSource
from compress.recipe import DataSpec


@pytest.fixture
def tokenizer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per call of any tokenizer (``tokenizer(text)``) from here on."""
    calls: list[int] = []
    tokenize = PreTrainedTokenizerBase.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counted)
    return calls


def test_apply_tokenizes_each_entry_once(run_recipe, tiny_model_dir: Path, tiny_text_file: Path, tokenizer_calls):
    calibration = {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}
    evaluation = {"path": str(tiny_text_file), "samples": 3, "seq_len": 24}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for entry in (calibration, evaluation):
        TextFileSource().load(DataSpec(**entry), tokenizer)
    once = len(tokenizer_calls)
    assert once > 0

    run_recipe(
        {
            "data": {"calibration": calibration, "evaluation": evaluation},
            "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
            "evaluate": ["perplexity"],
        }
    )
    assert len(tokenizer_calls) - once == once
