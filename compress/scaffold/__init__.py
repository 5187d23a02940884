"""``compress plugins new NAME``: a third-party plugin distribution, ready to install.

The files come from the templates in ``template/`` (package data), with ``${...}``
placeholders (:class:`string.Template`) filled from the distribution name and the plugin
API version: a pyproject.toml declaring the ``compress`` entry point, a package with one
working data-free method importing only :mod:`compress.api`, a test using the fixtures of
:mod:`compress.pytest_plugin`, a recipe and a README.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import asdict, dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from compress.api import API_VERSION
from compress.checkpoint.atomic import atomic_directory
from compress.errors import UserError

# PEP 508 / the packaging specification's rule for distribution names
DISTRIBUTION_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
TEMPLATE_SUFFIX = ".tmpl"


@dataclass(frozen=True)
class PluginNames:
    """The names a scaffolded plugin uses, all derived from its distribution name."""

    distribution: str
    """As given, e.g. ``compress-myplugin``."""
    package: str
    """The import name, e.g. ``compress_myplugin``."""
    entry_point: str
    """The plugin's name in ``compress plugins``, e.g. ``myplugin``."""
    method: str
    """The recipe's ``method:`` value, e.g. ``myplugin_magnitude``."""


def plugin_names(distribution: str) -> PluginNames:
    """Derive the names, or raise UserError for a name pip or Python would refuse."""
    if not DISTRIBUTION_NAME.match(distribution):
        raise UserError(
            "not a valid distribution name (letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit)",
            distribution,
        )
    package = re.sub(r"[-_.]+", "_", distribution).lower()
    if not package.isidentifier() or keyword.iskeyword(package):
        raise UserError(f"its package name {package!r} is not a Python identifier", distribution)
    if importlib.util.find_spec(package) is not None:
        raise UserError(f"a module named {package!r} is already importable; choose another name", distribution)
    entry_point = package.removeprefix("compress_") or package
    return PluginNames(distribution, package, entry_point, f"{entry_point}_magnitude")


def api_range() -> str:
    """The plugin API versions a new plugin declares it works with: this compress's major version."""
    major = int(API_VERSION.split(".")[0])
    return f">={major},<{major + 1}"


def _render(source: Traversable, destination: Path, names: PluginNames) -> None:
    for item in source.iterdir():
        target_name = names.package if item.name == "package" else item.name.removesuffix(TEMPLATE_SUFFIX)
        if item.is_dir():
            (destination / target_name).mkdir()
            _render(item, destination / target_name, names)
        else:
            text = Template(item.read_text(encoding="utf-8")).substitute(asdict(names), compress_api=api_range())
            (destination / target_name).write_text(text, encoding="utf-8")


def scaffold_plugin(distribution: str, parent: Path) -> Path:
    """Create ``parent/distribution`` with the plugin's files; returns that directory."""
    names = plugin_names(distribution)
    target = Path(parent) / distribution
    if target.exists():
        raise UserError("already exists; choose another name or --dir", str(target))
    with atomic_directory(target, overwrite=False) as staging:
        _render(files(__name__) / "template", staging, names)
    return target
