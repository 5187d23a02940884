"""Plugin discovery: entry points, broken plugins, the load switch, tracing, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import UserError
from compress.host import PluginHost

GOOD = '''
from compress import hookimpl
from compress.method import LayerMethod


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


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real distribution on sys.path with one good and three broken entry points."""
    site = tmp_path / "site"
    site.mkdir()
    for module, source in MODULES.items():
        (site / f"{module}.py").write_text(source)
    dist_info = site / "fake_compress_plugins-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-compress-plugins\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text(
        "[compress]\n"
        "good = compress_good_plugin\n"
        "import-error = compress_import_error_plugin\n"
        "misspelled = compress_misspelled_plugin\n"
        "raising = compress_raising_plugin\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def loaded_host() -> PluginHost:
    host = PluginHost()
    host.load_plugins()
    return host


def test_broken_plugins_are_reported_and_the_others_load(installed):
    with pytest.warns(UserWarning) as warned:
        host = loaded_host()
        methods = host.methods()
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
