"""Calibration, training and evaluation data: samples, their one collation, and the built-in sources.

A data source turns a recipe's ``data:`` entry into a list of :data:`Sample`; :func:`collate`
makes a :data:`Batch` of samples, and :func:`model_inputs` is the part of a batch a model's
forward pass takes. The calibration capture, the training loop and evaluation all read data
this way, so a source that yields ``pixel_values`` works wherever one that yields
``input_ids`` does.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from compress.errors import Location, UserError
from compress.recipe import DataSpec, not_utf8

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
        """Raise UserError for a spec this source cannot read (a missing, empty or too short file, an
        option it does not support, a record without the field), before any model loads; read the
        file with bounded memory. A UserError without ``where`` is placed at the entry, one whose
        ``where`` is a key of the entry (``"seq_len"``) at that key, and one whose ``where`` is a
        :class:`compress.errors.Location` (a line of the data file) is reported as it is."""

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        """``spec.samples`` samples (see :data:`Sample`), each at most ``spec.seq_len`` tokens long."""

    # Optional: ``check_model(spec, task, config)`` raises UserError when the data cannot feed the
    # recipe's model (a ``task`` model with this config), at ``compress recipe check``; its
    # ``where`` is read as for ``check``. Optional too: ``check_tokens(spec, tokenizer)``, what
    # needs the model's tokenizer (token counts), at ``compress recipe check`` when the loader
    # gives the tokenizer without the weights (``Loader.load_tokenizer``); what it returns, when not
    # None, are the entry's samples (``load``'s), which the run then uses instead of loading again.


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


MAX_LINE_BYTES = 64 << 20
"""The longest line of a JSON-lines file read."""
BYTES_PER_TOKEN = 8
"""Bytes of text read at first per token needed (English takes about 4); four times more while too few."""
CHUNK_BYTES = 1 << 20
"""How much of a text file is decoded at a time."""


def require_file(spec: DataSpec) -> None:
    """Refuse a data file that is missing, unreadable or empty, and the keys of Hub datasets."""
    hub_keys = [key for key in ("name", "split", "revision") if getattr(spec, key) is not None]
    hub_keys += ["streaming"] if spec.streaming else []
    if hub_keys:
        verb = "is" if len(hub_keys) == 1 else "are"
        raise UserError(f"{', '.join(hub_keys)} {verb} for source: hub; {spec.source} data reads a file", hub_keys[0])
    if not spec.path.is_file():
        raise UserError("data file not found", str(spec.path))
    try:
        spec.path.open("rb").close()
    except OSError as error:
        raise UserError(f"cannot read the data file: {error.strerror}", str(spec.path)) from None
    if spec.path.stat().st_size == 0:
        raise UserError("the data file is empty", str(spec.path))


def text_chunks(path: Path, limit: int) -> Iterator[str]:
    """The UTF-8 text of ``path``'s first ``limit`` bytes (up to the last whole character), in chunks
    of about :data:`CHUNK_BYTES`; a UserError naming the line and byte offset where it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as file:
        while offset < limit:
            data = file.read(min(CHUNK_BYTES, limit - offset))
            pending = decoder.getstate()[0]  # the start of a character split by the last chunk
            try:
                yield decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:
                raise not_utf8(path, pending + data, error, offset - len(pending), line) from None
            if not data:
                return
            offset += len(data)
            line += data.count(b"\n")


def require_tokenizer(spec: DataSpec, tokenizer: Any) -> None:
    if tokenizer is None:
        raise UserError(f"{spec.source} data needs a tokenizer, and the model has none", str(spec.path))


