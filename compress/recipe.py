"""Recipe files: safe YAML parsing that remembers where every value came from, and the schema.

Parsing and the schema check need no plugins and no model; ``compress.validate`` adds
the checks that need them (methods, files, targets).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import Location, UserError, did_you_mean
from compress.sample_data import resolve as resolve_sample

Key = tuple[str | int, ...]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """The checkpoint to compress."""

    name: str = Field(description="built-in name, directory, .gguf file or Hub id (org/name, downloaded once)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are loaded in; auto keeps the checkpoint's"
    )
    task: Literal["causal-lm", "encoder", "image-classification"] | None = Field(
        None, description="model head to load; inferred from config.architectures when unset"
    )
    trust_remote_code: bool = Field(False, description="run the checkpoint's own Python code")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub id")


class DataSpec(Strict):
    """A named dataset: calibration, training or evaluation data."""

    path: Path = Field(
        description="file to read (relative paths are from the working directory), or builtin:NAME for a sample "
        "shipped with compress (builtin:wikitext-2-test); hub: a Hub dataset id, or a local dataset directory "
        "or data file"
    )
    source: str = Field("text", description="data source plugin that reads the file")
    samples: int = Field(128, gt=0, description="number of sequences to take")
    seq_len: int = Field(512, gt=0, description="tokens per sequence (jsonl, chat: the most; longer records are cut)")
    field: str | None = Field(
        None,
        description="jsonl: the key holding the text (default text); chat: the messages (default messages); "
        "hub: the text column (default text)",
    )
    prompt_field: str | None = Field(
        None,
        description="jsonl, hub: the key (column) holding a prompt; a sample is the prompt followed by the "
        "answer_field's text",
    )
    answer_field: str | None = Field(
        None, description="jsonl, hub: the key (column) holding the answer to prompt_field"
    )
    loss_on: Literal["all", "answers"] = Field(
        "all",
        description="the tokens that are labels, which next-token losses and metrics read: all, or "
        "answers only (chat: the assistant turns; jsonl: answer_field)",
    )
    name: str | None = Field(None, description="hub: the dataset's configuration (load_dataset's name)")
    split: str | None = Field(None, description="hub: the split to read (default train)")
    revision: str | None = Field(None, description="hub: the dataset repository's branch, tag or commit")
    streaming: bool = Field(
        False, description="hub: read only the rows the samples need instead of downloading the whole split"
    )

    @field_validator("path", mode="before")
    @classmethod
    def _shipped_sample(cls, value: Any) -> Any:
        return resolve_sample(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prompt_and_answer(self) -> DataSpec:
        if (self.prompt_field is None) != (self.answer_field is None):
            raise ValueError("prompt_field and answer_field go together")
        if self.prompt_field is not None and self.field is not None:
            raise ValueError("field is the whole text; give it or prompt_field and answer_field, not both")
        return self


class Stage(BaseModel):
    """One stage: a method, the modules it acts on and the method's own parameters."""

    model_config = ConfigDict(extra="allow")

    method: str
    name: str | None = None
    targets: list[str] | None = None
    ignore: list[str] | None = None
    scheme: str | None = Field(
        None,
        description="a preset quantization scheme (W4A16, W8A8, ...: compress.presets) that sets the "
        "method's grid parameters; keys the stage gives itself take precedence",
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        return self.name or self.method


class OutputSpec(BaseModel):
    """Where and how to write; keys beyond these are the writer's own options."""

    model_config = ConfigDict(extra="allow")

    dir: Path = Field(description="directory the compressed checkpoint is written to")
    format: str = Field("dense", description="checkpoint writer plugin (compress plugins lists them)")
    max_shard_size: str = Field("2GB", description="largest safetensors shard, e.g. 500MB")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", value, re.IGNORECASE):
            raise ValueError("must be a number and a unit: KB, MB, GB or TB (e.g. 500MB)")
        return value


class RunSpec(Strict):
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N")
    mode: Literal["sequential", "whole", "lazy"] = Field(
        "sequential",
        description="sequential streams one block at a time through the device; whole moves the whole model there; "
        "lazy reads each block from the checkpoint's shards when it is needed and writes the output as the "
        "blocks finish, so host memory holds a few blocks, not the model (docs/design-notes.md)",
    )
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class MetricSpec(BaseModel):
    """An ``evaluate:`` entry: a metric, the data it reads, and the metric's own parameters."""

    model_config = ConfigDict(extra="allow")

    metric: str
    data: str = "evaluation"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class HubExport(Strict):
    """Upload the output directory to the Hugging Face Hub after it is written (``compress push``)."""

    repo_id: str = Field(description="the Hub repository, e.g. user/model-w4g64; created when missing")
    private: bool = Field(False, description="create the repository private (an existing one keeps its visibility)")
    revision: str | None = Field(None, description="branch to commit to (created when missing); default main")


class ExportSpec(Strict):
    hub: HubExport | None = None


class Recipe(Strict):
    model: ModelSpec
    data: dict[str, DataSpec] = Field(default_factory=dict)
    stages: list[Stage] = Field(
        default_factory=list,
        description="methods in order; none when the output format alone compresses (e.g. nf4)",
    )
    output: OutputSpec | None = None
    evaluate: list[MetricSpec] = Field(default_factory=list)
    run: RunSpec = Field(default_factory=RunSpec)
    export: ExportSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = dict(raw)
            if "model" in raw:
                raw["model"] = expanded(("model",), raw["model"])
            if isinstance(raw.get("evaluate"), list):
                raw["evaluate"] = [expanded(("evaluate", i), item) for i, item in enumerate(raw["evaluate"])]
        return raw

    @model_validator(mode="after")
    def _does_something(self) -> Recipe:
        if not self.stages and self.output is None:
            raise ValueError("a recipe needs stages, an output, or both")
        if self.export is not None and self.output is None:
            raise ValueError("export needs an output directory to upload")
        return self


def expanded(key: Key, value: Any) -> Any:
    """The mapping a shorthand at ``key`` stands for (``model: NAME`` is ``{name: NAME}``, an
    ``evaluate:`` entry ``METRIC`` is ``{metric: METRIC}`` and ``{METRIC: {params}}`` is
    ``{metric: METRIC, params...}``); any other value unchanged."""
    if isinstance(value, str) and key == ("model",):
        return {"name": value}
    if len(key) == 2 and key[0] == "evaluate" and isinstance(key[1], int):
        if isinstance(value, str):
            return {"metric": value}
        if isinstance(value, dict) and len(value) == 1:
            ((name, params),) = value.items()
            if name not in MetricSpec.model_fields and isinstance(params, dict):
                return {"metric": name, **params}
    return value


class LocatedRecipe:
    """A parsed recipe with the file position of each of its values.

    ``text`` is the file's text; ``overrides`` maps the keys that ``--set`` options changed
    to the option's text (``compress.overrides``), which every position at or under such a
    key, or above it, names.
    """

    def __init__(
        self,
        path: Path,
        raw: Any,
        marks: dict[Key, tuple[int, int]],
        text: str | None = None,
        overrides: dict[Key, str] | None = None,
    ) -> None:
        self.path = path
        self.raw = raw
        self.marks = marks
        self.text = text
        self.overrides = overrides or {}

    def where(self, key: Key) -> Location:
        """The position of the value at ``key``, or of its nearest ancestor that has one."""
        for end in range(len(key), -1, -1):
            if key[:end] in self.marks:
                line, column = self.marks[key[:end]]
                return self.noted(Location(str(self.path), line, column), key)
        return self.noted(Location(str(self.path)), key)

    def noted(self, location: Location, key: Key) -> Location:
        """``location`` naming the overrides that set ``key``, a key above it or (``key`` not the
        root) a key under it: the ones that can have caused a problem found at ``key``."""
        related = [
            text
            for changed, text in self.overrides.items()
            if changed == key[: len(changed)] or (key and key == changed[: len(key)])
        ]
        return replace(location, note=", ".join(related)) if related else location

    def error(self, message: str, key: Key) -> UserError:
        return UserError(message, self.where(key))

    def as_run(self) -> str:
        """The recipe as run, for the output's recipe.yaml: the file's own text when nothing
        changed it, else the effective recipe after a comment naming its source and overrides."""
        if self.text is not None and not self.overrides:
            return self.text
        changes = " ".join(self.overrides.values()).replace("\n", "\\n")
        header = f"# the recipe as run: {self.path}" + (f" with {changes}" if changes else "")
        return header + "\n" + yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True)


