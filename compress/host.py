"""The plugin host: discovery, loading, broken-plugin reporting, tracing, registries.

Environment switches:

- ``COMPRESS_LOAD_PLUGINS=a,b`` loads only the named entry points (an empty value loads
  none of them; the default plugins inside ``compress`` always load).
- ``COMPRESS_TRACE=1`` prints every hook call and its result to stderr.

A plugin states the plugin API versions it works with in its entry-point module,
``compress_api = ">=2,<3"`` (a version specifier, as a string literal). The host reads
that line from the module's source before importing it and refuses a plugin whose range
excludes :data:`compress.api.API_VERSION`, so a plugin written for another API is
reported as broken, naming both versions, instead of failing on its imports.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from compress import hookspecs
from compress.distributed import is_main_process
from compress.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from compress.checkpoint import Loader
    from compress.recipe import ModelSpec

ENTRY_POINT_GROUP = "compress"
DEFAULT_PLUGINS = (
    "compress.default_plugins.loaders",
    "compress.default_plugins.writers",
    "compress.default_plugins.data_sources",
    "compress.default_plugins.metrics",
    "compress.default_plugins.progress",
)
CONSOLE_PLUGINS = ("compress.default_plugins.progress",)


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded, and why."""

    name: str
    error: str
    requires_api: str | None = None
    """The plugin API versions the plugin asked for, when it was refused for asking others."""


class APIMismatch(Exception):
    """A plugin declares ``compress_api`` versions that exclude this host's (or an unreadable range)."""

    def __init__(self, message: str, required: str) -> None:
        super().__init__(message)
        self.required = required


def required_api(module_name: str) -> str | None:
    """The ``compress_api = "..."`` an entry-point module declares, read from its source
    without running it; None when it declares nothing (or is not a Python source file)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_bytes(), spec.origin)
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == "compress_api" for target in targets):
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            raise APIMismatch(
                f"compress_api must be a string literal ({spec.origin}:{node.lineno})", ast.unparse(value)
            )
    return None


def check_api(required: str) -> None:
    """Raise :class:`APIMismatch` unless this host's API version is in the range ``required``."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    from compress.api import API_VERSION

    try:
        accepted = SpecifierSet(required)
    except InvalidSpecifier:
        raise APIMismatch(f"compress_api {required!r} is not a version range (e.g. '>=2,<3')", required) from None
    if Version(API_VERSION) not in accepted:
        raise APIMismatch(f"requires compress API {required}, but this compress has API {API_VERSION}", required)


