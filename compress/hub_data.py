"""Datasets read through the ``datasets`` library (``source: hub``): a Hub dataset id, a local dataset
directory (data files, or one written by ``save_to_disk``) or a single data file.

Rows become samples the way the file sources make them (:mod:`compress.data`): a text column
(``field``, default ``text``) is joined with blank lines between rows, as the GPTQ reference
code joins WikiText-2's rows, tokenized as one stream and cut into consecutive windows like
the ``text`` source; with ``prompt_field`` and ``answer_field`` each row is one sample, as a
``jsonl`` record is, and a column of chats (lists of ``{role, content}``) makes one sample a row
rendered with the tokenizer's chat template, as a ``chat`` record is. ``streaming: true`` reads only the rows the samples need instead of
downloading and preparing the whole split; ``compress recipe check`` always streams, so it
reads a few rows, not the dataset.

Hub settings are read when used, as for models (:mod:`compress.hub_download`): ``HF_ENDPOINT``,
and ``HF_HUB_OFFLINE`` or ``COMPRESS_NO_DOWNLOAD``, either of which keeps ``datasets`` to its cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.data import ChatSource, JsonLinesSource, Sample, TokenData, require_tokenizer, token_windows
from compress.errors import UserError, one_line
from compress.hub_download import hub_endpoint, hub_error, local_only, switched_on
from compress.recipe import DataSpec

ROW_SEPARATOR = "\n\n"
"""Between the rows of a text column (the GPTQ reference code's ``"\\n\\n".join(data["text"])``)."""
DEFAULT_SPLIT = "train"
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}
"""The ``datasets`` builder that reads a single data file, by its suffix."""


def offline() -> str | None:
    """Why ``datasets`` may not download now (:func:`compress.hub_download.local_only`, or its own
    ``HF_DATASETS_OFFLINE``), or None."""
    return local_only() or ("HF_DATASETS_OFFLINE is set" if switched_on("HF_DATASETS_OFFLINE") else None)


@contextmanager
def hub_settings() -> Iterator[None]:
    """``datasets``' endpoint and offline switch as the environment says now (it reads them at import)."""
    import datasets.config

    saved = datasets.config.HF_ENDPOINT, datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_ENDPOINT = hub_endpoint() or saved[0]
    datasets.config.HF_HUB_OFFLINE = offline() is not None
    try:
        yield
    finally:
        datasets.config.HF_ENDPOINT, datasets.config.HF_HUB_OFFLINE = saved


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_split(spec: DataSpec, streaming: bool) -> Any:
    """The split ``spec`` names, as a ``datasets`` Dataset, or an IterableDataset when ``streaming``;
    a one-line UserError placed at the key at fault (path, name, revision, split).

    A Hub dataset is looked up first with one request, so that a missing, gated or unreachable one
    is refused at once rather than after ``datasets``' retries. Offline (:func:`offline`), a Hub
    dataset is the copy ``datasets`` prepared in its cache, streamed from there when ``streaming``.
    """
    import datasets

    path, split = spec.path, spec.split or DEFAULT_SPLIT
    offline_hub = not path.exists() and offline() is not None
    if not path.exists() and not offline_hub:
        check_on_hub(spec)
    with hub_settings():
        try:
            if is_saved_dataset(path):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.Dataset):
                    loaded = datasets.DatasetDict({DEFAULT_SPLIT: loaded})
            elif offline_hub:
                loaded = datasets.load_dataset(str(path), name=spec.name, revision=spec.revision)
            else:
                where = {**data_location(path), "name": spec.name, "revision": spec.revision}
                loaded = datasets.load_dataset(**where, streaming=True)  # lazy: only the split names
                if not streaming and split in loaded:
                    loaded = {split: datasets.load_dataset(**where, split=split)}
        except UserError:
            raise
        except Exception as error:
            raise datasets_error(error, spec, offline_hub) from None
    if split not in loaded:
        raise UserError(f"no split {split!r} (it has: {', '.join(loaded)})", "split")
    rows = loaded[split]
    return rows.to_iterable_dataset() if streaming and isinstance(rows, datasets.Dataset) else rows


