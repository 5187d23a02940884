"""``source: hub``: datasets read through the ``datasets`` library, from local dataset directories and
files and from the loopback Hub (tests/hub_server.py), compared with the file sources they reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.data import IGNORE_INDEX, ChatSource, JsonLinesSource, TextFileSource
from compress.errors import UserError
from compress.hub_data import ROW_SEPARATOR, HubDataSource
from compress.pytest_plugin import TINY_TEXT
from compress.recipe import DataSpec
from tests.hub_server import HubServer

ROWS = [f"Row {index}: {TINY_TEXT.strip()}" for index in range(60)]
RECORDS = [{"text": row, "question": f"What is row {i}?", "answer": f" It is row {i}."} for i, row in enumerate(ROWS)]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


@pytest.fixture(autouse=True)
def datasets_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh cache for datasets (which reads HF_DATASETS_CACHE once, at import) and for the Hub."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("COMPRESS_NO_DOWNLOAD", raising=False)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A local dataset directory: train and test splits as JSON-lines data files."""
    directory = tmp_path / "dataset"
    directory.mkdir()
    (directory / "train.jsonl").write_bytes(jsonl(RECORDS[:40]))
    (directory / "test.jsonl").write_bytes(jsonl(RECORDS[40:]))
    return directory


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def hub_spec(path: str | Path, **fields) -> DataSpec:
    return DataSpec(path=path, source="hub", **{"samples": 4, "seq_len": 64, **fields})


def same_samples(left: list[dict], right: list[dict]) -> bool:
    return len(left) == len(right) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(left, right, strict=True)
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_a_text_column_is_packed_as_the_text_source_packs_a_file(dataset_dir, tokenizer, tmp_path, streaming):
    text_file = tmp_path / "joined.txt"
    text_file.write_text(ROW_SEPARATOR.join(ROWS[40:]), encoding="utf-8")
    expected = TextFileSource().load(DataSpec(path=text_file, samples=4, seq_len=64), tokenizer)
    spec = hub_spec(dataset_dir, split="test", streaming=streaming)
    HubDataSource().check(spec)
    assert same_samples(HubDataSource().load(spec, tokenizer), expected)


def test_prompt_and_answer_columns_are_records_as_in_jsonl(dataset_dir, tokenizer, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_bytes(jsonl(RECORDS[:40]))
    fields = {"prompt_field": "question", "answer_field": "answer", "loss_on": "answers"}
    expected = JsonLinesSource().load(
        DataSpec(path=records, source="jsonl", samples=4, seq_len=64, **fields), tokenizer
    )
    samples = HubDataSource().load(hub_spec(dataset_dir, **fields), tokenizer)
    assert same_samples(samples, expected)
    prompt_length = len(tokenizer(RECORDS[0]["question"], add_special_tokens=False).input_ids)
    assert (samples[0]["labels"][:prompt_length] == IGNORE_INDEX).all()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_column_of_chats_is_rendered_as_the_chat_source_renders_records(tokenizer, tmp_path):
    tokenizer.chat_template = CHATML
    chats = [
        {"messages": [{"role": "user", "content": f"Row {i}?"}, {"role": "assistant", "content": ROWS[i][:40]}]}
        for i in range(10)
    ]
    records = tmp_path / "chats.jsonl"
    records.write_bytes(jsonl(chats))
    fields = {"samples": 4, "seq_len": 64, "field": "messages", "loss_on": "answers"}
    expected = ChatSource().load(DataSpec(path=records, source="chat", **fields), tokenizer)
    spec = hub_spec(records, **fields)
    HubDataSource().check(spec)
    assert same_samples(HubDataSource().load(spec, tokenizer), expected)
    assert (expected[0]["labels"] != IGNORE_INDEX).any() and (expected[0]["labels"] == IGNORE_INDEX).any()
    plain = records.with_name("plain.jsonl")
    plain.write_bytes(jsonl(RECORDS))
    with pytest.raises(UserError, match="loss_on: answers needs prompt_field and answer_field, or a column of chats"):
        HubDataSource().check(hub_spec(plain, loss_on="answers"))


def test_streaming_reads_no_row_beyond_those_needed(tmp_path, tokenizer):
    """A row that cannot be read, after enough rows, is never reached; when it is needed it is named."""
    data = tmp_path / "rows.jsonl"
    data.write_bytes(jsonl([{"text": row} for row in ROWS[:20]] + [{"text": 7}]))
    few = hub_spec(data, samples=2, seq_len=64, streaming=True)
    assert len(HubDataSource().load(few, tokenizer)) == 2
    with pytest.raises(UserError, match=r"'text': expected text, found int") as raised:
        HubDataSource().load(hub_spec(data, samples=200, seq_len=64, streaming=True), tokenizer)
    assert raised.value.where == f"{data} [train] row 20"


def test_a_saved_dataset_and_a_single_file(tmp_path, tokenizer, dataset_dir):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(saved))
    expected = HubDataSource().load(hub_spec(dataset_dir / "train.jsonl"), tokenizer)
    assert same_samples(HubDataSource().load(hub_spec(saved), tokenizer), expected)
    splits = tmp_path / "splits"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(splits))
    HubDataSource().check(hub_spec(splits, split="validation"))
    with pytest.raises(UserError, match=r"no split 'train' \(it has: validation\)"):
        HubDataSource().check(hub_spec(splits))


