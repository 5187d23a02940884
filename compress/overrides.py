"""``--set KEY=VALUE``: changes to a recipe given beside it (``compress apply``, ``compress recipe
check``, ``compress.apply(..., overrides=[...])``).

KEY is a dotted path into the recipe: mapping keys, and list entries by index or by name
(``stages.0.bits``, ``stages.quantize.bits`` for the stage named ``quantize``, or, no stage being
named so, ``stages.rtn.bits`` for the only stage of method ``rtn``; ``evaluate.kl.data``). VALUE is read as YAML (``3``, ``true``,
``null``, ``out/x``, ``[a, b]``, ``{path: t.txt}``). Every part of KEY but the last must exist in
the recipe, or be a section it leaves out (``run``, ``output``, ``export``); the last may be new (a
parameter the file leaves at its default). The shorthands
``model: NAME`` and an ``evaluate:`` entry ``METRIC`` open up as their mappings when KEY goes into them.

The result is validated like the file itself; a problem at or near a key an override set names
the override beside the file position (``recipe.yaml:4:5 (--set stages.0.bitz=3): unknown key
'bitz'``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from compress.errors import UserError, did_you_mean, one_line
from compress.recipe import Key, LocatedRecipe, Recipe, _compose, expanded


@dataclass(frozen=True)
class Override:
    """One ``--set``: the key's parts and the value."""

    label: str
    """The option as the user gave it, ``--set KEY=VALUE``: how errors name it."""
    parts: tuple[str, ...]
    value: Any


def parse_override(text: str) -> Override:
    """``KEY=VALUE`` as an :class:`Override`; a UserError naming the option when it is malformed."""
    label = f"--set {text}"
    key, equals, value_text = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not equals or not key.strip():
        raise UserError("expected KEY=VALUE, e.g. --set stages.0.bits=3", label)
    if not all(parts):
        raise UserError(f"empty part in key {key.strip()!r}", label)
    try:
        _, value = _compose(value_text, Path(label))
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"value is not valid YAML: {one_line(problem)}", label) from None
    return Override(label, parts, value)


def entry_names(entry: Any) -> tuple[str | None, str | None]:
    """What a list entry is found by: its ``name``, and its ``method`` or ``metric`` (a string entry is its own metric)."""
    if isinstance(entry, str):
        return None, entry
    if not isinstance(entry, dict):
        return None, None
    kind = entry.get("method", entry.get("metric"))
    return entry.get("name"), kind if isinstance(kind, str) else None


def dotted(key: Key) -> str:
    return ".".join(map(str, key)) or "the recipe"


def list_index(entries: list[Any], part: str, key: Key) -> int:
    """The index ``part`` names in the list at ``key``: a number, or an entry's name; a message when none."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(entries) <= index < len(entries):
            count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
            raise ValueError(f"{dotted(key)} has {count}; there is no entry {index}")
        return index % len(entries)
    names = [entry_names(entry) for entry in entries]
    found = [index for index, (name, _) in enumerate(names) if name == part]
    found = found or [index for index, (_, kind) in enumerate(names) if kind == part]
    if not found:
        known = sorted({str(label) for pair in names for label in pair if label is not None})
        raise ValueError(f"{dotted(key)} has no entry named {part!r}{did_you_mean(part, known)}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} entries of {dotted(key)} are named {part!r}; give the index instead")
    return found[0]


def section(schema: type[BaseModel] | None, part: str) -> type[BaseModel] | None:
    """The schema of the section ``part`` of a mapping with schema ``schema`` (``run``, ``output``,
    ``export.hub``): a field typed as a model, or None when ``part`` is no such field."""
    field = schema.model_fields.get(part) if schema is not None else None
    annotation = field.annotation if field is not None else None
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((option for option in options if isinstance(option, type) and issubclass(option, BaseModel)), None)


def set_value(raw: dict[str, Any], override: Override, located: LocatedRecipe) -> Key:
    """Put ``override``'s value into ``raw`` (in place); the key it set, with list entries as indexes.

    A section the recipe leaves out (``run``, ``output``, ``export``) is created when KEY goes into it.
    """
    container: Any = raw
    schema: type[BaseModel] | None = Recipe
    key: Key = ()
    for depth, part in enumerate(override.parts):
        last = depth == len(override.parts) - 1
        try:
            if isinstance(container, list):
                step: str | int = list_index(container, part, key)
                schema = None
            elif isinstance(container, dict):
                step, schema = part, section(schema, part)
                if not last and container.get(part) is None and schema is not None:
                    container[part] = {}
                if not last and part not in container:
                    hint = did_you_mean(part, [str(name) for name in container]) if container else ""
                    raise ValueError(
                        f"unknown key {part!r} in {dotted(key)}{hint}: only the last part of KEY may be new"
                    )
            else:
                raise ValueError(f"{dotted(key)} is {type(container).__name__} {container!r}, which holds no keys")
        except ValueError as error:
            raise UserError(str(error), replace(located.where(key), note=override.label)) from None
        key = (*key, step)
        if last:
            container[step] = override.value
        else:
            container[step] = expanded(key, container[step])
            container = container[step]
    return key


def apply_overrides(located: LocatedRecipe, texts: Sequence[str]) -> LocatedRecipe:
    """``located`` with each ``KEY=VALUE`` of ``texts`` applied in order (a new recipe; ``located``
    is unchanged). File positions of values an override replaced are dropped, so problems there
    are placed at the nearest value the file still holds, with the override named."""
    if not texts:
        return located
    raw = copy.deepcopy(located.raw)
    marks = dict(located.marks)
    changed = dict(located.overrides)
    for text in texts:
        override = parse_override(text)
        key = set_value(raw, override, located)
        marks = {mark: place for mark, place in marks.items() if not replaced_below(mark, key)}
        changed[key] = override.label
    updated = copy.copy(located)  # keeps its class: a recipe given as a mapping places problems its own way
    updated.raw, updated.marks, updated.overrides = raw, marks, changed
    return updated


def replaced_below(mark: Key, key: Key) -> bool:
    """Whether the file position ``mark`` belongs to a value inside the one at ``key``."""
    return len(mark) > len(key) and mark[: len(key)] == key and mark[len(key)] != "__key__"