MAX_RECIPE_BYTES = 1 << 20
"""The largest recipe file read (recipes are a few KB; this bounds the parser's work)."""
MAX_ALIASES = 100
"""The most ``*alias`` references a recipe may hold."""
MAX_VALUES = 100_000
"""The most values (mappings, sequences, keys and scalars) a recipe may expand to, aliases followed."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and sequences."""


class BoundedLoader(yaml.SafeLoader):
    """The safe loader with bounded work and memory, whatever the document's shape.

    Aliases share nodes, so composing an alias-expansion bomb is cheap, but every pass that
    walks the values (line tracking, the schema) expands it. Each node's expanded size is
    counted as it is composed, so a document is refused at the node where it grows past
    :data:`MAX_VALUES`, before anything walks it; alias count and nesting depth are bounded,
    and an alias to a node that is still open (a recursive document) is refused.
    """

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self.path = path
        self.expanded: dict[int, int] = {}
        self.alias_count = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"too many aliases (more than {MAX_ALIASES})", event.start_mark
                )
            anchored = self.anchors.get(event.anchor)
            if anchored is not None and id(anchored) not in self.expanded:
                raise yaml.composer.ComposerError(
                    None, None, f"recursive alias *{event.anchor} (inside its own anchor)", event.start_mark
                )
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            self.refuse_duplicate_keys(node)
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self.expanded[id(child)] for child in children)
        if size > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this to more than {MAX_VALUES} values", node.start_mark
            )
        self.expanded[id(node)] = size
        return node

    def refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """Refuse a key written twice in one mapping (before merge keys are flattened into it)."""
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                mark = key_node.start_mark
                raise UserError(
                    f"duplicate key {key_node.value!r}", Location(str(self.path), mark.line + 1, mark.column + 1)
                )
            seen.add(key_node.value)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as error:  # more digits than int() converts
            raise yaml.constructor.ConstructorError(None, None, str(error).split(";")[0], node.start_mark) from None


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def read_utf8(path: Path, data: bytes) -> str:
    """``data`` (read from ``path``) as text; a one-line UserError naming the line and byte offset if it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(path, data, error) from None


def not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, offset: int = 0, line: int = 1) -> UserError:
    """The UserError for ``error`` raised decoding ``data``, which starts at byte ``offset`` and line ``line`` of ``path``."""
    start = error.start
    line += data.count(b"\n", 0, start)
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return UserError(
        f"not UTF-8 text: byte 0x{data[start]:02x} at byte offset {offset + start}", Location(str(path), line, column)
    )


def _collect_marks(node: yaml.Node, key: Key, marks: dict[Key, tuple[int, int]]) -> None:
    marks[key] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        # merged keys come first, so a key the mapping writes itself overrides a merged one's mark
        for key_node, value_node in node.value:
            name = key_node.value
            # a key's own position is better than its value's for "unknown key" errors
            marks[(*key, name, "__key__")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _collect_marks(value_node, (*key, name), marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_marks(item, (*key, index), marks)


def _compose(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """The document's node graph and its Python value, read by :class:`BoundedLoader`."""
    loader = BoundedLoader(text, path)
    try:
        node = loader.get_single_node()
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def parse_recipe_file(path: Path) -> LocatedRecipe:
    """Read a recipe with the safe YAML loader, keeping line and column of every value.

    The work and memory are bounded whatever the file holds: its size, aliases, their
    expansion and the nesting depth are limited (:class:`BoundedLoader`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe file not found", str(path))
    try:
        with path.open("rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise UserError(f"cannot read the recipe: {error.strerror}", str(path)) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a few KB", str(path))
    text = read_utf8(path, data)
    try:
        node, raw = _compose(text, path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = Location(str(path), mark.line + 1, mark.column + 1) if mark else Location(str(path))
        raise UserError(f"invalid YAML: {error.problem}", where) from None
    except yaml.reader.ReaderError as error:
        before = text[: error.position]
        line, column = before.count("\n") + 1, error.position - before.rfind("\n")
        character = f"U+{error.character:04X}" if isinstance(error.character, int) else repr(error.character)
        raise UserError(
            f"invalid YAML: character {character} is not allowed", Location(str(path), line, column)
        ) from None
    if not isinstance(raw, dict):
        raise UserError("a recipe is a mapping with model, stages and output", Location(str(path), 1, 1))
    marks: dict[Key, tuple[int, int]] = {}
    _collect_marks(node, (), marks)
    return LocatedRecipe(path, raw, marks, text)


def pydantic_error(
    error: ValidationError, located: LocatedRecipe, prefix: Key = (), keys: list[str] | None = None
) -> UserError:
    """The first problem of a pydantic error as a located one-line UserError.

    ``keys`` are the valid keys of the mapping at ``prefix``, for a did-you-mean on an unknown one.
    """
    first = error.errors()[0]
    key = prefix + tuple(part for part in first["loc"] if not str(part).startswith("function-"))
    if first["type"] == "extra_forbidden":
        field = key[-1]
        hint = did_you_mean(str(field), keys) if keys and len(key) == len(prefix) + 1 else ""
        return UserError(f"unknown key {field!r}{hint}", _key_where(located, key))
    if first["type"] == "missing":
        return UserError(f"missing required key {key[-1]!r}", located.where(key[:-1]))
    dotted = ".".join(str(part) for part in key)
    return UserError(f"{dotted}: {first['msg']}", located.where(key))


def _key_where(located: LocatedRecipe, key: Key) -> Location:
    parent, field = key[:-1], key[-1]
    mark = located.marks.get((*parent, field, "__key__"))
    if mark:
        return located.noted(Location(str(located.path), *mark), key)
    return located.where(key)


def validate_recipe(located: LocatedRecipe) -> Recipe:
    """Schema-check a parsed recipe (no plugins, no model)."""
    try:
        return Recipe.model_validate(located.raw)
    except ValidationError as error:
        raise pydantic_error(error, located, keys=list(Recipe.model_fields)) from None


def load_recipe(path: Path) -> tuple[Recipe, LocatedRecipe]:
    """Parse and schema-check a recipe file (no plugins, no model)."""
    located = parse_recipe_file(path)
    return validate_recipe(located), located