def test_too_few_tokens_or_rows_are_refused(dataset_dir, tokenizer):
    with pytest.raises(UserError, match=r"fewer than samples x seq_len = 100 x 64"):
        HubDataSource().check_tokens(hub_spec(dataset_dir, split="test", samples=100), tokenizer)
    fields = {"prompt_field": "question", "answer_field": "answer"}
    with pytest.raises(UserError, match=r"split 'test' has 20 rows, fewer than samples = 30"):
        HubDataSource().check_tokens(hub_spec(dataset_dir, split="test", samples=30, **fields), tokenizer)


# ----------------------------------------------------------------------------- recipe check, one line each


def write_recipe(tmp_path: Path, model: Path, **data) -> Path:
    recipe = {
        "model": str(model),
        "data": {"calibration": {"source": "hub", "samples": 2, "seq_len": 32, **data}},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.rstrip().splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def recipe_check(path: Path):
    return CliRunner().invoke(cli, ["recipe", "check", str(path)])


def test_recipe_check_accepts_a_hub_data_entry(dataset_dir, tiny_model_dir, tmp_path, compress_host):
    result = recipe_check(write_recipe(tmp_path, tiny_model_dir, path=str(dataset_dir), split="test"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("entry", "message", "key"),
    [
        ({"field": "body"}, "the dataset has no column 'body' (it has: 'text', 'question', 'answer')", "field"),
        (
            {"prompt_field": "question", "answer_field": "reply"},
            "the dataset has no column 'reply' (it has: 'text', 'question', 'answer')",
            "answer_field",
        ),
        ({"split": "validation"}, "no split 'validation' (it has: train, test)", "split"),
        ({"name": "wikitext-2-raw-v1"}, "no configuration 'wikitext-2-raw-v1'", "name"),
    ],
    ids=["column", "answer-column", "split", "configuration"],
)
def test_bad_entries_are_one_line_at_their_key(
    entry, message, key, dataset_dir, tiny_model_dir, tmp_path, compress_host
):
    path = write_recipe(tmp_path, tiny_model_dir, path=str(dataset_dir), **entry)
    line = error_line(recipe_check(path))
    assert message in line
    column = path.read_text().splitlines().index(next(l for l in path.read_text().splitlines() if f" {key}:" in l))
    assert f"recipe.yaml:{column + 1}:" in line
    assert not (tmp_path / "out").exists()


def test_hub_keys_on_a_file_source_are_refused(tiny_model_dir, tiny_text_file, tmp_path, compress_host):
    path = write_recipe(tmp_path, tiny_model_dir, path=str(tiny_text_file), split="test")
    path.write_text(path.read_text().replace("source: hub", "source: text"))
    assert "split is for source: hub; text data reads a file" in error_line(recipe_check(path))


# ----------------------------------------------------------------------------- the loopback Hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with HubServer(token="hf_loopbacktesttoken0123456789") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        server.publish(
            "someone/rows",
            {"data/train.jsonl": jsonl(RECORDS[:40]), "data/test.jsonl": jsonl(RECORDS[40:])},
            kind="dataset",
        )
        yield server


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_through_the_loopback_hub(hub, dataset_dir, tokenizer, streaming):
    expected = HubDataSource().load(hub_spec(dataset_dir, split="test"), tokenizer)
    spec = hub_spec("someone/rows", split="test", streaming=streaming)
    HubDataSource().check(spec)
    assert same_samples(HubDataSource().load(spec, tokenizer), expected)
    assert any(call.startswith("GET /datasets/someone/rows/resolve/") for call in hub.state.calls)


def test_a_hub_dataset_revision(hub, tokenizer):
    old = hub.publish("someone/rows", {"data/train.jsonl": jsonl(RECORDS[:40])}, kind="dataset")
    hub.publish("someone/rows", {"data/train.jsonl": jsonl(RECORDS[20:])}, kind="dataset")
    pinned = HubDataSource().load(hub_spec("someone/rows", revision=old, streaming=True), tokenizer)
    latest = HubDataSource().load(hub_spec("someone/rows", streaming=True), tokenizer)
    assert not same_samples(pinned, latest)
    assert tokenizer.decode(pinned[0]["input_ids"]).startswith("Row 0:")
    assert tokenizer.decode(latest[0]["input_ids"]).startswith("Row 20:")


def test_an_unknown_hub_dataset_and_no_network(hub, tiny_model_dir, tmp_path, monkeypatch, compress_host):
    line = error_line(recipe_check(write_recipe(tmp_path, tiny_model_dir, path="someone/no-such-rows")))
    assert "no such dataset repository on the Hub" in line and "recipe.yaml:" in line
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    line = error_line(recipe_check(write_recipe(tmp_path, tiny_model_dir, path="someone/rows")))
    assert "cannot reach the Hub" in line and "HF_HUB_OFFLINE=1" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(recipe_check(write_recipe(tmp_path, tiny_model_dir, path="someone/rows")))
    assert "HF_HUB_OFFLINE is set" in line


def test_offline_a_hub_dataset_is_read_from_the_prepared_cache(hub, tokenizer, monkeypatch):
    online = HubDataSource().load(hub_spec("someone/rows", split="test"), tokenizer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.state.calls.clear()
    for streaming in (False, True):
        spec = hub_spec("someone/rows", split="test", streaming=streaming)
        HubDataSource().check(spec)
        assert same_samples(HubDataSource().load(spec, tokenizer), online)
    assert hub.state.calls == []