class TokenData:
    """Data that is tokenized: it feeds models that read token ids, not image classifiers."""

    def check_model(self, spec: DataSpec, task: str, config: Any) -> None:
        """Text feeds no image classifier, and no sequence may be longer than the model's positions."""
        if task == "image-classification":
            raise UserError(f"{spec.source} data holds text, but the model is an image classifier (use source: images)")
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and spec.seq_len > positions:
            raise UserError(
                f"seq_len {spec.seq_len} is more than the model's {positions} positions (max_position_embeddings)",
                "seq_len",
            )

    def check_tokens(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        """Make the samples: too few tokens, no answer within ``seq_len`` or a chat template that
        does not fit is refused before the weights load; the run starts from the samples."""
        return self.load(spec, tokenizer)


class TextFileSource(TokenData):
    """A UTF-8 text file, tokenized as one stream and cut into consecutive windows.

    The windows do not overlap and no special tokens are added, so perplexity over them
    is the usual strided-free evaluation with context length ``seq_len``. Every token is
    a label.
    """

    name = "text"

    def check(self, spec: DataSpec) -> None:
        """The file exists, is long enough for ``samples x seq_len`` tokens at one byte a token at least,
        and the part of it that :meth:`load` reads first is UTF-8 (streamed, not held)."""
        require_file(spec)
        if spec.loss_on != "all" or spec.field or spec.prompt_field:
            raise UserError("text data has no fields and no answers; loss_on, field, prompt_field are for jsonl/chat")
        size, needed = spec.path.stat().st_size, spec.samples * spec.seq_len
        if size < needed:
            raise UserError(
                f"has {size} bytes, fewer than samples x seq_len = {spec.samples} x {spec.seq_len} = {needed} "
                "tokens take (a token is at least one byte)",
                str(spec.path),
            )
        for _ in text_chunks(spec.path, needed * BYTES_PER_TOKEN):
            pass

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        self.check(spec)
        require_tokenizer(spec, tokenizer)
        size = spec.path.stat().st_size
        return token_windows(spec, tokenizer, lambda limit: ("".join(text_chunks(spec.path, limit)), limit >= size))


def token_windows(spec: DataSpec, tokenizer: Any, prefix: Callable[[int], tuple[str, bool]]) -> list[Sample]:
    """``spec.samples`` consecutive, non-overlapping windows of ``spec.seq_len`` tokens from the start
    of a text tokenized as one stream (no special tokens), every token a label.

    ``prefix(limit)`` gives about the first ``limit`` characters of the text and whether that is all
    of it; the prefix tokenized grows (from :data:`BYTES_PER_TOKEN` a token needed, four times
    more each time) while it holds too few tokens, so a long text is never read whole.
    """
    needed = spec.samples * spec.seq_len
    limit = needed * BYTES_PER_TOKEN
    while True:
        text, whole = prefix(limit)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() >= needed or whole:
            break
        limit *= 4
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
        check_records(self, spec)

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        self.check(spec)
        require_tokenizer(spec, tokenizer)
        samples = self.samples(records(spec), spec, tokenizer)
        if len(samples) < spec.samples:
            raise UserError(f"has {len(samples)} records, fewer than samples = {spec.samples}", str(spec.path))
        return samples

    def samples(self, records: Iterable[tuple[Location | str, dict]], spec: DataSpec, tokenizer: Any) -> list[Sample]:
        """One sample per ``(where, record)``, tokenized by :meth:`tokenize` and cut to ``spec.seq_len``
        tokens; a UserError at the record when ``loss_on: answers`` leaves no answer token in it."""
        samples = []
        for where, record in records:
            ids, labels = self.tokenize(record, spec, tokenizer, where)
            ids, labels = ids[: spec.seq_len], labels[: spec.seq_len]
            if spec.loss_on == "answers" and all(label == IGNORE_INDEX for label in labels):
                raise UserError(f"no answer token within the first seq_len = {spec.seq_len} tokens", where)
            samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
        return samples

    def texts(self, record: dict, spec: DataSpec, where: Location) -> list[str]:
        """The record's text, or its prompt and its answer; UserError for a missing field or one that is not text."""
        if spec.prompt_field is None:
            return [text_value(record, spec.field or self.default_field, where)]
        return [text_value(record, spec.prompt_field, where), text_value(record, spec.answer_field, where)]

    def check_record(self, record: dict, spec: DataSpec, where: Location) -> None:
        """Raise UserError for a record :meth:`tokenize` cannot read (at ``compress recipe check``)."""
        self.texts(record, spec, where)

    def tokenize(self, record: dict, spec: DataSpec, tokenizer: Any, where: Location) -> tuple[list[int], list[int]]:
        """A record's token ids and their labels."""
        texts = [encode(text, tokenizer) for text in self.texts(record, spec, where)]
        if len(texts) == 1:
            return texts[0], list(texts[0])
        prompt, answer = texts
        hidden = [IGNORE_INDEX] * len(prompt) if spec.loss_on == "answers" else prompt
        return prompt + answer, hidden + answer


def check_records(source: JsonLinesSource, spec: DataSpec) -> None:
    """The first ``samples`` records are there and ``source`` can read each (no tokenizer needed)."""
    count = 0
    for where, record in records(spec):
        source.check_record(record, spec, where)
        count += 1
    if count < spec.samples:
        raise UserError(f"has {count} records, fewer than samples = {spec.samples}", str(spec.path))


def records(spec: DataSpec) -> Iterator[tuple[Location, dict]]:
    """The first ``spec.samples`` non-blank lines of a JSON-lines file as ``(file:line, object)``, one
    line in memory at a time; no line after them is read."""
    offset, number, count = 0, 0, 0
    with spec.path.open("rb") as lines:
        while count < spec.samples:
            data = lines.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            number += 1
            where = Location(str(spec.path), number)
            if len(data) > MAX_LINE_BYTES:
                raise UserError(f"a line longer than {MAX_LINE_BYTES >> 20} MiB", where)
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise not_utf8(spec.path, data, error, offset, number) from None
            offset += len(data)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"not a JSON object: {error}", where) from None
            if not isinstance(record, dict):
                raise UserError(f"not a JSON object but a {type(record).__name__}", where)
            count += 1
            yield where, record


def field_value(record: dict, key: str, where: Location) -> Any:
    if key not in record:
        raise UserError(f"the record has no {key!r} (it has {', '.join(map(repr, record)) or 'no keys'})", where)
    return record[key]


def text_value(record: dict, key: str, where: Location) -> str:
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
        check_records(self, spec)

    def check_record(self, record: dict, spec: DataSpec, where: Location) -> None:
        self.messages(record, spec, where)

    def messages(self, record: dict, spec: DataSpec, where: Location) -> list[dict]:
        """The record's chat; UserError unless it is a list of ``{role, content}`` messages."""
        messages = field_value(record, spec.field or self.default_field, where)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
        ):
            raise UserError("expected a list of {role, content} messages", where)
        return messages

    def tokenize(self, record: dict, spec: DataSpec, tokenizer: Any, where: Location) -> tuple[list[int], list[int]]:
        messages = self.messages(record, spec, where)
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
    def prefix_length(
        messages: list[dict], generation_prompt: bool, ids: list[int], tokenizer: Any, where: Location
    ) -> int:
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
