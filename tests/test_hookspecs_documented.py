"""Every hook in the plugin contract is a real hookspec, documented in its docstring and in docs/plugins.md.

Meta-tests in the style of datasette's ``test_plugins.py``: adding a hookspec without
documenting it (or documenting a hook that no longer exists) fails here.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from compress import hookspecs

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
MIN_DOCSTRING_CHARS = 60


# (hook, parameter) pairs whose hookspec docstring does not mention the parameter yet.
# Known documentation gaps in compress/hookspecs.py, reported to its owner; remove an
# entry once the docstring is fixed (the test then shows up as XPASS until you do).
def _hook_functions() -> dict[str, object]:
    return {
        name: function
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("compress_") and function.__module__ == hookspecs.__name__
    }


HOOKS = _hook_functions()
HOOK_NAMES = sorted(HOOKS)
HOOK_PARAMETERS = [
    pytest.param(hook, parameter, id=f"{hook}-{parameter}")
    for hook in HOOK_NAMES
    for parameter in inspect.signature(HOOKS[hook]).parameters
]


def _doc_headings() -> list[str]:
    return [line for line in PLUGINS_DOC.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def test_there_are_hooks() -> None:
    assert len(HOOK_NAMES) >= 10, HOOK_NAMES


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_is_marked_as_hookspec(hook: str) -> None:
    assert hasattr(HOOKS[hook], "compress_spec"), f"{hook} lacks the @hookspec decorator"


def test_every_marked_hookspec_has_the_prefix() -> None:
    marked = [
        name
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, "compress_spec")
    ]
    assert marked, "no function in compress.hookspecs is marked as a hookspec"
    assert [name for name in marked if not name.startswith("compress_")] == []


def test_host_knows_every_hook() -> None:
    from compress.host import PluginHost

    host = PluginHost()
    for hook in HOOK_NAMES:
        assert getattr(host.hook, hook).spec is not None, hook


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hookspec_has_docstring(hook: str) -> None:
    docstring = inspect.getdoc(HOOKS[hook]) or ""
    assert len(docstring) >= MIN_DOCSTRING_CHARS, (
        f"{hook}: the docstring must say when the hook is called, what it receives "
        f"and what it returns ({len(docstring)} characters)"
    )


@pytest.mark.parametrize(("hook", "parameter"), HOOK_PARAMETERS)
def test_hookspec_docstring_mentions_parameter(hook: str, parameter: str) -> None:
    docstring = inspect.getdoc(HOOKS[hook]) or ""
    assert re.search(rf"\b{re.escape(parameter)}\b", docstring), (
        f"{hook}: the docstring does not mention its parameter {parameter!r}"
    )


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_has_heading_in_plugins_doc(hook: str) -> None:
    headings = _doc_headings()
    assert any(hook in heading for heading in headings if heading.startswith("### ")), (
        f"docs/plugins.md has no '### `{hook}(...)`' section in its hook reference"
    )


def test_plugins_doc_documents_no_unknown_hook() -> None:
    documented = {
        match
        for heading in _doc_headings()
        if heading.startswith("### ")
        for match in re.findall(r"`(compress_\w+)", heading)
    }
    stale = sorted(documented - set(HOOK_NAMES))
    assert stale == [], f"docs/plugins.md documents hooks that compress.hookspecs does not define: {stale}"
