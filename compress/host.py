"""The plugin host: discovery, loading, broken-plugin reporting, tracing, registries.

Environment switches:

- ``COMPRESS_LOAD_PLUGINS=a,b`` loads only the named entry points (an empty value loads
  none of them; the default plugins inside ``compress`` always load). A name that no
  installed entry point has is a :class:`UserError` with a did-you-mean.
- ``COMPRESS_TRACE=1`` prints every hook call to stderr.

Isolation: an entry point whose import raises anything (``sys.exit`` included, only
``KeyboardInterrupt`` passes), a registration hook that raises or registers something
that lacks what its registry needs, and an observer (lifecycle hook) that raises are each
reported as a broken plugin, one ``warning:`` line on stderr; the other plugins go on.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from compress import hookspecs
from compress.distributed import is_main_process
from compress.errors import UserError, did_you_mean, one_line

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
LIFECYCLE_HOOKS = frozenset(
    {
        "compress_run_start",
        "compress_stage_start",
        "compress_block_done",
        "compress_stage_progress",
        "compress_stage_end",
        "compress_phase_start",
        "compress_phase_end",
        "compress_run_end",
        "compress_run_failed",
    }
)


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded, and why."""

    name: str
    error: str
    requires_api: str | None = None
    """The plugin API versions the plugin asked for, when it was refused for asking others."""


@dataclass(frozen=True)
class Conflict:
    """Two plugins registered the same name in one registry."""

    kind: str
    name: str
    owners: tuple[str, str]

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.name!r} is registered by both plugin {self.owners[0]!r} and plugin {self.owners[1]!r}"
        )