def check_on_hub(spec: DataSpec) -> None:
    """Refuse, in one line, a path that is neither on disk nor a readable dataset on the Hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(spec.path))
    except HFValidationError:
        raise UserError("no such dataset directory or file (nor a Hub dataset id)", "path") from None
    try:
        HfApi(endpoint=hub_endpoint()).dataset_info(str(spec.path), revision=spec.revision)
    except Exception as error:
        problem = hub_error(error, str(spec.path), "dataset", spec.revision)
        if problem is None:
            raise
        raise UserError(problem.message, "revision" if isinstance(error, RevisionNotFoundError) else "path") from None


def data_location(path: Path) -> dict[str, str]:
    """``load_dataset``'s arguments for ``path``: a data file's builder and the file, else the path itself."""
    if not path.is_file():
        return {"path": str(path)}
    if path.suffix not in BUILDERS:
        raise UserError(f"not a data file datasets reads (it reads {', '.join(BUILDERS)})", str(path))
    return {"path": BUILDERS[path.suffix], "data_files": str(path)}


def datasets_error(error: BaseException, spec: DataSpec, offline_hub: bool) -> UserError:
    """An exception of ``datasets`` (or of huggingface_hub under it) as one line."""
    import datasets.config
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    text = one_line(str(error))
    if offline_hub and isinstance(error, (DatasetNotFoundError, ConnectionError, FileNotFoundError)):
        return UserError(
            f"{offline()} and the dataset is not in datasets' local cache ({datasets.config.HF_DATASETS_CACHE}): "
            "unset it to download",
            "path",
        )
    problem = hub_error(error, str(spec.path), "dataset", spec.revision)
    if problem is not None:
        return UserError(problem.message, "path")
    if isinstance(error, DataFilesNotFoundError):
        return UserError(f"no data files that datasets reads: {text}", "path")
    if "BuilderConfig" in text or "onfig name" in text:
        return UserError(f"no configuration {spec.name!r}: {text.split('. ', 1)[-1]}", "name")
    return UserError(f"datasets cannot read it: {type(error).__name__}: {text}", "path")


def column_names(record: dict) -> str:
    return ", ".join(map(repr, record)) or "none"


class HubDataSource(TokenData):
    """A dataset that the ``datasets`` library loads: a Hub id or a local dataset (see the module)."""

    name = "hub"
    default_field = "text"

    def check(self, spec: DataSpec) -> None:
        """The dataset, configuration and split exist and the first row holds the columns to read
        (a few rows are streamed; nothing is prepared)."""
        first = next(iter(open_split(spec, streaming=True)), None)
        if first is None:
            raise UserError(f"split {spec.split or DEFAULT_SPLIT!r} has no rows", "split")
        keys = ["prompt_field", "answer_field"] if spec.prompt_field else ["field"]
        for key in keys:
            column = getattr(spec, key) or self.default_field
            if column not in first:
                raise UserError(f"the dataset has no column {column!r} (it has: {column_names(first)})", key)
        where = f"{spec.path} [{spec.split or DEFAULT_SPLIT}] row 0"
        if spec.prompt_field is None and isinstance(first[spec.field or self.default_field], list):
            ChatSource().check_record(first, self.column_spec(spec), where)
        elif spec.loss_on == "answers" and spec.prompt_field is None:
            raise UserError("loss_on: answers needs prompt_field and answer_field, or a column of chats, for hub data")

    def check_tokens(self, spec: DataSpec, tokenizer: Any) -> None:
        """Make the samples from streamed rows and drop them: too few tokens or rows are refused early."""
        self.samples(open_split(spec, streaming=True), spec, tokenizer)

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        return self.samples(open_split(spec, streaming=spec.streaming), spec, tokenizer)

    def column_spec(self, spec: DataSpec) -> DataSpec:
        """``spec`` with the text column named, for the file sources' record readers."""
        return (
            spec.model_copy(update={"field": spec.field or self.default_field}) if spec.prompt_field is None else spec
        )

    def samples(self, rows: Any, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        """``spec.samples`` samples from the rows, reading no more of them than needed: a text column
        packed into windows, or one sample a row (prompt and answer columns, or a column of chats)."""
        require_tokenizer(spec, tokenizer)
        split = spec.split or DEFAULT_SPLIT
        numbered = ((f"{spec.path} [{split}] row {index}", row) for index, row in enumerate(rows))
        first = next(numbered, None)
        numbered = itertools.chain([first] if first is not None else [], numbered)
        spec = self.column_spec(spec)
        if spec.prompt_field is None and not (first is not None and isinstance(first[1].get(spec.field), list)):
            return token_windows(spec, tokenizer, TextColumn(numbered, spec.field).prefix)
        reader = JsonLinesSource() if spec.prompt_field is not None else ChatSource()
        samples = reader.samples(itertools.islice(numbered, spec.samples), spec, tokenizer)
        if len(samples) < spec.samples:
            raise UserError(f"split {split!r} has {len(samples)} rows, fewer than samples = {spec.samples}", "split")
        return samples


class TextColumn:
    """A text column's rows joined by :data:`ROW_SEPARATOR`, read from the rows only as far as asked."""

    def __init__(self, rows: Iterator[tuple[str, dict]], column: str) -> None:
        self.rows = rows
        self.column = column
        self.texts: list[str] = []
        self.length = 0
        self.exhausted = False

    def prefix(self, limit: int) -> tuple[str, bool]:
        """The text of the rows read until it is ``limit`` characters long, and whether they are all the rows."""
        while self.length < limit and not self.exhausted:
            row = next(self.rows, None)
            if row is None:
                self.exhausted = True
                break
            where, record = row
            text = record.get(self.column)
            if not isinstance(text, str):
                raise UserError(f"{self.column!r}: expected text, found {type(text).__name__}", where)
            self.texts.append(text)
            self.length += len(text) + len(ROW_SEPARATOR)
        return ROW_SEPARATOR.join(self.texts), self.exhausted
