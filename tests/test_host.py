"""Plugin discovery: entry points, broken plugins, API versions, the load switch, tracing, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from compress import hookimpl
from compress.api import API_VERSION, UserError
from compress.cli import cli
from compress.host import PluginHost

GOOD = '''
from compress import hookimpl
from compress.api import LayerMethod

compress_api = ">=2,<3"


class Identity(LayerMethod):
    """Leaves every layer as it is."""

    name = "identity"

    def compress_layer(self, context, name, module):
        return {}


@hookimpl
def compress_register_methods(register):
    register(Identity)
'''

MODULES = {
    "compress_good_plugin": GOOD,
    "compress_import_error_plugin": "raise RuntimeError('missing dependency xyz')\n",
    "compress_misspelled_plugin": (
        "from compress import hookimpl\n\n@hookimpl\ndef compress_register_method(register):\n    pass\n"
    ),
    "compress_raising_plugin": (
        "from compress import hookimpl\n\n@hookimpl\ndef compress_register_methods(register):\n"
        "    raise ValueError('registration exploded')\n"
    ),
}


def install(site: Path, monkeypatch: pytest.MonkeyPatch, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """A real distribution on sys.path: ``modules`` (name to source) and its ``compress`` entry points."""
    site.mkdir()
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    dist_info = site / "fake_compress_plugins-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-compress-plugins\nVersion: 1.2.3\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[compress]\n{lines}")
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One good and three broken entry points."""
    return install(
        tmp_path / "site",
        monkeypatch,
        MODULES,
        {
            "good": "compress_good_plugin",
            "import-error": "compress_import_error_plugin",
            "misspelled": "compress_misspelled_plugin",
            "raising": "compress_raising_plugin",
        },
    )


FUTURE = """
from compress import hookimpl
from compress.api import NameOfALaterAPI  # importing this plugin here would fail

compress_api = ">=3,<4"


@hookimpl
def compress_register_methods(register):
    register(NameOfALaterAPI)
"""


@pytest.fixture
def api_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plugin for this API, one for a later API, two whose range is unreadable and one that is not Python."""
    return install(
        tmp_path / "site",
        monkeypatch,
        {
            "compress_good_plugin": GOOD,
            "compress_future_plugin": FUTURE,
            "compress_unreadable_range_plugin": 'compress_api: str = "2.0 or newer"\n',
            "compress_computed_range_plugin": 'compress_api = ">=" + "2"\n',
            "compress_syntax_error_plugin": "def broken(:\n",
        },
        {
            "good": "compress_good_plugin",
            "future": "compress_future_plugin",
            "unreadable": "compress_unreadable_range_plugin",
            "computed": "compress_computed_range_plugin",
            "syntax-error": "compress_syntax_error_plugin",
        },
    )


FUTURE_REFUSED = f"requires compress API >=3,<4, but this compress has API {API_VERSION}"


def warning_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The stderr lines printed so far; each must be a one-line ``warning:``."""
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("warning: plugin ") for line in lines), lines
    return lines


def test_a_plugin_for_another_api_version_is_refused_before_it_is_imported(api_plugins, capsys):
    import sys

    host = loaded_host()
    assert sorted(line.split(":")[1] for line in warning_lines(capsys)) == [
        " plugin 'computed' is broken",
        " plugin 'future' is broken",
        " plugin 'syntax-error' is broken",
        " plugin 'unreadable' is broken",
    ]
    broken = {plugin.name: plugin for plugin in host.broken}
    assert broken["future"].error == FUTURE_REFUSED
    assert broken["future"].requires_api == ">=3,<4"
    assert "compress_future_plugin" not in sys.modules
    assert broken["unreadable"].error == "compress_api '2.0 or newer' is not a version range (e.g. '>=2,<3')"
    assert broken["computed"].error.startswith("compress_api must be a string literal (")
    assert broken["computed"].error.endswith("compress_computed_range_plugin.py:1)")
    assert broken["syntax-error"].error.startswith("SyntaxError: ")
    assert broken["syntax-error"].requires_api is None
    assert "identity" in host.methods()  # ">=2,<3" admits this API
    assert set(broken) == {"computed", "future", "syntax-error", "unreadable"}


def test_plugins_command_and_a_recipe_name_both_versions(api_plugins, tmp_path):
    from compress import host as host_module

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: smollm2-135m-instruct\nstages:\n  - method: future_quant\n")
    host_module.reset_host()
    try:
        listed = CliRunner().invoke(cli, ["plugins"])
        checked = CliRunner().invoke(cli, ["recipe", "check", str(recipe)])  # the same host, loaded once
    finally:
        host_module.reset_host()
    assert f"broken future: {FUTURE_REFUSED}" in listed.output
    assert checked.exit_code == 2
    assert checked.output.startswith(f"error: {recipe}:3:13: unknown method 'future_quant'")
    assert f"; plugin 'future' is not loaded ({FUTURE_REFUSED})" in checked.output
    assert len(checked.output.strip().splitlines()) == 1