def describe(error: BaseException) -> str:
    """An exception as one line: its type and message (``SystemExit: 3``)."""
    message = one_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def method_lacks(item: Any) -> str | None:
    """What a registered method class lacks, or None when it is complete."""
    from typing import get_args

    from pydantic import BaseModel

    from compress.method import Method, MethodKind

    if not (isinstance(item, type) and issubclass(item, Method)):
        return f"{item!r} is not a compress.api.Method subclass"
    kinds = get_args(MethodKind)
    lacks = []
    if not isinstance(getattr(item, "name", None), str):
        lacks.append("a name")
    if getattr(item, "kind", None) not in kinds:
        lacks.append(f"a kind (one of {', '.join(kinds)})")
    params = getattr(item, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        lacks.append("a Params class (a pydantic model)")
    return f"method class {item.__name__} lacks {' and '.join(lacks)}" if lacks else None


def attributes_lacking(kind: str, required: tuple[str, ...]) -> Callable[[Any], str | None]:
    """A check that a registered object has a string ``name`` and the ``required`` attributes."""

    def lacks(item: Any) -> str | None:
        missing = [attr for attr in ("name", *required) if getattr(item, attr, None) is None]
        if not missing and not isinstance(item.name, str):
            missing = ["a string name"]
        return f"{kind} {item!r} lacks {', '.join(missing)}" if missing else None

    return lacks


REGISTRIES: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "method": ("compress_register_methods", method_lacks),
    "loader": ("compress_register_loaders", attributes_lacking("loader", ("claims", "load_config", "load"))),
    "writer": ("compress_register_writers", attributes_lacking("writer", ("capabilities", "Options", "write"))),
    "data source": ("compress_register_data_sources", attributes_lacking("data source", ("check", "load"))),
    "metric": ("compress_register_metrics", attributes_lacking("metric", ("tasks", "update", "result"))),
}
"""Each registry: its registration hook and what a registered item must have."""


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
        self.conflicts: list[Conflict] = []
        self.versions: dict[str, str] = {}
        self._registries: dict[str, dict[str, Any]] = {}
        self._owners: dict[str, dict[str, str]] = {}
        self._silenced: set[str] = set()
        """Plugins whose observer hooks raised: not called again by this host."""
        self._tracing = bool(os.environ.get("COMPRESS_TRACE"))
        if self._tracing:
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
        found = entry_points(group=ENTRY_POINT_GROUP)
        if allowed_names is not None:
            unknown = sorted(allowed_names - set(found.names))
            if unknown:
                raise UserError(
                    f"no installed plugin named {', '.join(map(repr, unknown))}"
                    f"{did_you_mean(unknown[0], list(found.names))}",
                    "COMPRESS_LOAD_PLUGINS",
                )
        for entry_point in found:
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
            except KeyboardInterrupt:
                raise
            # one broken plugin must not stop the others, even one whose import calls sys.exit
            except BaseException as error:
                self._report_broken(entry_point.name, describe(error))
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
        """Record plugin ``name`` as broken and say so in one line on stderr."""
        from tqdm import tqdm

        self.broken.append(BrokenPlugin(name, message, requires_api))
        # tqdm.write moves an open progress bar (an observer can fail mid-stage) below the line
        tqdm.write(f"warning: plugin {name!r} is broken: {message}", file=sys.stderr)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object at run time (tests, embedding applications)."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._forget_registries()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._forget_registries()

    def _forget_registries(self) -> None:
        """Make the next registry access ask every plugin again."""
        self._registries.clear()
        self._owners.clear()
        self.conflicts.clear()

    @property
    def hook(self) -> Any:
        """The hooks to call: ``host.hook.compress_stage_start(context=..., ...)``.

        Lifecycle hooks go through :meth:`notify`, so a raising observer is reported
        instead of stopping the run; every other hook is pluggy's own caller.
        """
        return GuardedHooks(self)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every observer of lifecycle hook ``hook_name``, in pluggy's order.

        An observer that raises (anything but :class:`UserError`, a deliberate stop, or
        ``KeyboardInterrupt``) is reported as broken in one warning line and not called
        again by this host; the run goes on. Observers show and log a run, they do not
        change it, so losing one must not lose the compressed output.
        """
        if self._tracing:
            shown = ", ".join(f"{name}={value!r}" for name, value in kwargs.items() if name != "context")
            sys.stderr.write(f"{hook_name}({shown})\n")
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if impl.plugin_name in self._silenced:
                continue
            if not self.call_guarded(impl, hook_name, **kwargs):
                self._silenced.add(impl.plugin_name)

    def plugins_info(self) -> list[dict[str, Any]]:
        """Each loaded plugin with its hooks, for ``compress plugins``."""
        info = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda pair: pair[0]):
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            info.append({"name": name, "version": self.versions.get(name), "hooks": hooks})
        return info

    def _registry(self, kind: str) -> dict[str, Any]:
        """The registry ``kind`` (a key of :data:`REGISTRIES`), filled on first use.

        A name registered by two plugins is a :class:`UserError` naming both.
        """
        self._fill(kind)
        conflict = next((conflict for conflict in self.conflicts if conflict.kind == kind), None)
        if conflict is not None:
            raise UserError(str(conflict))
        return self._registries[kind]

    def _fill(self, kind: str) -> None:
        """Ask every plugin for its ``kind`` items; a duplicate name is recorded in ``conflicts``."""
        if kind in self._registries:
            return
        hook_name, lacks = REGISTRIES[kind]
        found: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():

            def register(item: Any, _owner: str = impl.plugin_name) -> None:
                problem = lacks(item)
                if problem is not None:
                    self._report_broken(_owner, f"{hook_name}: {problem}")
                elif item.name in found:
                    self.conflicts.append(Conflict(kind, item.name, (owners[item.name], _owner)))
                else:
                    found[item.name] = item
                    owners[item.name] = _owner

            self.call_guarded(impl, hook_name, register=register)
        self._registries[kind] = found
        self._owners[kind] = owners

    def survey(self) -> None:
        """Fill every registry without raising on conflicts (``compress plugins`` lists them)."""
        for kind in REGISTRIES:
            self._fill(kind)

    def owner(self, kind: str, name: str) -> str:
        """The plugin that registered ``name`` in registry ``kind``."""
        return self._owners[kind][name]

    def hook_of_methods(self, hook_name: str, methods: Iterable[str]) -> Any:
        """``hook_name``'s caller restricted to the plugins that register ``methods`` (a search asks
        only the plugins of the candidate providers it wants); names no plugin registers are skipped."""
        registered = self.methods()
        owners = {self.owner("method", name) for name in methods if name in registered}
        others = [plugin for name, plugin in self.pm.list_name_plugin() if name not in owners]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def call_guarded(self, impl: Any, hook_name: str, **kwargs: Any) -> bool:
        """Call one plugin's implementation of a hook; a plugin that raises is reported, not fatal.

        Returns whether the call succeeded. A :class:`UserError` (a deliberate message to
        the user) and ``KeyboardInterrupt`` propagate; anything else, ``SystemExit``
        included, marks the plugin as broken.
        """
        if self._tracing:
            sys.stderr.write(f"{hook_name} [plugin {impl.plugin_name}]\n")
        try:
            impl.function(**{name: value for name, value in kwargs.items() if name in impl.argnames})
        except (UserError, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._report_broken(impl.plugin_name, f"{hook_name} raised {describe(error)}")
            return False
        return True

    def methods(self) -> dict[str, type]:
        return self._registry("method")

    def loaders(self) -> dict[str, Any]:
        return self._registry("loader")

    def writers(self) -> dict[str, Any]:
        return self._registry("writer")

    def data_sources(self) -> dict[str, Any]:
        return self._registry("data source")

    def metrics(self) -> dict[str, type]:
        return self._registry("metric")

    def loader_for(self, spec: ModelSpec) -> Loader:
        """The first registered loader that claims ``spec``: how every model (the recipe's, a
        teacher, a written checkpoint read back) is loaded. UserError naming it when none does,
        or naming the loader and its plugin when a ``claims()`` raises."""
        from compress.checkpoint import UNKNOWN_MODEL

        for name, loader in self.loaders().items():
            try:
                claimed = loader.claims(spec)
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as error:
                raise UserError(
                    f"loader {name!r} of plugin {self.owner('loader', name)!r} failed in claims(): {describe(error)}",
                    spec.name,
                ) from None
            if claimed:
                return loader
        raise UserError(UNKNOWN_MODEL, spec.name)

    def refused_for_api(self) -> str:
        """Why plugins refused for their API versions are missing, as a suffix for an unknown-name message."""
        return "".join(
            f"; plugin {broken.name!r} is not loaded ({broken.error})" for broken in self.broken if broken.requires_api
        )


class GuardedHooks:
    """``PluginHost.hook``: pluggy's hook relay, with lifecycle hooks called through ``notify``."""

    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        caller = getattr(self._host.pm.hook, name)
        return ObservedHook(self._host, caller) if name in LIFECYCLE_HOOKS else caller


class ObservedHook:
    """A lifecycle hook's caller: calling it runs ``PluginHost.notify``; everything else
    (``spec``, ``get_hookimpls()``) is pluggy's caller's."""

    def __init__(self, host: PluginHost, caller: Any) -> None:
        self._host = host
        self._caller = caller

    def __call__(self, **kwargs: Any) -> None:
        self._host.notify(self._caller.name, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._caller, name)


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, with plugins loaded on first use."""
    global _host
    if _host is None:
        host = PluginHost()
        host.load_plugins()  # a UserError here leaves no half-loaded host behind
        _host = host
    return _host


def reset_host() -> None:
    """Forget the process-wide host so the next ``get_host()`` rediscovers plugins."""
    global _host
    _host = None