class PluginHost:
    """Owns the pluggy manager and the registries that registration hooks fill."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("compress")
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self.versions: dict[str, str] = {}
        self._registries: dict[str, dict[str, Any]] = {}
        if os.environ.get("COMPRESS_TRACE"):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
            self.pm.enable_tracing()

    def load_plugins(self) -> None:
        for module_name in DEFAULT_PLUGINS:
            if module_name in CONSOLE_PLUGINS and not is_main_process():
                continue  # one progress display for a multi-process run
            self.pm.register(__import__(module_name, fromlist=["_"]), name=module_name)
        self._load_entry_points()
        self.pm.check_pending()

    def _load_entry_points(self) -> None:
        allowed = os.environ.get("COMPRESS_LOAD_PLUGINS")
        allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            if allowed_names is not None and entry_point.name not in allowed_names:
                continue
            if self.pm.get_plugin(entry_point.name) is not None:
                continue
            try:
                required = required_api(entry_point.module)
                if required is not None:
                    check_api(required)
                plugin = entry_point.load()
                self.pm.register(plugin, name=entry_point.name)
                self._check_hook_names(entry_point.name)
            except APIMismatch as error:
                self._report_broken(entry_point.name, str(error), error.required)
                continue
            # one broken plugin must not stop the others
            except Exception as error:
                self._report_broken(entry_point.name, f"{type(error).__name__}: {error}")
                continue
            if entry_point.dist is not None:
                self.versions[entry_point.name] = entry_point.dist.version

    def _check_hook_names(self, name: str) -> None:
        """Unregister and raise if plugin ``name`` implements a hook that does not exist."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            plugin = self.pm.unregister(name=name)
            unknown = [attr for attr in dir(plugin) if attr.startswith("compress_") and not hasattr(hookspecs, attr)]
            hint = did_you_mean(unknown[0], [h for h in dir(hookspecs) if h.startswith("compress_")]) if unknown else ""
            raise pluggy.PluginValidationError(plugin, f"unknown hook {', '.join(unknown)}{hint}") from None

    def _report_broken(self, name: str, message: str, requires_api: str | None = None) -> None:
        self.broken.append(BrokenPlugin(name, message, requires_api))
        warnings.warn(f"plugin {name!r} is broken: {message}", stacklevel=3)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object at run time (tests, embedding applications)."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._registries.clear()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._registries.clear()

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def plugins_info(self) -> list[dict[str, Any]]:
        """Each loaded plugin with its hooks, for ``compress plugins``."""
        info = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda pair: pair[0]):
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            info.append({"name": name, "version": self.versions.get(name), "hooks": hooks})
        return info

    def _registry(self, kind: str, hook_name: str, key: Callable[[Any], str]) -> dict[str, Any]:
        if kind not in self._registries:
            found: dict[str, Any] = {}
            owners: dict[str, str] = {}
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():

                def register(item: Any, _owner: str = impl.plugin_name) -> None:
                    item_name = key(item)
                    if item_name in found:
                        raise UserError(
                            f"{kind} {item_name!r} is registered by both plugin "
                            f"{owners[item_name]!r} and plugin {_owner!r}"
                        )
                    found[item_name] = item
                    owners[item_name] = _owner

                self.call_guarded(impl, hook_name, register=register)
            self._registries[kind] = found
        return self._registries[kind]

    def call_guarded(self, impl: Any, hook_name: str, **kwargs: Any) -> None:
        """Call one plugin's implementation of a setup hook; a plugin that raises is reported, not fatal."""
        if os.environ.get("COMPRESS_TRACE"):
            sys.stderr.write(f"{hook_name} [plugin {impl.plugin_name}]\n")
        try:
            impl.function(**{name: value for name, value in kwargs.items() if name in impl.argnames})
        except UserError:
            raise
        except Exception as error:
            self._report_broken(impl.plugin_name, f"{hook_name} raised {type(error).__name__}: {error}")

    def methods(self) -> dict[str, type]:
        return self._registry("method", "compress_register_methods", lambda cls: cls.name)

    def loaders(self) -> dict[str, Any]:
        return self._registry("loader", "compress_register_loaders", lambda obj: obj.name)

    def writers(self) -> dict[str, Any]:
        return self._registry("writer", "compress_register_writers", lambda obj: obj.name)

    def data_sources(self) -> dict[str, Any]:
        return self._registry("data source", "compress_register_data_sources", lambda obj: obj.name)

    def metrics(self) -> dict[str, type]:
        return self._registry("metric", "compress_register_metrics", lambda cls: cls.name)

    def loader_for(self, spec: ModelSpec) -> Loader:
        """The first registered loader that claims ``spec``: how every model (the recipe's, a
        teacher, a written checkpoint read back) is loaded. UserError naming it when none does."""
        from compress.checkpoint import UNKNOWN_MODEL, loader_for

        loader = loader_for(self.loaders().values(), spec)
        if loader is None:
            raise UserError(UNKNOWN_MODEL, spec.name)
        return loader

    def refused_for_api(self) -> str:
        """Why plugins refused for their API versions are missing, as a suffix for an unknown-name message."""
        return "".join(
            f"; plugin {broken.name!r} is not loaded ({broken.error})" for broken in self.broken if broken.requires_api
        )


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, with plugins loaded on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
        _host.load_plugins()
    return _host


def reset_host() -> None:
    """Forget the process-wide host so the next ``get_host()`` rediscovers plugins."""
    global _host
    _host = None