def loaded_host() -> PluginHost:
    host = PluginHost()
    host.load_plugins()
    return host


def host_and_methods() -> tuple[PluginHost, dict[str, type]]:
    host = loaded_host()
    return host, host.methods()


def test_broken_plugins_are_reported_and_the_others_load(installed, capsys):
    host, methods = host_and_methods()
    assert {"identity", "rtn"} <= set(methods)
    broken = {plugin.name: plugin.error for plugin in host.broken}
    assert broken["import-error"] == "RuntimeError: missing dependency xyz"
    assert "unknown hook compress_register_method (did you mean 'compress_register_methods'?)" in broken["misspelled"]
    assert "registration exploded" in broken["raising"]
    assert len(warning_lines(capsys)) == 3
    assert host.versions["good"] == "1.2.3"


def test_plugins_command_lists_hooks_and_broken_plugins(installed):
    from compress import host as host_module

    host_module.reset_host()
    try:
        result = CliRunner().invoke(cli, ["plugins"])
    finally:
        host_module.reset_host()
    assert result.exit_code == 0, result.output
    assert "good" in result.output and "1.2.3" in result.output
    assert "broken import-error: RuntimeError: missing dependency xyz" in result.output


def test_load_plugins_switch_restricts_entry_points(installed, monkeypatch):
    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "good")
    host = loaded_host()
    assert set(host.methods()) == {"identity"}
    assert host.broken == []
    assert "directory" in host.loaders()  # default plugins always load

    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "")
    assert loaded_host().methods() == {}


def test_tracing_prints_every_hook_call(monkeypatch, capsys):
    monkeypatch.setenv("COMPRESS_TRACE", "1")
    host = loaded_host()
    host.methods()
    host.hook.compress_run_failed(context=None, error=RuntimeError("stop"))
    err = capsys.readouterr().err
    assert "compress_register_methods [plugin rtn]" in err
    assert "compress_run_failed" in err and "stop" in err


def test_runtime_registration_with_a_misspelled_hook_fails_loudly():
    import pluggy

    class Misspelled:
        @staticmethod
        def compress_stage_strat(stage):
            pass

    from compress import hookimpl

    hookimpl(Misspelled.compress_stage_strat)
    host = loaded_host()
    with pytest.raises(pluggy.PluginValidationError):
        host.register(Misspelled, name="misspelled")


def test_registration_hooks_called_once_per_host(monkeypatch):
    calls = []

    class Counting:
        @staticmethod
        def compress_register_metrics(register):
            calls.append(1)

    from compress import hookimpl

    hookimpl(Counting.compress_register_metrics)
    host = loaded_host()
    host.register(Counting, name="counting")
    host.metrics()
    host.metrics()
    assert calls == [1]


