"""Broken third-party plugins: imports that exit or raise, incomplete method classes,
raising hooks and loaders, duplicate names, a misspelled ``COMPRESS_LOAD_PLUGINS``.

Each plugin is a module in ``work/site`` with a fake distribution (``*.dist-info`` with
its ``compress`` entry points) beside it, as tests/test_host.py installs them; the case
runs ``python -m compress`` in a child process with ``work/site`` on ``PYTHONPATH``, so
the plugin is found through its entry point like an installed one and no other case sees
it. A broken plugin is reported in one ``warning:`` line and the command goes on (exit 0);
a fault that stops the command is one ``error:`` line (exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import APPLY, CHECK, ROOT, Fault, recipe_setup, write_recipe

SITE_ENV = {"PYTHONPATH": os.pathsep.join(["{work}/site", str(ROOT)])}

HEADER = "from compress import hookimpl\nfrom compress.api import LayerMethod, Method, MethodParams\n\n"

METHOD_WITHOUT_KIND = (
    HEADER
    + '''
class NoKind(Method):
    """Forgot its kind."""

    name = "no_kind"


@hookimpl
def compress_register_methods(register):
    register(NoKind)
'''
)

METHOD_WITHOUT_PARAMS = (
    HEADER
    + '''
class NoParams(LayerMethod):
    """Its Params is not a pydantic model."""

    name = "no_params"
    Params = dict


@hookimpl
def compress_register_methods(register):
    register(NoParams)
'''
)

NOT_A_METHOD = '''from compress import hookimpl


class Plain:
    """Not a Method subclass."""

    name = "plain"
    kind = "data-free"


@hookimpl
def compress_register_methods(register):
    register(Plain)
'''

SECOND_RTN = (
    HEADER
    + '''
class AnotherRTN(LayerMethod):
    """A second method called rtn."""

    name = "rtn"

    def compress_layer(self, context, name, module):
        return {}


@hookimpl
def compress_register_methods(register):
    register(AnotherRTN)
'''
)


def observer(hook: str, arguments: str) -> str:
    """A plugin whose lifecycle hook ``hook`` raises."""
    return (
        f"from compress import hookimpl\n\n\n@hookimpl\ndef {hook}({arguments}):\n    raise OSError('log disk full')\n"
    )


RAISING_CLAIMS = """from compress import hookimpl


class Picky:
    name = "picky"

    def claims(self, spec):
        return spec.name.split(":", 1)[1] == "x"  # IndexError for a name without a colon

    def load_config(self, spec):
        raise NotImplementedError

    def load(self, spec):
        raise NotImplementedError


@hookimpl
def compress_register_loaders(register):
    register(Picky())
