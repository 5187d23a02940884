"""Bad data files, found by `compress recipe check` (or before `compress eval` loads a model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import Fault, copy_tiny_model, data_entry, recipe_argv, recipe_setup, tiny_model, write_recipe

LINE = "The quick brown fox jumps over the lazy dog.\n"
TEXT = LINE * 200
STAGES = [{"method": "gptq", "bits": 4, "group_size": 32}]
"""A calibration stage, so that the recipe's data is read."""


def data_setup(
    name: str, content: bytes, entry: dict[str, Any] | None = None, command: str = "check"
) -> Callable[[Path], list[str]]:
    """A setup writing the data file ``name`` and a recipe whose calibration data is it (``entry``'s keys added)."""

    def setup(work: Path) -> list[str]:
        (work / name).write_bytes(content)
        write_recipe(work, data={"calibration": data_entry(name, **(entry or {}))}, stages=STAGES, evaluate=[])
        return recipe_argv(command)

    return setup


def entry_setup(**entry: Any) -> Callable[[Path], list[str]]:
    """A setup whose recipe's calibration entry reads the tiny text with ``entry``'s keys."""
    return recipe_setup(data={"calibration": data_entry(**entry)}, stages=STAGES, evaluate=[])


def eval_setup(content: bytes) -> Callable[[Path], list[str]]:
    """A setup running ``compress eval`` of the tiny model against itself on the data ``content``."""

    def setup(work: Path) -> list[str]:
        (work / "eval.txt").write_bytes(content)
        model = str(tiny_model())
        return ["eval", model, "--against", model, "--data", "eval.txt", "--samples", "2", "--seq-len", "16"]

    return setup


def without_tokenizer(model: Path) -> None:
    """Remove the model's tokenizer files."""
    for file in model.glob("*token*"):
        file.unlink()


