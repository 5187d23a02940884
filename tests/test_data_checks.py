"""Data is checked at `compress recipe check`, read with bounded memory, and refused in one line
naming the file and line when it is not UTF-8 (compress.data, compress.validate's data part)."""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoTokenizer

from compress import data as data_module
from compress.cli import cli
from compress.data import JsonLinesSource, TextFileSource, text_chunks
from compress.errors import UserError
from compress.pytest_plugin import TINY_TEXT
from compress.recipe import DataSpec


def refused(result) -> str:
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def recipe(tmp_path: Path, model: Path, entry: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    raw = {
        "model": str(model),
        "data": {"calibration": {"samples": 4, "seq_len": 32, **entry}},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights are read."""
    from compress.checkpoint.loaders import DirectoryLoader

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read before the data was checked")

    monkeypatch.setattr(DirectoryLoader, "load", refuse)


def test_a_huge_text_file_is_checked_and_read_by_its_prefix(tmp_path, tiny_model_dir):
    path = tmp_path / "huge.txt"
    with path.open("wb") as file:
        file.write(TINY_TEXT.encode() * 10)
        file.truncate(4 << 30)  # sparse: 4 GB that take no disk
        file.seek((4 << 30) - 1)
        file.write(b"\xff")  # not UTF-8, far beyond what 4 x 32 tokens need
    spec = DataSpec(path=path, samples=4, seq_len=32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        TextFileSource().check(spec)
        samples = TextFileSource().load(spec, tokenizer)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [sample["input_ids"].shape for sample in samples] == [(32,)] * 4
    assert tokenizer.decode(samples[0]["input_ids"]) == TINY_TEXT[:32]
    assert seconds < 5
    assert peak < 16 * 2**20


def test_text_load_reads_more_while_the_prefix_has_too_few_tokens(tmp_path):
    class HundredBytesAToken:
        def __call__(self, text, add_special_tokens, return_tensors):
            return type("Encoding", (), {"input_ids": torch.arange(len(text) // 100)[None]})

    path = tmp_path / "text.txt"
    path.write_text("x" * (4 * 32 * 100), encoding="utf-8")
    samples = TextFileSource().load(DataSpec(path=path, samples=4, seq_len=32), HundredBytesAToken())
    assert torch.equal(torch.cat([sample["input_ids"] for sample in samples]), torch.arange(128))
    path.write_text("x" * (4 * 32 * 100 - 1), encoding="utf-8")
    with pytest.raises(UserError, match="has 127 tokens, fewer than samples x seq_len = 4 x 32 = 128"):
        TextFileSource().load(DataSpec(path=path, samples=4, seq_len=32), HundredBytesAToken())


def test_utf8_is_checked_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 3)
    path = tmp_path / "text.txt"
    text = "caf\u00e9\nna\u00efve \u20ac\n"
    path.write_text(text, encoding="utf-8")
    assert "".join(text_chunks(path, 1 << 20)) == text  # characters split between chunks are whole
    assert "".join(text_chunks(path, 5)) == "caf\u00e9"
    assert "".join(text_chunks(path, 4)) == "caf"  # the prefix ends at the last whole character
    path.write_bytes(text.encode() + b"ok\n\xe2\x82")
    with pytest.raises(UserError) as error:
        "".join(text_chunks(path, 1 << 20))
    assert str(error.value) == f"{path}:4:1: not UTF-8 text: byte 0xe2 at byte offset 20"
    path.write_bytes(text.encode() + b"\x80")
    with pytest.raises(UserError) as error:
        "".join(text_chunks(path, 1 << 20))
    assert str(error.value) == f"{path}:3:1: not UTF-8 text: byte 0x80 at byte offset 17"


@pytest.mark.parametrize(
    ("content", "entry", "message"),
    [
        (b"", {}, r"recipe.yaml:6:11: the data file is empty: .*text.txt$"),
        (
            b"short text\n",
            {},
            r"recipe.yaml:6:11: has 11 bytes, fewer than samples x seq_len = 4 x 32 = 128 tokens take",
        ),
        (
            TINY_TEXT.encode() + b"\xff" + TINY_TEXT.encode() * 4,
            {"seq_len": 8},
            r"text.txt:2:1: not UTF-8 text: byte 0xff at byte offset 245$",
        ),
        (b"", {"source": "jsonl"}, "the data file is empty"),
        (b'{"text": "a"}\n' * 3, {"source": "jsonl"}, r"recipe.yaml:6:11: has 3 records, fewer than samples = 4: "),
        (
            b'{"text": "a"}\n{"txt": "b"}\n' + b'{"text": "a"}\n' * 2,
            {"source": "jsonl"},
            r"data.jsonl:2: the record has no 'text' \(it has 'txt'\)$",
        ),
        (
            b'{"text": "a"}\n{"text": "\xe9"}\n',
            {"source": "jsonl"},
            r"data.jsonl:2:11: not UTF-8 text: byte 0xe9 at byte offset 24$",
        ),
        (
            b'{"messages": [{"role": "user"}]}\n' * 4,
            {"source": "chat"},
            r"chat.jsonl:1: expected a list of \{role, content\}",
        ),
    ],
)
def test_recipe_check_refuses_bad_data_before_weights(tmp_path, tiny_model_dir, no_weights, content, entry, message):
    name = {"jsonl": "data.jsonl", "chat": "chat.jsonl"}.get(entry.get("source"), "text.txt")
    (tmp_path / name).write_bytes(content)
    path = recipe(tmp_path, tiny_model_dir, {"path": str(tmp_path / name), **entry})
    for command in (["recipe", "check"], ["apply"]):
        line = refused(CliRunner().invoke(cli, [*command, str(path)]))
        assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_jsonl_check_reads_only_the_records_it_takes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in [{"text": "a"}, {"text": "b"}, {"other": 1}]))
    JsonLinesSource().check(DataSpec(path=path, source="jsonl", samples=2))
    with pytest.raises(UserError, match="the record has no 'text'"):
        JsonLinesSource().check(DataSpec(path=path, source="jsonl", samples=3))


def test_seq_len_above_the_models_positions_is_refused_at_its_key(tmp_path, tiny_model_dir, no_weights):
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT * 10, encoding="utf-8")
    path = recipe(tmp_path, tiny_model_dir, {"path": str(text), "samples": 1, "seq_len": 257})
    line = refused(CliRunner().invoke(cli, ["recipe", "check", str(path)]))
    assert line == f"error: {path}:5:14: seq_len 257 is more than the model's 256 positions (max_position_embeddings)"
    path = recipe(tmp_path, tiny_model_dir, {"path": str(text), "samples": 1, "seq_len": 256})
    assert CliRunner().invoke(cli, ["recipe", "check", str(path)]).exit_code == 0


def test_eval_checks_its_data_before_loading_models(tmp_path, tiny_model_dir, no_weights):
    data = tmp_path / "eval.txt"
    data.write_bytes(b"caf\xe9\n" + TINY_TEXT.encode() * 4)
    model = str(tiny_model_dir)
    result = CliRunner().invoke(cli, ["eval", model, "--against", model, "--data", str(data), "--seq-len", "16"])
    assert refused(result) == f"error: {data}:1:4: not UTF-8 text: byte 0xe9 at byte offset 3"


def test_token_counts_are_checked_with_the_tokenizer_before_weights(tmp_path, tiny_lm_dir, no_weights):
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 20, encoding="utf-8")  # 240 bytes, 41 tokens for SmolLM2's tokenizer
    path = recipe(tmp_path, tiny_lm_dir, {"path": str(text), "samples": 2, "seq_len": 100})
    line = refused(CliRunner().invoke(cli, ["recipe", "check", str(path)]))
    assert re.search(r"recipe.yaml:6:11: has 41 tokens, fewer than samples x seq_len = 2 x 100 = 200: ", line), line
    text.write_text("hello world " * 40, encoding="utf-8")
    path = recipe(tmp_path, tiny_lm_dir, {"path": str(text), "samples": 2, "seq_len": 40})
    assert CliRunner().invoke(cli, ["recipe", "check", str(path)]).exit_code == 0


def test_unreadable_recipe_and_data_are_one_line(tmp_path, monkeypatch):
    from compress.recipe import parse_recipe_file

    recipe_file, data = tmp_path / "recipe.yaml", tmp_path / "text.txt"
    recipe_file.write_text("model: x\n")
    data.write_text(TINY_TEXT)
    opened = Path.open

    def refuse(self, *args, **kwargs):  # the tests run as root, whom file modes do not stop
        if self in (recipe_file, data):
            raise PermissionError(13, "Permission denied")
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(UserError) as error:
        parse_recipe_file(recipe_file)
    assert str(error.value) == f"{recipe_file}: cannot read the recipe: Permission denied"
    with pytest.raises(UserError) as error:
        TextFileSource().check(DataSpec(path=data, samples=1, seq_len=8))
    assert str(error.value) == f"{data}: cannot read the data file: Permission denied"


def test_a_jsonl_line_is_read_with_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_LINE_BYTES", 2 << 20)
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n' + json.dumps({"text": "x" * (2 << 20)}) + "\n", encoding="utf-8")
    JsonLinesSource().check(DataSpec(path=path, source="jsonl", samples=1))
    with pytest.raises(UserError) as error:
        JsonLinesSource().check(DataSpec(path=path, source="jsonl", samples=2))
    assert str(error.value) == f"{path}:2: a line longer than 2 MiB"