def test_load_model_resolves_through_the_loaders_and_names_an_unknown_model(tmp_path):
    import torch

    from compress.api import Context

    host = loaded_host()
    context = Context(host, recipe=None, loaded=None, loader=None, device=torch.device("cpu"), report=None)
    with pytest.raises(UserError, match=r"^no-such-model: not a built-in model name, a directory"):
        context.load_model("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):  # the directory loader claimed it and found no model
        context.load_model(str(empty))


INCOMPLETE = '''
from compress import hookimpl
from compress.api import LayerMethod, Method


class NoKind(Method):
    """A method that forgot its kind."""

    name = "no_kind"


class NoParams(LayerMethod):
    """A method whose Params is not a pydantic model."""

    name = "no_params"
    Params = None


class NotAMethod:
    """Not a Method subclass at all."""

    name = "not_a_method"


@hookimpl
def compress_register_methods(register):
    register(NoKind)
    register(NoParams)
    register(NotAMethod)
'''


@pytest.fixture
def exiting_and_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A good plugin, one whose import calls sys.exit, one registering three incomplete method classes."""
    return install(
        tmp_path / "site",
        monkeypatch,
        {
            "compress_good_plugin": GOOD,
            "compress_exiting_plugin": "import sys\n\nsys.exit(3)\n",
            "compress_incomplete_plugin": INCOMPLETE,
        },
        {
            "good": "compress_good_plugin",
            "exiting": "compress_exiting_plugin",
            "incomplete": "compress_incomplete_plugin",
        },
    )


def test_an_exiting_import_and_incomplete_method_classes_are_broken_plugins(exiting_and_incomplete, capsys):
    from compress import host as host_module

    host_module.reset_host()
    try:
        listed = CliRunner().invoke(cli, ["methods"])
    finally:
        host_module.reset_host()
    assert listed.exit_code == 0, listed.output
    assert "identity" in listed.output and "rtn" in listed.output
    warnings_printed = [line for line in listed.output.splitlines() if line.startswith("warning: ")]
    table = [line for line in listed.output.splitlines() if not line.startswith("warning: ")]
    assert not any(name in line for line in table for name in ("no_kind", "no_params", "not_a_method"))
    assert warnings_printed == [
        "warning: plugin 'exiting' is broken: SystemExit: 3",
        "warning: plugin 'incomplete' is broken: compress_register_methods: method class NoKind lacks a kind "
        "(one of data-free, calibration, training, search)",
        "warning: plugin 'incomplete' is broken: compress_register_methods: method class NoParams lacks "
        "a Params class (a pydantic model)",
        "warning: plugin 'incomplete' is broken: compress_register_methods: "
        "<class 'compress_incomplete_plugin.NotAMethod'> is not a compress.api.Method subclass",
    ]


def test_plugins_command_lists_both_plugins_of_a_duplicate_name(installed, monkeypatch):
    from compress import host as host_module

    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "good")
    host = loaded_host()
    again = DuplicateIdentity()
    host.register(again, name="again")
    monkeypatch.setattr(host_module, "_host", host)
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "again (conflict)" in result.output and "good (conflict)" in result.output
    assert "conflict method 'identity' is registered by both plugin 'good' and plugin 'again'" in result.output


class DuplicateIdentity:
    """A plugin registering the good plugin's method a second time."""

    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        import compress_good_plugin

        register(compress_good_plugin.Identity)


def test_duplicate_method_names_are_an_error_naming_both(installed, monkeypatch):
    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "good")
    host = loaded_host()
    host.register(DuplicateIdentity(), name="again")
    for _ in range(2):  # the conflict is remembered, not recorded twice
        with pytest.raises(UserError, match="method 'identity' is registered by both plugin 'good' and plugin 'again'"):
            host.methods()
    assert len(host.conflicts) == 1
    host.unregister("again")
    assert "identity" in host.methods() and host.conflicts == []


def test_lifecycle_hooks_are_hookspecs():
    from compress import hookspecs
    from compress.host import LIFECYCLE_HOOKS

    assert all(hasattr(getattr(hookspecs, name, None), "compress_spec") for name in LIFECYCLE_HOOKS)


def test_load_plugins_switch_naming_no_installed_plugin_is_an_error(installed, monkeypatch, capsys):
    import sys

    from compress import host as host_module
    from compress.cli import main

    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "good,godo")
    with pytest.raises(UserError, match=r"no installed plugin named 'godo' \(did you mean 'good'\?\)"):
        loaded_host()
    host_module.reset_host()
    monkeypatch.setattr(sys, "argv", ["compress", "methods"])
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        host_module.reset_host()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: COMPRESS_LOAD_PLUGINS: no installed plugin named 'godo' (did you mean 'good'?)\n"
    )


class FailingObserver:
    """An observer whose stage-end hook raises, and a loader whose claims() raises."""

    def __init__(self) -> None:
        self.stage_ends = 0

    def compress_stage_end(self, stage):
        self.stage_ends += 1
        raise ValueError("log file\nis gone")


class ClaimsRaise:
    name = "claims-raise"

    def claims(self, spec):
        raise KeyError(spec.name)

    def load_config(self, spec):
        raise AssertionError("never reached")

    def load(self, spec):
        raise AssertionError("never reached")


def test_a_raising_observer_is_reported_once_and_the_output_is_written(register_plugin, run_recipe, capsys):
    from compress import hookimpl

    observer = FailingObserver()
    hookimpl(FailingObserver.compress_stage_end)
    host = register_plugin(observer, name="observer")
    stage = {"method": "rtn", "bits": 4, "group_size": 64}
    run = run_recipe({"stages": [stage, stage], "output": {"dir": "x"}})
    assert (run.output / "config.json").is_file()
    assert observer.stage_ends == 1  # silenced after it failed
    warnings_printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings_printed == [
        "warning: plugin 'observer' is broken: compress_stage_end raised ValueError: log file is gone"
    ]
    assert [broken.name for broken in host.broken] == ["observer"]


def test_a_loader_whose_claims_raises_is_one_error_naming_it_and_its_plugin(register_plugin):
    from compress import hookimpl
    from compress.recipe import ModelSpec

    @hookimpl
    def compress_register_loaders(register):
        register(ClaimsRaise())

    host = register_plugin(type("Plugin", (), {"compress_register_loaders": staticmethod(compress_register_loaders)}))
    with pytest.raises(UserError) as raised:
        host.loader_for(ModelSpec(name="no-such-model"))
    assert str(raised.value).startswith("no-such-model: loader 'claims-raise' of plugin ")
    assert "failed in claims(): KeyError: 'no-such-model'" in str(raised.value)
