"""What the unlearning tests share: the generated TOFU-style set, the plugin's host, QA data
entries over it and the forget items as one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import compress_unlearn
from compress.data import Batch, collate
from compress.recipe import DataSpec
from compress_unlearn.data import QASource
from scripts.make_unlearn_data import generate


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> Path:
    """10 authors x 4 questions (scripts.make_unlearn_data): forget10 is one author's 4 items,
    retain90 the other 36."""
    directory = tmp_path_factory.mktemp("qa")
    generate(directory, authors=10, questions=4, seed=0)
    return directory


@pytest.fixture
def host(register_plugin):
    return register_plugin(compress_unlearn, "unlearn")


def qa_entry(path: Path, samples: int, seq_len: int = 128) -> dict[str, Any]:
    """A ``data:`` entry reading ``samples`` QA items of ``path``, the answers as labels."""
    return {"path": str(path), "source": "qa", "samples": samples, "seq_len": seq_len, "loss_on": "answers"}


def forget_batch(qa_data: Path, tokenizer: Any, samples: int) -> Batch:
    """The first ``samples`` forget10 items as one padded batch (input_ids, attention_mask, labels)."""
    items = QASource().load(DataSpec(**qa_entry(qa_data / "forget10.jsonl", samples)), tokenizer)
    return collate(items, tokenizer.eos_token_id)


def local_recipe(recipe: Path, data: Path, models: dict[str, Path], samples: int, directory: Path) -> Path:
    """The shipped ``recipe`` made checkable here, written into ``directory``: its
    ``out/unlearn-data/`` files read from ``data``, each ``out/unlearn-models/NAME`` is
    ``models[NAME]``, at most ``samples`` records per entry and batches of 2 (the same checks
    on less), the output in ``directory/out``."""
    text = recipe.read_text(encoding="utf-8").replace("out/unlearn-data/", f"{data}/")
    for name, model in models.items():
        text = text.replace(f"out/unlearn-models/{name}", str(model))
    raw = yaml.safe_load(text)
    raw["output"]["dir"] = str(directory / "out")
    for entry in raw["data"].values():
        entry["samples"] = min(entry["samples"], samples)
    raw["stages"][0]["batch_size"] = 2
    path = directory / recipe.name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path
