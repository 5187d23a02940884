"""Run one fault case through the real ``compress`` CLI and judge what happened.

A case is a :class:`Fault` in a module-level list ``CASES`` of a ``tests/faults/cases_*.py``
module. ``tests/faults/test_corpus.py`` runs every case as one test, and
``python -m scripts.fault_corpus`` runs them all and writes docs/reliability.md.

Each case runs in its own empty work directory, which is the current directory during the
run. ``setup(work)`` writes what the case needs there and returns the argv after
``compress``. Shared assets, built once per process and never to be modified in place:

- :func:`tiny_model` — a two-layer Llama (hidden size 64, random weights, byte-level
  tokenizer; ``compress.pytest_plugin.build_tiny_model``); :func:`copy_tiny_model` copies
  it into the work directory (and damages the copy) for cases that damage it;
- :func:`tiny_text` — about 8 KB of English text (``compress.pytest_plugin.TINY_TEXT``);
- :func:`data_entry` — a ``data:`` entry of 4 sequences of 32 tokens;
- :func:`write_recipe` — writes ``recipe.yaml`` for the tiny model and text (keyword
  arguments replace top-level keys), or the given text verbatim;
- :func:`recipe_setup` — a whole ``setup`` that writes such a recipe (text may use
  ``{model}``, ``{text}`` and ``{out}``; a keyword value may be a function of the work
  directory, for what the setup makes there) and returns :func:`recipe_argv`.

Values in ``Fault.env`` may contain ``{work}``, replaced by the work directory's path.
Every run gets ``COMPRESS_CACHE`` (a per-process cache directory; a case can override it)
and ``HF_HUB_OFFLINE=1``. In-process runs use a fresh plugin host and do not see the
plugins' own commands (``compress_register_commands``); cases that need those, a real
``sys.exit``, signals or a memory limit run in a child process (``subprocess=True``).
An ``action`` can start children itself with :func:`compress_command` and
:func:`child_environment`.

The verdict (:func:`verdict`) checks the exit code; for exit code 2, exactly one
``error:`` line on stderr, the last line there, containing ``message`` and ``place``;
for any other exit code, ``message`` somewhere on stdout or stderr; no traceback;
nothing in ``must_not_exist``; everything in ``must_exist``; and no debris that the run
created (``.*partial*`` and ``.*.old-*`` files or directories, ``*.lock`` files). :func:`grade` sums that
up as handled, partly or not handled.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess as child_process
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0
DEBRIS = re.compile(r"^\..*(partial|\.old-)|\.partial(-|$)|\.lock$")


@dataclass(frozen=True)
class Observed:
    """What one run of a case did."""

    exit_code: int | None
    """None when the run was stopped at its timeout."""
    stdout: str
    stderr: str
    seconds: float
    leftover: tuple[str, ...] = ()
    """Paths (relative to the work directory) that must not exist but do, and new debris."""
    lost: tuple[str, ...] = ()
    """Paths in ``Fault.must_exist`` that the run removed."""
    timed_out: bool = False


@dataclass(frozen=True)
class Fault:
    """One bad input or fault, and what the CLI must answer to it."""

    id: str
    """``<category>/<slug>``, unique in the corpus."""
    description: str
    """The input, as the table in docs/reliability.md shows it."""
    setup: Callable[[Path], list[str]]
    """Writes what the case needs under the (empty) work directory; returns the argv after ``compress``."""
    message: str
    """A fragment the one ``error:`` line must contain (exit code 2), else stdout or stderr."""
    place: str | None = None
    """A fragment naming the place that the ``error:`` line must contain; None: not checked."""
    exit_code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables; ``{work}`` in a value is replaced by the work directory."""
    subprocess: bool = False
    """True: ``python -m compress`` in a child process; False: click's CliRunner in-process."""
    action: Callable[[Path, list[str]], Observed] | None = None
    """Runs the case itself (concurrency, signals) and returns what it observed."""
    must_not_exist: tuple[str, ...] = ()
    """Paths relative to the work directory that must not exist after the run."""
    must_exist: tuple[str, ...] = ()
    """Paths relative to the work directory that the run must not remove (the user's files)."""
    timeout: float = TIMEOUT_S
    """Seconds before the run counts as a hang."""
    memory_limit_mb: int | None = None
    """Address-space limit for a subprocess run (for inputs that could exhaust memory)."""

    @property
    def category(self) -> str:
        """The part of the id before the slash."""
        return self.id.split("/", 1)[0]


def load_cases() -> list[Fault]:
    """Every ``CASES`` entry of every ``tests/faults/cases_*.py``, in file order."""
    import importlib

    cases: list[Fault] = []
    for path in sorted(Path(__file__).parent.glob("cases_*.py")):
        cases += importlib.import_module(f"tests.faults.{path.stem}").CASES
    return cases


# ---------------------------------------------------------------- shared assets


_assets: dict[str, Path] = {}


