"""compress: plugin-based model compression. Recipes in, Hugging Face checkpoints out.

A plugin imports :data:`hookimpl` from here and everything else it needs from
:mod:`compress.api`. Scripts call :func:`apply`. Importing this package stays cheap: torch,
transformers and the plugins load on the first call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from compress.context import Report
    from compress.recipe import Recipe

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("compress")
"""Decorator that marks a function as an implementation of a ``compress_*`` hook."""


def apply(
    recipe: str | PathLike[str] | Mapping[str, Any] | Recipe,
    *,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> Report:
    """Run a recipe as ``compress apply`` does and return its report.

    ``recipe`` is a recipe file's path, a mapping shaped like a recipe file (relative paths
    are from the working directory) or a :class:`compress.recipe.Recipe`; ``overrides`` are
    ``KEY=VALUE`` strings, as ``--set`` takes them; ``overwrite`` and ``resume`` are
    ``--overwrite`` and ``--resume``. The :class:`compress.context.Report` returned is what
    report.json holds (``report.to_json()`` is that dict): ``model``, ``stages`` (one
    :class:`compress.context.StageRecord` each), ``totals``, ``evaluation``, ``environment``
    and ``recipe`` (its source and overrides). Bad input raises
    :class:`compress.errors.UserError` (its ``str`` is the CLI's ``error:`` line) before
    anything is written.
    """
    from compress.runner import run

    return run(recipe, overrides, overwrite=overwrite, resume=resume)


__all__ = ["__version__", "apply", "hookimpl"]
