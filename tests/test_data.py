"""Samples, their one collation, the built-in sources and answer-only labels (compress.data)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from compress.data import ChatSource, JsonLinesSource, TextFileSource, collate, model_inputs
from compress.errors import UserError
from compress.recipe import DataSpec
from tests.conftest import WIKITEXT_VALID
from tests.models import tiny_vit_config
from tests.test_bad_input import assert_user_error, run_cli

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path):
    """SmolLM2-135M-Instruct's real tokenizer and chat template."""
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def answer_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample["input_ids"][sample["labels"] != -100])


def test_collate_pads_sequences_and_adds_the_attention_mask():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "weight": torch.tensor([1, 2, 3])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "weight": torch.tensor([4])},
    ]
    batch = collate(samples, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["weight"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_collate_stacks_images_and_class_labels():
    samples = [{"pixel_values": torch.rand(3, 8, 8), "labels": torch.tensor(label)} for label in (3, 7)]
    batch = collate(samples, pad_id=0)
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["labels"].tolist() == [3, 7]
    assert "attention_mask" not in batch
    assert set(model_inputs(batch)) == {"pixel_values"}


def test_collate_refuses_what_it_cannot_batch():
    with pytest.raises(
        UserError, match=r"cannot batch 'pixel_values': samples have shapes \[\(3, 4, 4\), \(3, 8, 8\)\]"
    ):
        collate([{"pixel_values": torch.rand(3, 8, 8)}, {"pixel_values": torch.rand(3, 4, 4)}], pad_id=0)
    with pytest.raises(UserError, match="differ in keys"):
        collate([{"input_ids": torch.tensor([1])}, {"pixel_values": torch.rand(3, 4, 4)}], pad_id=0)


def test_text_windows_are_their_own_labels(tokenizer):
    samples = TextFileSource().load(DataSpec(path=WIKITEXT_VALID, samples=3, seq_len=16), tokenizer)
    assert len(samples) == 3
    for sample in samples:
        assert sample["input_ids"].shape == (16,) and torch.equal(sample["labels"], sample["input_ids"])


def test_jsonl_and_chat_sources(tmp_path, tokenizer):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "hello world"}\n\n{"text": "a much longer line of text here"}\n')
    samples = JsonLinesSource().load(DataSpec(path=texts, samples=2, seq_len=4), tokenizer)
    assert samples[0]["input_ids"].tolist() == tokenizer("hello world", add_special_tokens=False).input_ids
    assert torch.equal(samples[0]["labels"], samples[0]["input_ids"])
    assert len(samples[1]["input_ids"]) == 4
    with pytest.raises(UserError, match="has 2 records, fewer than samples = 3"):
        JsonLinesSource().load(DataSpec(path=texts, samples=3), tokenizer)

    chats = write_lines(tmp_path / "chats.jsonl", [{"messages": CHAT[:2]}])
    (sample,) = ChatSource().load(DataSpec(path=chats, samples=1), tokenizer)
    assert "<|im_start|>assistant" in tokenizer.decode(sample["input_ids"])
    assert torch.equal(sample["labels"], sample["input_ids"])
    chats.write_text('{"messages": "hi"}\n')
    with pytest.raises(UserError, match="list of {role, content} messages"):
        ChatSource().load(DataSpec(path=chats, samples=1), tokenizer)


def test_chat_answers_only_labels_exactly_the_assistant_turns(tmp_path, tokenizer):
    chats = write_lines(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    (sample,) = ChatSource().load(DataSpec(path=chats, source="chat", samples=1, loss_on="answers"), tokenizer)
    assert answer_text(tokenizer, sample) == "Hello there<|im_end|>\n4<|im_end|>\n"
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert sample["input_ids"].tolist() == tokenizer(whole, add_special_tokens=False).input_ids
    labelled = (sample["labels"] != -100).nonzero().flatten().tolist()
    assert torch.equal(sample["labels"][labelled], sample["input_ids"][labelled])
    # the labelled tokens are two contiguous runs, one per assistant turn
    assert sum(1 for a, b in itertools.pairwise(labelled) if b != a + 1) == 1


def test_chat_template_whose_prefixes_differ_is_refused(tmp_path, tokenizer):
    counting = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    counting.chat_template = (
        "{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    chats = write_lines(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    with pytest.raises(UserError, match="renders this chat's first messages differently") as error:
        ChatSource().load(DataSpec(path=chats, source="chat", samples=1, loss_on="answers"), counting)
    assert str(error.value.where) == f"{chats}:1"


def test_jsonl_prompt_and_answer(tmp_path, tokenizer):
    records = [{"q": "Question: 2+2?", "a": " Answer: 4"}, {"q": "Q", "a": " a longer answer here"}]
    path = write_lines(tmp_path / "qa.jsonl", records)
    spec = {"path": path, "source": "jsonl", "samples": 2, "prompt_field": "q", "answer_field": "a"}
    answers = JsonLinesSource().load(DataSpec(**spec, loss_on="answers"), tokenizer)
    assert [answer_text(tokenizer, sample) for sample in answers] == [" Answer: 4", " a longer answer here"]
    assert tokenizer.decode(answers[0]["input_ids"]) == "Question: 2+2? Answer: 4"
    everything = JsonLinesSource().load(DataSpec(**spec), tokenizer)
    assert all(torch.equal(sample["labels"], sample["input_ids"]) for sample in everything)
    assert [len(sample["input_ids"]) for sample in everything] == [len(sample["input_ids"]) for sample in answers]


def test_record_errors_name_the_line(tmp_path, tokenizer):
    path = write_lines(tmp_path / "qa.jsonl", [{"q": "Q", "a": " A"}, {"q": "Q"}])
    spec = DataSpec(path=path, source="jsonl", samples=2, prompt_field="q", answer_field="a", loss_on="answers")
    with pytest.raises(UserError, match=r"the record has no 'a' \(it has 'q'\)") as error:
        JsonLinesSource().load(spec, tokenizer)
    assert str(error.value.where) == f"{path}:2"
    write_lines(path, [{"q": "a long prompt that fills the window", "a": " A"}])
    spec = DataSpec(
        path=path, source="jsonl", samples=1, seq_len=3, prompt_field="q", answer_field="a", loss_on="answers"
    )
    with pytest.raises(UserError, match="no answer token within the first seq_len = 3 tokens"):
        JsonLinesSource().load(spec, tokenizer)
    path.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="not a JSON object but a list"):
        JsonLinesSource().load(DataSpec(path=path, samples=1), tokenizer)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{path: DATA, loss_on: answers}", r"3:6: text data has no fields and no answers"),
        ("{path: DATA, source: jsonl, loss_on: answers}", r"loss_on: answers needs prompt_field and answer_field"),
        (
            "{path: DATA, source: chat, prompt_field: q, answer_field: a}",
            r"prompt_field and answer_field are for jsonl",
        ),
        (
            "{path: DATA, source: jsonl, prompt_field: q}",
            r"data\.d: Value error, prompt_field and answer_field go together",
        ),
        ("{path: DATA, source: jsonl, field: t, prompt_field: q, answer_field: a}", r"field is the whole text"),
        ("{path: DATA, source: jsonl, loss_on: prompts}", r"data\.d\.loss_on: Input should be 'all' or 'answers'"),
    ],
)
def test_bad_answer_options_fail_at_recipe_check(entry, message, write_recipe, tiny_lm_dir, tmp_path):
    data = write_lines(tmp_path / "qa.jsonl", [{"q": "Q", "a": " A"}])
    entry = entry.replace("DATA", str(data))
    path = write_recipe(f"model: {tiny_lm_dir}\ndata:\n  d: {entry}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    line = assert_user_error(run_cli("recipe", "check", str(path)), message)
    assert f"{path}:3:" in line


def test_capture_feeds_pixel_values_to_an_image_model():
    from transformers import ViTForImageClassification

    from compress.sequential import capture_block_inputs, find_blocks, hidden_states

    config = tiny_vit_config(patch_size=4, num_labels=3)
    model = ViTForImageClassification(config).eval()
    samples = [{"pixel_values": torch.rand(3, 16, 16), "labels": torch.tensor(index)} for index in range(3)]
    blocks_name, blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, blocks_name, samples, torch.device("cpu"))
    with torch.no_grad():
        expected = model(**model_inputs(collate(samples, 0)), output_hidden_states=True).hidden_states[0]
    assert len(captured) == 3
    for index, (args, kwargs) in enumerate(captured):
        torch.testing.assert_close(hidden_states(args, kwargs), expected[index : index + 1])
