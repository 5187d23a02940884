"""Every hookspec is exercised: called by the host during real ``compress`` commands.

Meta-test in the style of datasette's: a plugin implementing every hook in
``compress.hookspecs`` records each call while ``compress apply`` runs a tiny recipe
through the command line's entry point (``compress.cli.main``), once to the end and
once failing. A hookspec nothing calls fails here, and a new hookspec is covered
without editing this file, as long as a command calls it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from compress import hookimpl, hookspecs
from compress.cli import main
from compress.errors import UserError
from compress.method import Method, MethodParams
from compress.search import CandidateRequest, collect_candidates

HOOKSPECS = {
    name: function
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(function, "compress_spec")
}


def recording_plugin(calls: list[str]) -> types.SimpleNamespace:
    """A plugin with an implementation of every hookspec, each appending its hook's name to ``calls``."""

    def implementation(name: str, spec: Callable) -> Callable:
        @functools.wraps(spec, updated=())  # pluggy reads the argument names through __wrapped__
        def record(*args: Any, **kwargs: Any) -> None:
            calls.append(name)

        return hookimpl(record)

    return types.SimpleNamespace(**{name: implementation(name, spec) for name, spec in HOOKSPECS.items()})


class SearchParams(MethodParams):
    fail: bool = Field(False, description="Raise before searching (to exercise compress_run_failed).")


class CheapestCandidate(Method):
    """A minimal search method: for each layer, the cheapest candidate ``rtn`` offers.

    It asks every plugin through ``compress_layer_candidates`` (a request naming no methods, so
    the recording plugin is asked too; one naming ``rtn`` asks only rtn's plugin) and reports one
    ``compress_stage_progress`` per layer, as the hookspecs say search methods do.
    """

    name = "cheapest_candidate"
    kind = "search"
    Params = SearchParams

    def apply(self, context, run) -> None:
        if self.params.fail:
            raise UserError("failing as asked", self.name)
        request = CandidateRequest(settings={"bits": [4, 8], "group_size": [64]})
        for step, (name, module) in enumerate(run.targets.items(), start=1):
            offered = [c for c in collect_candidates(context, name, module, request) if c.method == "rtn"]
            chosen = min(offered, key=lambda candidate: candidate.cost)
            context.layers[name] = chosen.apply(module)
            run.record.layers[name] = dict(chosen.setting)
            context.host.hook.compress_stage_progress(
                context=context, stage=run.stage, step=step, total=len(run.targets), logs={"error": chosen.error}
            )


@hookimpl
def compress_register_methods(register):
    register(CheapestCandidate)


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["compress", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


@pytest.fixture
def calls(register_plugin) -> list[str]:
    recorded: list[str] = []
    register_plugin(recording_plugin(recorded), name="recorder")
    register_plugin(sys.modules[__name__], name="cheapest_candidate")
    return recorded


def write_recipe(directory: Path, model: Path, text: Path, fail: bool) -> Path:
    data = {"path": str(text), "samples": 2, "seq_len": 32}
    recipe = {
        "model": str(model),
        "data": {"calibration": data, "evaluation": data},
        "stages": [
            {"method": "rtn", "bits": 4, "group_size": 64},
            {"method": "cheapest_candidate", "fail": fail},
        ],
        "output": {"dir": str(directory / ("failing" if fail else "out"))},
        "evaluate": ["perplexity"],
    }
    path = directory / ("failing.yaml" if fail else "recipe.yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_there_is_a_hookspec_to_exercise() -> None:
    assert len(HOOKSPECS) >= 10


def test_every_hookspec_is_called_by_compress_apply(
    calls: list[str], monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    assert run_cli(monkeypatch, "apply", str(write_recipe(tmp_path, tiny_model_dir, tiny_text_file, fail=False))) == 0
    succeeded = list(calls)
    calls.clear()
    assert run_cli(monkeypatch, "apply", str(write_recipe(tmp_path, tiny_model_dir, tiny_text_file, fail=True))) == 2
    never_called = sorted(set(HOOKSPECS) - set(succeeded) - set(calls))
    assert never_called == [], f"no test exercises these hookspecs: {never_called}"

    lifecycle = [name for name in succeeded if not name.startswith("compress_register_")]
    assert lifecycle[0] == "compress_run_start" and lifecycle[-1] == "compress_run_end"
    assert lifecycle.count("compress_stage_start") == lifecycle.count("compress_stage_end") == 2
    assert lifecycle.count("compress_block_done") == 2  # rtn, one per block of the two-layer model
    assert lifecycle.count("compress_layer_candidates") == lifecycle.count("compress_stage_progress") == 14
    assert "compress_run_failed" not in succeeded
    assert calls.count("compress_run_failed") == 1 and "compress_run_end" not in calls
