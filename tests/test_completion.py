"""Shell completion through click's machinery: method and metric names, recipe paths."""

from __future__ import annotations

from click.shell_completion import ShellComplete
from click.testing import CliRunner

from compress.cli import cli


def completions(args: list[str], incomplete: str) -> list[tuple[str, str]]:
    """What the shell is offered for ``compress ARGS INCOMPLETE<TAB>`` (value and type of each item)."""
    items = ShellComplete(cli, {}, "compress", "_COMPRESS_COMPLETE").get_completions(args, incomplete)
    return [(item.value, item.type) for item in items]


def test_method_names_complete(host) -> None:
    assert completions(["methods"], "") == [(name, "plain") for name in sorted(host.methods())]
    assert completions(["methods"], "gp") == [("gptq", "plain")]
    assert completions(["methods"], "zz") == []


def test_metric_names_complete(host) -> None:
    offered = [value for value, _ in completions(["eval", "ckpt", "--metric"], "")]
    assert offered == sorted(host.metrics()) and "perplexity" in offered


def test_recipe_files_complete_as_paths(host) -> None:
    assert completions(["recipe", "check"], "recipes/") == [("recipes/", "file")]
    assert completions(["apply"], "r") == [("r", "file")]


def test_the_environment_variable_drives_it(host) -> None:
    """What the shell does: source the script, then call compress with the words typed so far."""
    script = CliRunner().invoke(cli, [], env={"_COMPRESS_COMPLETE": "bash_source"}, prog_name="compress")
    assert script.exit_code == 0 and "_COMPRESS_COMPLETE=bash_complete" in script.stdout
    words = {"_COMPRESS_COMPLETE": "bash_complete", "COMP_WORDS": "compress methods rt", "COMP_CWORD": "2"}
    answer = CliRunner().invoke(cli, [], env=words, prog_name="compress")
    assert answer.exit_code == 0 and answer.stdout.split() == ["plain,rtn"]
