"""Layers that only point down: plugins import the public API alone, and the contract
modules import nothing from the engine, checkpoint IO or the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from string import Template

import pytest

import compress.api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(
    [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "compress" / "scaffold" / "template").rglob("*.py.tmpl")]
)
PLUGIN_MAY_IMPORT = {"compress", "compress.api"}
"""``compress`` for the ``hookimpl`` marker only."""

CONTRACT_MODULES = ("compress.api", "compress.method", "compress.context", "compress.hookspecs")
FORBIDDEN_FOR_CONTRACTS = ("compress.engine", "compress.sequential", "compress.cli", "compress.validate")
FORBIDDEN_PACKAGES_FOR_CONTRACTS = ("compress.checkpoint.",)
"""Checkpoint IO: the loaders and writers. ``compress.checkpoint`` itself holds only their
protocols (``Loader``, ``Writer``, ``WriterCapabilities``), which the API re-exports."""


def module_level_imports(path: Path) -> Iterator[tuple[str, int, list[str]]]:
    """``(module, line, names)`` of every import run when ``path`` is imported: not those
    inside functions or under ``if TYPE_CHECKING:``. Relative imports are resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])

    def walk(nodes: list[ast.stmt]) -> Iterator[tuple[str, int, list[str]]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node.lineno, []
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                yield module, node.lineno, [alias.name for alias in node.names]
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                yield from walk(node.body)
                for handler in getattr(node, "handlers", []):
                    yield from walk(handler.body)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)


def all_imports(path: Path) -> Iterator[tuple[str, int, list[str]]]:
    """Every absolute import in ``path``, wherever it is (functions and ``TYPE_CHECKING``
    blocks too); a scaffold template is parsed with its placeholders filled in."""
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".tmpl":
        source = Template(source).safe_substitute(package="package", method="method", entry_point="entry")
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno, [alias.name for alias in node.names]


def plugin_violations(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: the import`` for each import of ``compress`` beyond the API and ``hookimpl``."""
    found = []
    for module, line, names in all_imports(path):
        if not (module == "compress" or module.startswith("compress.")):
            continue
        if module not in PLUGIN_MAY_IMPORT or (module == "compress" and names != ["hookimpl"]):
            imported = f"from {module} import {', '.join(names)}" if names else f"import {module}"
            found.append(f"{path.relative_to(root)}:{line}: {imported} (plugins import compress.api only)")
    return found


def source_of(module: str) -> Path | None:
    """The file of a module of the ``compress`` package, or None for a module outside it."""
    if module != "compress" and not module.startswith("compress."):
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def forbidden(module: str) -> bool:
    return module in FORBIDDEN_FOR_CONTRACTS or module.startswith(FORBIDDEN_PACKAGES_FOR_CONTRACTS)


def contract_violations(start: str) -> list[str]:
    """Chains of module-level imports from ``start`` to a forbidden module, each step as file:line."""
    found = []
    seen = {start}
    queue: list[tuple[str, list[str]]] = [(start, [])]
    while queue:
        module, chain = queue.pop(0)
        path = source_of(module)
        if path is None:
            continue
        for imported, line, names in module_level_imports(path):
            # ``from compress.checkpoint import loaders`` imports a submodule
            targets = [imported, *(f"{imported}.{name}" for name in names if source_of(f"{imported}.{name}"))]
            for target in targets:
                step = [*chain, f"{path.relative_to(ROOT)}:{line} imports {target}"]
                if forbidden(target):
                    found.append(" -> ".join(step))
                elif target not in seen:
                    seen.add(target)
                    queue.append((target, step))
    return found


def test_plugins_and_the_scaffold_import_only_the_public_api():
    assert len(PLUGIN_SOURCES) > 10  # the walk found the plugins and the templates
    violations = [line for path in PLUGIN_SOURCES for line in plugin_violations(path)]
    assert not violations, "\n".join(violations)


def test_the_check_names_the_file_and_line_of_each_private_import(tmp_path):
    path = tmp_path / "plugin.py"
    path.write_text(
        "from compress import hookimpl\nfrom compress.api import Method\n\n"
        "def load():\n    import compress.sequential\n    from compress import errors\n"
    )
    assert plugin_violations(path, tmp_path) == [
        "plugin.py:5: import compress.sequential (plugins import compress.api only)",
        "plugin.py:6: from compress import errors (plugins import compress.api only)",
    ]


@pytest.mark.parametrize("module", CONTRACT_MODULES)
def test_contract_modules_import_nothing_from_the_engine_io_or_cli(module):
    violations = contract_violations(module)
    assert not violations, "\n".join(violations)


def test_the_contract_check_follows_imports_to_the_forbidden_module():
    chains = contract_violations("compress.engine")
    assert any(chain.startswith("compress/engine.py:") and "imports compress.sequential" in chain for chain in chains)


def test_importing_the_api_loads_no_engine_io_or_cli():
    """The same rule, as the interpreter sees it (a fresh process: this one has imported everything)."""
    code = "import sys, compress.api; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [module for module in loaded if module.startswith("compress") and forbidden(module)] == []
    assert "transformers" not in loaded


def test_every_public_name_exists():
    assert [name for name in compress.api.__all__ if not hasattr(compress.api, name)] == []