"""

FAILING_STAGE = (
    HEADER
    + '''from compress.api import UserError


class Fails(LayerMethod):
    """Fails on its first layer."""

    name = "fails"

    def compress_layer(self, context, name, module):
        raise UserError("cannot compress this layer", name)


@hookimpl
def compress_register_methods(register):
    register(Fails)


@hookimpl
def compress_run_failed(error):
    raise OSError("log disk full")
'''
)

REGISTRATION_EXITS = "import sys\n\nfrom compress import hookimpl\n\n\n@hookimpl\ndef compress_register_metrics(register):\n    sys.exit('no GPU found')\n"

REGISTRATION_USER_ERROR = (
    "from compress import hookimpl\nfrom compress.api import UserError\n\n\n@hookimpl\n"
    "def compress_register_methods(register):\n    raise UserError('licence key missing', 'MYPLUGIN_KEY')\n"
)

MISSPELLED_HOOK = "from compress import hookimpl\n\n\n@hookimpl\ndef compress_stage_strat(stage):\n    pass\n"

FUTURE_API = 'compress_api = ">=3,<4"\n\nfrom compress.api import NameOfALaterAPI\n'


def install(work: Path, plugins: dict[str, str]) -> None:
    """``plugins`` (entry-point name to module source) as one fake distribution in ``work/site``."""
    site = work / "site"
    site.mkdir()
    lines = []
    for name, source in plugins.items():
        module = f"compress_fault_{name.replace('-', '_')}"
        (site / f"{module}.py").write_text(source, encoding="utf-8")
        lines.append(f"{name} = {module}\n")
    dist_info = site / "compress_fault_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: compress-fault-plugins\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[compress]\n" + "".join(lines))


def with_plugins(plugins: dict[str, str], argv: list[str], **recipe: str) -> Callable[[Path], list[str]]:
    """A setup installing ``plugins`` and writing the base recipe (keys replaced by ``recipe``)."""

    def setup(work: Path) -> list[str]:
        install(work, plugins)
        write_recipe(work, **recipe)
        return list(argv)

    return setup


def plugin_case(id: str, description: str, plugins: dict[str, str], argv: list[str], message: str, **fields) -> Fault:
    """A case run in a child process with ``plugins`` installed."""
    recipe = fields.pop("recipe", {})
    return Fault(
        id=id,
        description=description,
        setup=with_plugins(plugins, argv, **recipe),
        message=message,
        env=SITE_ENV,
        subprocess=True,
        **fields,
    )


CASES = [
    plugin_case(
        "plugin/import-calls-sys-exit",
        "a plugin whose import calls `sys.exit(3)`; `compress recipe check` on a valid recipe",
        {"exiting": "import sys\n\nsys.exit(3)\n"},
        CHECK,
        "warning: plugin 'exiting' is broken: SystemExit: 3",
        exit_code=0,
    ),
    plugin_case(
        "plugin/import-raises",
        "a plugin whose import fails (`import scipy_not_installed`); `compress methods`",
        {"needs-scipy": "import scipy_not_installed\n"},
        ["methods"],
        "warning: plugin 'needs-scipy' is broken: ModuleNotFoundError: No module named 'scipy_not_installed'",
        exit_code=0,
    ),
    plugin_case(
        "plugin/method-without-kind",
        "a method class registered without `kind`; `compress methods`",
        {"no-kind": METHOD_WITHOUT_KIND},
        ["methods"],
        "plugin 'no-kind' is broken: compress_register_methods: method class NoKind lacks a kind",
        exit_code=0,
    ),
    plugin_case(
        "plugin/method-params-not-pydantic",
        "a method class whose `Params` is `dict`; `compress recipe check`",
        {"no-params": METHOD_WITHOUT_PARAMS},
        CHECK,
        "method class NoParams lacks a Params class (a pydantic model)",
        exit_code=0,
    ),
    plugin_case(
        "plugin/method-not-a-method-class",
        "a registered method class that does not subclass `Method`; `compress methods`",
        {"plain": NOT_A_METHOD},
        ["methods"],
        "is not a compress.api.Method subclass",
        exit_code=0,
    ),
    plugin_case(
        "plugin/duplicate-method-in-plugins-command",
        "a second plugin registering a method named `rtn`; `compress plugins`",
        {"second-rtn": SECOND_RTN},
        ["plugins"],
        "conflict method 'rtn' is registered by both plugin 'second-rtn' and plugin 'rtn'",
        exit_code=0,
    ),
    plugin_case(
        "plugin/duplicate-method-in-recipe-check",
        "a second plugin registering a method named `rtn`; `compress recipe check`",
        {"second-rtn": SECOND_RTN},
        CHECK,
        "method 'rtn' is registered by both plugin 'second-rtn' and plugin 'rtn'",
    ),
    plugin_case(
        "plugin/stage-end-observer-raises",
        "an observer whose `compress_stage_end` raises `OSError`; `compress apply` (the output is kept)",
        {"logger": observer("compress_stage_end", "stage, record")},
        APPLY,
        "warning: plugin 'logger' is broken: compress_stage_end raised OSError: log disk full",
        exit_code=0,
    ),
    plugin_case(
        "plugin/run-start-observer-raises",
        "an observer whose `compress_run_start` raises `OSError`; `compress apply` (the output is kept)",
        {"logger": observer("compress_run_start", "context")},
        APPLY,
        "warning: plugin 'logger' is broken: compress_run_start raised OSError: log disk full",
        exit_code=0,
    ),
    plugin_case(
        "plugin/run-failed-observer-raises",
        "an observer whose `compress_run_failed` raises, in a run whose stage fails",
        {"failing": FAILING_STAGE},
        APPLY,
        "cannot compress this layer",
        place="model.layers.0",
        recipe={"stages": [{"method": "fails"}]},
        must_not_exist=("out",),
    ),
    plugin_case(
        "plugin/loader-claims-raises",
        "a loader whose `claims()` raises `IndexError`; a recipe naming a model no built-in loader claims",
        {"picky": RAISING_CLAIMS},
        CHECK,
        "loader 'picky' of plugin 'picky' failed in claims(): IndexError",
        place="recipe.yaml:1:8",
        recipe={"model": "my-model"},
    ),
    plugin_case(
        "plugin/registration-calls-sys-exit",
        "a metric registration hook that calls `sys.exit('no GPU found')`; `compress recipe check`",
        {"gpu-metrics": REGISTRATION_EXITS},
        CHECK,
        "warning: plugin 'gpu-metrics' is broken: compress_register_metrics raised SystemExit: no GPU found",
        exit_code=0,
    ),
    plugin_case(
        "plugin/registration-user-error",
        "a registration hook that raises `UserError('licence key missing', 'MYPLUGIN_KEY')`",
        {"licensed": REGISTRATION_USER_ERROR},
        ["methods"],
        "licence key missing",
        place="MYPLUGIN_KEY",
    ),
    plugin_case(
        "plugin/misspelled-hook",
        "a plugin implementing `compress_stage_strat` (no such hook); `compress plugins`",
        {"typo": MISSPELLED_HOOK},
        ["plugins"],
        "unknown hook compress_stage_strat (did you mean 'compress_stage_start'?)",
        exit_code=0,
    ),
    plugin_case(
        "plugin/later-api-version",
        'a plugin declaring `compress_api = ">=3,<4"`; `compress plugins`',
        {"future": FUTURE_API},
        ["plugins"],
        "broken future: requires compress API >=3,<4",
        exit_code=0,
    ),
    Fault(
        id="plugin/load-plugins-unknown-name",
        description="`COMPRESS_LOAD_PLUGINS=rnt` (no such plugin); `compress recipe check`",
        setup=recipe_setup(),
        message="no installed plugin named 'rnt' (did you mean 'rtn'?)",
        place="COMPRESS_LOAD_PLUGINS",
        env={"COMPRESS_LOAD_PLUGINS": "rnt"},
        subprocess=True,
    ),
]
