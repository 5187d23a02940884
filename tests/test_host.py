"""Plugin discovery: entry points, broken plugins, API versions, the load switch, tracing, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

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


def test_a_plugin_for_another_api_version_is_refused_before_it_is_imported(api_plugins):
    import sys

    with pytest.warns(UserWarning) as warned:
        host = loaded_host()
    assert sorted(str(warning.message).split(":")[0] for warning in warned) == [
        "plugin 'computed' is broken",
        "plugin 'future' is broken",
        "plugin 'syntax-error' is broken",
        "plugin 'unreadable' is broken",
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
        with pytest.warns(UserWarning):
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


def test_broken_plugins_are_reported_and_the_others_load(installed):
    with pytest.warns(UserWarning) as warned:
        host, methods = host_and_methods()
    assert {"identity", "rtn"} <= set(methods)
    broken = {plugin.name: plugin.error for plugin in host.broken}
    assert broken["import-error"] == "RuntimeError: missing dependency xyz"
    assert "unknown hook compress_register_method (did you mean 'compress_register_methods'?)" in broken["misspelled"]
    assert "registration exploded" in broken["raising"]
    assert len(warned) == 3
    assert host.versions["good"] == "1.2.3"


def test_plugins_command_lists_hooks_and_broken_plugins(installed):
    from compress import host as host_module

    host_module.reset_host()
    try:
        with pytest.warns(UserWarning):
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


def test_duplicate_method_names_are_an_error_naming_both(installed, monkeypatch):
    import compress_good_plugin

    monkeypatch.setenv("COMPRESS_LOAD_PLUGINS", "good")
    host = loaded_host()

    class Again:
        @staticmethod
        def compress_register_methods(register):
            register(compress_good_plugin.Identity)

    from compress import hookimpl

    hookimpl(Again.compress_register_methods)
    host.register(Again, name="again")
    with pytest.raises(UserError, match="method 'identity' is registered by both plugin 'good' and plugin 'again'"):
        host.methods()


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