def lines(*records: Any) -> bytes:
    """JSON lines of ``records`` (bytes are written as they are)."""
    return b"".join(record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n" for record in records)


CASES = [
    Fault(
        id="data/empty-text",
        description="an empty text file",
        setup=data_setup("text.txt", b""),
        message="the data file is empty",
        place="text.txt",
    ),
    Fault(
        id="data/empty-text-apply",
        description="`compress apply` with an empty calibration file",
        setup=data_setup("text.txt", b"", command="apply"),
        message="the data file is empty",
        place="text.txt",
        must_not_exist=("out",),
    ),
    Fault(
        id="data/text-too-short",
        description="a 45-byte text file for samples x seq_len = 4 x 32",
        setup=data_setup("text.txt", LINE.encode()),
        message="fewer than samples x seq_len = 4 x 32 = 128",
        place="recipe.yaml:",
    ),
    Fault(
        id="data/seq-len-far-beyond-data",
        description="`seq_len: 1000000` on an 8 KB text file",
        setup=entry_setup(samples=1, seq_len=1_000_000),
        message="fewer than samples x seq_len = 1 x 1000000",
        place="recipe.yaml:",
    ),
    Fault(
        id="data/seq-len-above-max-positions",
        description="`seq_len: 1024` for a model of 256 positions",
        setup=entry_setup(samples=1, seq_len=1024),
        message="seq_len 1024 is more than the model's 256 positions",
        place="recipe.yaml:6:14",
    ),
    Fault(
        id="data/jsonl-seq-len-above-max-positions",
        description="a jsonl entry with the default `seq_len` (512) for a model of 256 positions",
        setup=data_setup("data.jsonl", lines(*[{"text": "hi"}] * 4), {"source": "jsonl", "seq_len": 512}),
        message="seq_len 512 is more than the model's 256 positions",
        place="recipe.yaml:",
    ),
    Fault(
        id="data/text-not-utf8",
        description="a Latin-1 byte on line 3 of a text file",
        setup=data_setup("text.txt", TEXT[:90].encode() + b"caf\xe9\n" + TEXT.encode()),
        message="not UTF-8 text: byte 0xe9 at byte offset 93",
        place="text.txt:3:4",
    ),
    Fault(
        id="data/text-utf16",
        description="a text file saved as UTF-16",
        setup=data_setup("text.txt", TEXT.encode("utf-16")),
        message="not UTF-8 text: byte 0xff at byte offset 0",
        place="text.txt:1:1",
    ),
    Fault(
        id="data/jsonl-not-utf8",
        description="a jsonl record with a Latin-1 byte on line 2",
        setup=data_setup(
            "data.jsonl", lines({"text": "fine"}, b'{"text": "caf\xe9"}\n', *[{"text": "x"}] * 3), {"source": "jsonl"}
        ),
        message="not UTF-8 text: byte 0xe9 at byte offset 30",
        place="data.jsonl:2:14",
    ),
    Fault(
        id="data/jsonl-missing-field",
        description="a jsonl record without the `text` field (line 3)",
        setup=data_setup(
            "data.jsonl", lines({"text": "a"}, {"text": "b"}, {"body": "c"}, {"text": "d"}), {"source": "jsonl"}
        ),
        message="the record has no 'text' (it has 'body')",
        place="data.jsonl:3",
    ),
    Fault(
        id="data/jsonl-missing-answer-field",
        description="a prompt/answer jsonl record without its answer (line 2)",
        setup=data_setup(
            "data.jsonl",
            lines({"q": "Q", "a": "A"}, {"q": "Q"}, *[{"q": "Q", "a": "A"}] * 2),
            {"source": "jsonl", "prompt_field": "q", "answer_field": "a"},
        ),
        message="the record has no 'a'",
        place="data.jsonl:2",
    ),
    Fault(
        id="data/jsonl-field-not-text",
        description="a jsonl record whose `text` is a number",
        setup=data_setup("data.jsonl", lines(*[{"text": 7}] * 4), {"source": "jsonl"}),
        message="'text': expected text, found int",
        place="data.jsonl:1",
    ),
    Fault(
        id="data/jsonl-too-few-records",
        description="2 jsonl records for `samples: 4`",
        setup=data_setup("data.jsonl", lines({"text": "a"}, {"text": "b"}), {"source": "jsonl"}),
        message="has 2 records, fewer than samples = 4",
        place="recipe.yaml:",
    ),
    Fault(
        id="data/jsonl-not-json",
        description="a jsonl line that is not JSON",
        setup=data_setup("data.jsonl", lines({"text": "a"}, b"{text: b}\n"), {"source": "jsonl"}),
        message="not a JSON object",
        place="data.jsonl:2",
    ),
    Fault(
        id="data/jsonl-empty",
        description="an empty jsonl file",
        setup=data_setup("data.jsonl", b"", {"source": "jsonl"}),
        message="the data file is empty",
        place="data.jsonl",
    ),
    Fault(
        id="data/jsonl-blank-lines-only",
        description="a jsonl file of blank lines",
        setup=data_setup("data.jsonl", b"\n \n\n", {"source": "jsonl"}),
        message="has 0 records, fewer than samples = 4",
        place="recipe.yaml:",
    ),
    Fault(
        id="data/chat-not-a-list",
        description="a chat record whose `messages` is a string (line 1)",
        setup=data_setup("chat.jsonl", lines(*[{"messages": "hi"}] * 4), {"source": "chat"}),
        message="expected a list of {role, content} messages",
        place="chat.jsonl:1",
    ),
    Fault(
        id="data/jsonl-no-answer-within-seq-len",
        description="answers-only jsonl whose prompt fills `seq_len: 8` (found with the tokenizer, before weights)",
        setup=data_setup(
            "data.jsonl",
            lines(*[{"q": "a prompt longer than eight tokens", "a": " yes"}] * 4),
            {"source": "jsonl", "prompt_field": "q", "answer_field": "a", "loss_on": "answers", "seq_len": 8},
        ),
        message="no answer token within the first seq_len = 8 tokens",
        place="data.jsonl:1",
    ),
    Fault(
        id="data/chat-without-template",
        description="chat data for a model whose tokenizer has no chat template",
        setup=data_setup(
            "chat.jsonl", lines(*[{"messages": [{"role": "user", "content": "hi"}]}] * 4), {"source": "chat"}
        ),
        message="the model's tokenizer has no chat template",
        place="chat.jsonl:1",
    ),
    Fault(
        id="data/model-without-tokenizer",
        description="`compress apply` with text data for a model saved without its tokenizer",
        setup=recipe_setup(
            command="apply",
            model=lambda work: copy_tiny_model(work, damage=without_tokenizer),
            data={"calibration": data_entry()},
            stages=STAGES,
            evaluate=[],
        ),
        message="text data needs a tokenizer, and the model has none",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="data/eval-not-utf8",
        description="`compress eval --data` on a file with a Latin-1 byte",
        setup=eval_setup(b"caf\xe9\n" + TEXT.encode()),
        message="not UTF-8 text: byte 0xe9 at byte offset 3",
        place="eval.txt:1:4",
    ),
    Fault(
        id="data/eval-empty",
        description="`compress eval --data` on an empty file",
        setup=eval_setup(b""),
        message="the data file is empty",
        place="eval.txt",
    ),
]