def _assets_dir() -> Path:
    if "dir" not in _assets:
        directory = Path(tempfile.mkdtemp(prefix="compress-faults-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _assets["dir"] = directory
    return _assets["dir"]


def tiny_model() -> Path:
    """The shared two-layer random Llama directory (built on first use). Do not modify it."""
    if "model" not in _assets:
        from compress.pytest_plugin import build_tiny_model

        directory = _assets_dir() / "tiny-llama"
        directory.mkdir()
        _assets["model"] = build_tiny_model(directory)
    return _assets["model"]


def copy_tiny_model(work: Path, name: str = "model", damage: Callable[[Path], None] | None = None) -> Path:
    """A copy of the tiny model at ``work / name``, after ``damage(copy)`` when given."""
    model = Path(shutil.copytree(tiny_model(), work / name))
    if damage is not None:
        damage(model)
    return model


def tiny_text() -> Path:
    """The shared small English text file (about 8 KB). Do not modify it."""
    if "text" not in _assets:
        from compress.pytest_plugin import TINY_TEXT

        path = _assets_dir() / "text.txt"
        path.write_text(TINY_TEXT * 40, encoding="utf-8")
        _assets["text"] = path
    return _assets["text"]


def cache_dir() -> Path:
    """The per-process ``COMPRESS_CACHE`` every run gets unless the case sets its own."""
    path = _assets_dir() / "cache"
    path.mkdir(exist_ok=True)
    return path


def data_entry(path: str | Path | None = None, **keys: Any) -> dict[str, Any]:
    """A ``data:`` entry reading ``path`` (default: the tiny text), 4 sequences of 32 tokens, ``keys`` added."""
    return {"path": str(path if path is not None else tiny_text()), "samples": 4, "seq_len": 32, **keys}


def base_recipe(work: Path, output_format: str | None = None) -> dict[str, Any]:
    """A valid recipe for the tiny model: rtn 4-bit, the tiny text, output ``work/out`` (in
    ``output_format`` when given)."""
    output = {"dir": str(work / "out")} | ({"format": output_format} if output_format else {})
    return {
        "model": str(tiny_model()),
        "data": {"calibration": data_entry(), "evaluation": data_entry()},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "output": output,
        "evaluate": ["perplexity"],
    }


class _RecipeDumper(yaml.SafeDumper):
    """The safe dumper, writing paths as strings and a value used twice in full (no anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_RecipeDumper.add_multi_representer(Path, lambda dumper, path: dumper.represent_str(str(path)))


def write_recipe(
    work: Path, text: str | None = None, name: str = "recipe.yaml", output_format: str | None = None, **overrides: Any
) -> Path:
    """Write ``work / name``: ``text`` verbatim, or :func:`base_recipe` with top-level keys replaced."""
    path = work / name
    if text is None:
        recipe = {**base_recipe(work, output_format), **overrides}
        path.write_text(yaml.dump(recipe, Dumper=_RecipeDumper, sort_keys=False), encoding="utf-8")
    else:
        path.write_text(text, encoding="utf-8")
    return path


RECIPE_HEAD = "model: {model}\noutput: {{dir: {out}}}\nstages:\n"
"""The start of a recipe text for :func:`recipe_setup`: the first stage's ``- method:`` line is line 4."""


def recipe_setup(
    text: str | None = None, *, command: str = "check", output_format: str | None = None, **overrides: Any
) -> Callable[[Path], list[str]]:
    """A ``setup`` writing ``recipe.yaml`` (see :func:`write_recipe`) and running ``command`` on it.

    ``text`` may use ``{model}``, ``{text}`` and ``{out}`` (the tiny model, the tiny text,
    ``work/out``); a callable value in ``overrides`` is called with the work directory when
    the setup runs (a model or file the setup makes there); ``command`` is a key of
    :func:`recipe_argv`.
    """

    def setup(work: Path) -> list[str]:
        filled = text.format(model=tiny_model(), text=tiny_text(), out=work / "out") if text is not None else None
        values = {key: value(work) if callable(value) else value for key, value in overrides.items()}
        write_recipe(work, filled, output_format=output_format, **values)
        return recipe_argv(command)

    return setup


def recipe_argv(command: str, recipe: str = "recipe.yaml") -> list[str]:
    """The argv for ``command`` on ``recipe``: ``check`` is ``recipe check``, ``apply`` is ``apply``."""
    return {"check": ["recipe", "check", recipe], "apply": ["apply", recipe]}[command]


CHECK = recipe_argv("check")
"""``recipe check recipe.yaml`` (not to be modified in place)."""
APPLY = recipe_argv("apply")
"""``apply recipe.yaml`` (not to be modified in place)."""


# ---------------------------------------------------------------- running


def run_environment(fault: Fault, work: Path) -> dict[str, str]:
    """The variables a case's run adds to the environment (``{work}`` expanded)."""
    env = {"COMPRESS_CACHE": str(cache_dir()), "HF_HUB_OFFLINE": "1"}
    env.update({key: value.replace("{work}", str(work)) for key, value in fault.env.items()})
    return env


def compress_command(argv: list[str]) -> list[str]:
    """The command line that runs ``compress`` with ``argv`` in a child process."""
    return [sys.executable, "-m", "compress", *argv]


def child_environment(fault: Fault, work: Path) -> dict[str, str]:
    """The full environment of a child process for ``fault`` (this one's plus the case's)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, **run_environment(fault, work)}


def run_fault(fault: Fault, work: Path) -> Observed:
    """Set the case up in the empty directory ``work``, run it, and record what it did."""
    work.mkdir(parents=True, exist_ok=True)
    with working_directory(work):
        argv = fault.setup(work)
        before = set(debris(work))
        if fault.action is not None:
            observed = fault.action(work, argv)
        elif fault.subprocess:
            observed = run_child(fault, work, argv)
        else:
            observed = run_in_process(fault, work, argv)
    found = [path for path in fault.must_not_exist if (work / path).exists() or (work / path).is_symlink()]
    found += [path for path in debris(work) if path not in before]
    lost = tuple(path for path in fault.must_exist if not (work / path).exists())
    return replace(observed, leftover=tuple(dict.fromkeys([*observed.leftover, *found])), lost=lost)


def debris(work: Path) -> list[str]:
    """Paths under ``work`` that look like what an interrupted run leaves (partials, locks)."""
    found = []
    for directory, dirs, files in os.walk(work):
        for name in [*dirs, *files]:
            if DEBRIS.search(name):
                found.append(str((Path(directory) / name).relative_to(work)))
        dirs[:] = [name for name in dirs if not DEBRIS.search(name)]
    return found


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Make ``path`` the current directory for the block."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


class _Timeout(BaseException):
    """Raised in the main thread when an in-process run passes its timeout."""


def run_in_process(fault: Fault, work: Path, argv: list[str]) -> Observed:
    """Run the CLI through click's CliRunner with a fresh plugin host and the case's environment."""
    from click.testing import CliRunner

    from compress.cli import cli
    from compress.host import reset_host

    def expire(_signum: int, _frame: Any) -> None:
        raise _Timeout

    reset_host()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, fault.timeout)
    start = time.perf_counter()
    timed_out = False
    try:
        result = CliRunner().invoke(cli, argv, env=run_environment(fault, work))
        exit_code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(*result.exc_info))
    except _Timeout:
        timed_out, exit_code, stdout, stderr = True, None, "", ""
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        reset_host()
    return Observed(exit_code, stdout, stderr, time.perf_counter() - start, timed_out=timed_out)


def default_sigint() -> None:
    """In a child before it starts: SIGINT as a terminal sends it. A shell that started the corpus
    in the background leaves SIGINT ignored, and Python then never installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_child(fault: Fault, work: Path, argv: list[str]) -> Observed:
    """Run ``python -m compress`` in a child process (its own process group), killed at the timeout."""
    limit = fault.memory_limit_mb

    def prepare_child() -> None:
        default_sigint()
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit * 2**20, limit * 2**20))

    start = time.perf_counter()
    process = child_process.Popen(
        compress_command(argv),
        cwd=work,
        env=child_environment(fault, work),
        stdout=child_process.PIPE,
        stderr=child_process.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=prepare_child,
    )
    try:
        stdout, stderr = process.communicate(timeout=fault.timeout)
        return Observed(process.returncode, stdout, stderr, time.perf_counter() - start)
    except child_process.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return Observed(None, stdout, stderr, time.perf_counter() - start, timed_out=True)


