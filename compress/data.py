"""Calibration, training and evaluation data: samples, their one collation, and the built-in sources.

A data source turns a recipe's ``data:`` entry into a list of :data:`Sample`; :func:`collate`
makes a :data:`Batch` of samples, and :func:`model_inputs` is the part of a batch a model's
forward pass takes. The calibration capture, the training loop and evaluation all read data
this way, so a source that yields ``pixel_values`` works wherever one that yields
``input_ids`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from compress.errors import UserError
from compress.recipe import DataSpec

Sample = dict[str, torch.Tensor]
"""One example: ``input_ids`` (1-D long) or ``pixel_values`` (C, H, W float), and ``labels``:
for a causal LM a 1-D long tensor as long as ``input_ids``, :data:`IGNORE_INDEX` where the loss
is masked (padding, prompt tokens when only answers are learned); for image classification a
0-d long class index. A source may add extras of its own; models never see them."""

Batch = dict[str, torch.Tensor]
"""Samples collated by :func:`collate`: every key of the samples with a leading batch dimension,
plus ``attention_mask`` (1 on real tokens) when the samples hold ``input_ids``."""

IGNORE_INDEX = -100
"""The label of positions the loss and the metrics skip (``torch.nn.functional.cross_entropy``'s default)."""

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")
"""The keys of a batch that a model's forward pass takes."""


class DataSource(Protocol):
    """Reads a recipe's ``data:`` entry. Register instances with ``compress_register_data_sources``."""

    name: str

    def check(self, spec: DataSpec) -> None:
        """Raise UserError for a spec this source cannot read (a missing file, an option it does not
        support), before any model loads. A UserError without ``where`` is placed at the entry."""

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        """``spec.samples`` samples (see :data:`Sample`), each at most ``spec.seq_len`` tokens long."""

    # Optional: ``check_model(spec, task, config)`` raises UserError when the data cannot feed the
    # recipe's model (a ``task`` model with this config), at ``compress recipe check``.


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """Batch ``samples`` (all with the same keys): the one collation of every data consumer.

    Tensors of equal shape are stacked (``pixel_values``, 0-d class labels, token sequences of
    one length). 1-D tensors of different lengths are right-padded: ``input_ids`` with
    ``pad_id``, ``labels`` with :data:`IGNORE_INDEX`, anything else with 0. When the samples
    hold ``input_ids`` and no ``attention_mask``, one is added, 1 on every real token.
    """
    keys = samples[0].keys()
    for sample in samples:
        if sample.keys() != keys:
            raise UserError(f"samples of one batch differ in keys: {sorted(keys)} and {sorted(sample.keys())}", "data")
    batch: Batch = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(value.shape == values[0].shape for value in values):
            batch[key] = torch.stack(values)
        elif all(value.dim() == 1 for value in values):
            padding = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = pad_sequence(values, batch_first=True, padding_value=padding)
        else:
            shapes = sorted({tuple(value.shape) for value in values})
            raise UserError(f"cannot batch {key!r}: samples have shapes {shapes}", "data")
    if "input_ids" in batch and "attention_mask" not in batch:
        lengths = torch.tensor([sample["input_ids"].numel() for sample in samples])
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["attention_mask"] = (positions < lengths[:, None]).long()
    return batch


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The part of ``batch`` a model's forward pass takes (:data:`MODEL_INPUTS`): no labels, no extras."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


def require_file(spec: DataSpec) -> None:
    if not spec.path.is_file():
        raise UserError("data file not found", str(spec.path))


def require_tokenizer(spec: DataSpec, tokenizer: Any) -> None:
    if tokenizer is None:
        raise UserError(f"{spec.source} data needs a tokenizer, and the model has none", str(spec.path))


class TokenData:
    """Data that is tokenized: it feeds models that read token ids, not image classifiers."""

    def check_model(self, spec: DataSpec, task: str, config: Any) -> None:
        if task == "image-classification":
            raise UserError(f"{spec.source} data holds text, but the model is an image classifier (use source: images)")


class TextFileSource(TokenData):
    """A UTF-8 text file, tokenized as one stream and cut into consecutive windows.

    The windows do not overlap and no special tokens are added, so perplexity over them
    is the usual strided-free evaluation with context length ``seq_len``. Every token is
    a label.
    """

    name = "text"

    def check(self, spec: DataSpec) -> None:
        require_file(spec)
        if spec.loss_on != "all" or spec.field or spec.prompt_field:
            raise UserError("text data has no fields and no answers; loss_on, field, prompt_field are for jsonl/chat")

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        self.check(spec)
        require_tokenizer(spec, tokenizer)
        text = spec.path.read_text(encoding="utf-8")
        needed = spec.samples * spec.seq_len
        # tokenizing a prefix is enough; 8 characters per token is a generous bound
        ids = tokenizer(text[: needed * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < needed:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < needed:
            raise UserError(
                f"has {ids.numel()} tokens, fewer than samples x seq_len = {spec.samples} x {spec.seq_len} = {needed}",
                str(spec.path),
            )
        windows = ids[:needed].view(spec.samples, spec.seq_len)
        return [{"input_ids": window, "labels": window.clone()} for window in windows.unbind(0)]


class JsonLinesSource(TokenData):
    """One JSON object per line, tokenized on its own (no special tokens); the first ``samples`` records.

    A record's ``field`` (default ``text``) is one sample, every token a label. With
    ``prompt_field`` and ``answer_field`` a sample is the prompt's tokens followed by the
    answer's (join them with the whitespace the records hold), and ``loss_on: answers``
    labels only the answer's tokens. Samples are cut to ``seq_len`` tokens and keep their
    own length.
    """

    name = "jsonl"
    default_field = "text"

    def check(self, spec: DataSpec) -> None:
        require_file(spec)
        if spec.loss_on == "answers" and spec.prompt_field is None:
            raise UserError("loss_on: answers needs prompt_field and answer_field for jsonl data")

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        self.check(spec)
        require_tokenizer(spec, tokenizer)
        samples = []
        for where, record in records(spec):
            if len(samples) == spec.samples:
                break
            ids, labels = self.tokenize(record, spec, tokenizer, where)
            ids, labels = ids[: spec.seq_len], labels[: spec.seq_len]
            if spec.loss_on == "answers" and all(label == IGNORE_INDEX for label in labels):
                raise UserError(f"no answer token within the first seq_len = {spec.seq_len} tokens", where)
            samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
        if len(samples) < spec.samples:
            raise UserError(f"has {len(samples)} records, fewer than samples = {spec.samples}", str(spec.path))
        return samples

    def tokenize(self, record: dict, spec: DataSpec, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
        """A record's token ids and their labels."""
        if spec.prompt_field is None:
            ids = encode(text_value(record, spec.field or self.default_field, where), tokenizer)
            return ids, list(ids)
        prompt = encode(text_value(record, spec.prompt_field, where), tokenizer)
        answer = encode(text_value(record, spec.answer_field, where), tokenizer)
        hidden = [IGNORE_INDEX] * len(prompt) if spec.loss_on == "answers" else prompt
        return prompt + answer, hidden + answer


def records(spec: DataSpec) -> Iterator[tuple[str, dict]]:
    """Each non-blank line of a JSON-lines file as ``(file:line, object)``."""
    with spec.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{spec.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"not a JSON object: {error}", where) from None
            if not isinstance(record, dict):
                raise UserError(f"not a JSON object but a {type(record).__name__}", where)
            yield where, record


def field_value(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise UserError(f"the record has no {key!r} (it has {', '.join(map(repr, record)) or 'no keys'})", where)
    return record[key]


def text_value(record: dict, key: str, where: str) -> str:
    value = field_value(record, key, where)
    if not isinstance(value, str):
        raise UserError(f"{key!r}: expected text, found {type(value).__name__}", where)
    return value


def encode(text: str, tokenizer: Any) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


class ChatSource(JsonLinesSource):
    """JSON lines whose ``field`` (default ``messages``) is a chat: ``[{"role", "content"}, ...]``,
    rendered with the tokenizer's own chat template.

    With ``loss_on: answers`` only the assistant turns are labels (each turn's content and the
    template's end-of-turn text). The turns are found by rendering prefixes of the chat: a turn
    spans from the rendering of the messages before it, with the generation prompt, to the
    rendering of the messages up to it. This works with any template whose renderings of a
    chat's prefixes are prefixes of its rendering, in tokens too (a record where that fails
    is refused); templates need no ``{% generation %}`` markers.
    """

    name = "chat"
    default_field = "messages"

    def check(self, spec: DataSpec) -> None:
        require_file(spec)
        if spec.prompt_field is not None:
            raise UserError(
                "prompt_field and answer_field are for jsonl data; a chat's answers are its assistant turns"
            )

    def tokenize(self, record: dict, spec: DataSpec, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
        messages = field_value(record, spec.field or self.default_field, where)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
        ):
            raise UserError("expected a list of {role, content} messages", where)
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("the model's tokenizer has no chat template", where)
        ids = encode(tokenizer.apply_chat_template(messages, tokenize=False), tokenizer)
        if spec.loss_on == "all":
            return ids, list(ids)
        labels = [IGNORE_INDEX] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.prefix_length(messages[:turn], True, ids, tokenizer, where)
            end = self.prefix_length(messages[: turn + 1], False, ids, tokenizer, where)
            labels[start:end] = ids[start:end]
        return ids, labels

    @staticmethod
    def prefix_length(messages: list[dict], generation_prompt: bool, ids: list[int], tokenizer: Any, where: str) -> int:
        """How many of the chat's tokens ``ids`` the rendering of ``messages`` covers."""
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        prefix = encode(rendered, tokenizer)
        if ids[: len(prefix)] != prefix:
            raise UserError(
                "the chat template renders this chat's first messages differently from the whole chat; "
                "cannot find the assistant turns for loss_on: answers",
                where,
            )
        return len(prefix)
