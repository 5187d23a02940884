"""The one path from a recipe and its overrides to a checked recipe and a finished run.

``compress apply``, ``compress recipe check`` and the Python API (:func:`compress.apply`) all
go through :func:`locate`, :func:`check` and :func:`run`, so a recipe given as a file, a mapping
or a :class:`~compress.recipe.Recipe`, with or without ``--set`` overrides, is validated and run
the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import Location, UserError
from compress.host import PluginHost, get_host
from compress.overrides import apply_overrides, dotted
from compress.recipe import Key, LocatedRecipe, Recipe, parse_recipe_file

if TYPE_CHECKING:
    from compress.context import Report
    from compress.validate import CheckedRecipe

RecipeSource = str | os.PathLike[str] | Mapping[str, Any] | Recipe
"""A recipe file's path, a mapping shaped like a recipe file, or a :class:`~compress.recipe.Recipe`."""


class MappingRecipe(LocatedRecipe):
    """A recipe given as a Python mapping: problems are placed by their dotted key, e.g.
    ``<mapping> stages.0.bits``, as there is no file position to give."""

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__(Path("<mapping>"), raw, {})

    def where(self, key: Key) -> Location:
        return self.noted(Location(mapping_place(key)), key)


def mapping_place(key: Key) -> str:
    """Where ``key`` is in a recipe given as a mapping: ``<mapping> stages.0.bits``."""
    return "<mapping>" + (f" {dotted(key)}" if key else "")


def plain(value: Any, key: Key = ()) -> Any:
    """``value`` as what a YAML file can hold (paths become strings, tuples lists); a UserError
    naming the key of anything else."""
    if isinstance(value, Mapping):
        return {str(name): plain(item, (*key, str(name))) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item, (*key, index)) for index, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise UserError(
        f"a recipe holds text, numbers, booleans, lists and mappings, not {type(value).__name__}",
        mapping_place(key),
    )


def locate(source: RecipeSource, overrides: Sequence[str] = ()) -> LocatedRecipe:
    """Read ``source`` (parsing a file, copying a mapping) and apply ``overrides`` (``KEY=VALUE``)."""
    if isinstance(source, Recipe):
        source = source.model_dump(mode="json", exclude_unset=True)
    if isinstance(source, Mapping):
        located: LocatedRecipe = MappingRecipe(plain(source))
    elif isinstance(source, str | os.PathLike):
        located = parse_recipe_file(Path(source))
    else:
        raise UserError(f"a recipe is a file path, a mapping or a Recipe, not {type(source).__name__}")
    return apply_overrides(located, overrides)


def check(
    source: RecipeSource, overrides: Sequence[str] = (), overwrite: bool = True, host: PluginHost | None = None
) -> CheckedRecipe:
    """Everything ``compress recipe check`` checks (no weights read); a located UserError on a problem."""
    from compress.validate import check_recipe

    return check_recipe(host or get_host(), locate(source, overrides), overwrite=overwrite)


def run(
    source: RecipeSource,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
    host: PluginHost | None = None,
) -> Report:
    """Check and run a recipe as ``compress apply`` does; the finished run's report."""
    from compress.engine import apply_recipe

    host = host or get_host()
    checked = check(source, overrides, overwrite=overwrite, host=host)
    return apply_recipe(host, checked, overwrite=overwrite, resume=resume).report