# ---------------------------------------------------------------- judging


def verdict(fault: Fault, observed: Observed) -> list[str]:
    """The problems with what the run did; an empty list means the fault was handled."""
    if observed.timed_out:
        return [f"no answer within {fault.timeout:.0f} s (a hang)"]
    problems = []
    if "Traceback (most recent call last)" in observed.stderr + observed.stdout:
        problems.append("a traceback")
    if observed.exit_code != fault.exit_code:
        problems.append(f"exit code {observed.exit_code}, expected {fault.exit_code}")
    errors = [line for line in observed.stderr.splitlines() if line.startswith("error:")]
    if fault.exit_code == 2:
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'error:' lines, expected one")
        line = errors[0] if errors else ""
        lines = observed.stderr.rstrip().splitlines()
        if len(errors) == 1 and lines[-1] != line:
            problems.append("the error runs over several lines")
        if errors and fault.message not in line:
            problems.append(f"the error line lacks {fault.message!r}")
        if errors and fault.place is not None and fault.place not in line:
            problems.append(f"the error line does not name the place {fault.place!r}")
    elif fault.message not in observed.stdout + observed.stderr:
        problems.append(f"the output lacks {fault.message!r}")
    problems += [f"left behind: {path}" for path in observed.leftover]
    problems += [f"removed: {path}" for path in observed.lost]
    return problems


def grade(fault: Fault, observed: Observed) -> str:
    """``handled`` (no problems), ``not handled`` (a hang, a traceback or the wrong exit code), else ``partly``."""
    problems = verdict(fault, observed)
    if not problems:
        return "handled"
    fatal = observed.timed_out or observed.exit_code != fault.exit_code or "a traceback" in problems
    return "not handled" if fatal else "partly"


def error_line(observed: Observed) -> str:
    """The observed answer in one line: the ``error:`` line, else the last line of stderr."""
    if observed.timed_out:
        return "(hang)"
    lines = observed.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]
