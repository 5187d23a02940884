"""Runs that race: two writing one output directory, first uses of a built-in model on an
empty cache, and what a killed run leaves in the way of the next one.

The helpers here start ``compress`` children and act on them at a point of their run;
``cases_signals`` uses them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import (
    APPLY,
    Fault,
    Observed,
    child_environment,
    compress_command,
    copy_tiny_model,
    default_sigint,
    recipe_setup,
)

POLL_S = 0.002
BUILTIN = "smollm2-135m-instruct"


class Child:
    """``compress argv`` running in ``work`` (its own process group) with the environment
    every fault run gets plus ``env``, after ``preexec`` (in the child, before it starts; SIGINT
    at its default there too); its output goes to files, readable while it runs."""

    def __init__(self, work: Path, argv: list[str], preexec: Callable[[], None] | None = None, **env: str) -> None:
        bare = Fault("-/-", "", lambda _work: [], "")
        self.logs = Path(tempfile.mkdtemp(prefix="compress-child-"))
        self.started = time.perf_counter()
        with open(self.logs / "stdout", "w") as stdout, open(self.logs / "stderr", "w") as stderr:
            self.process = subprocess.Popen(
                compress_command(argv),
                cwd=work,
                env={**child_environment(bare, work), **env},
                stdout=stdout,
                stderr=stderr,
                text=True,
                start_new_session=True,
                preexec_fn=lambda: (default_sigint(), preexec and preexec()),
            )
        self.pid = self.process.pid

    def stderr(self) -> str:
        """What it has written to stderr so far."""
        return (self.logs / "stderr").read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Poll ``ready`` until it holds (True), or the child ends or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if ready():
                return True
            time.sleep(POLL_S)
        return False

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child's process group."""
        os.killpg(self.pid, signum)

    def finish(self, timeout: float = 120.0) -> Observed:
        """Wait for the child and record what it did (killed at the timeout)."""
        timed_out = False
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.signal(signal.SIGKILL)
            self.process.wait()
        stdout, stderr = (self.logs / "stdout").read_text(errors="replace"), self.stderr()
        shutil.rmtree(self.logs, ignore_errors=True)
        code = None if timed_out else self.process.returncode
        return Observed(code, stdout, stderr, time.perf_counter() - self.started, timed_out=timed_out)


def appears(work: Path, pattern: str) -> Callable[[], bool]:
    """A ``ready`` test: something under ``work`` matches the glob ``pattern``."""
    return lambda: any(work.glob(pattern))


def failed_first(first: Observed, what: str) -> Observed:
    """An observation that fails any verdict: the run the case depends on did not do ``what``."""
    return Observed(-1, first.stdout, f"the first run did not {what} (exit {first.exit_code}):\n{first.stderr}", 0.0)


DEAD_PID = 2**22 + 1
"""A pid no process can have: above Linux's largest pid_max."""


STALE_PARTIAL = f".out.partial-{DEAD_PID}-abc123"
STALE_OLD = f".out.old-{DEAD_PID}-def456"
STALE_CACHE_PARTIAL = f".{BUILTIN}.partial-{DEAD_PID}-xyz789"


tiny_apply = recipe_setup(command="apply")


def while_writing(work: Path, argv: list[str]) -> Observed:
    """A first ``compress apply`` is stopped (SIGSTOP) while it holds the output's lock;
    ``compress argv`` runs to its end; then the first is let go and must finish as if alone."""
    first = Child(work, APPLY)
    lock = work / ".out.lock"
    if not first.wait_until(lambda: lock.is_file() and lock.read_text().strip() != ""):
        return failed_first(first.finish(), "take the output lock")
    first.signal(signal.SIGSTOP)
    try:
        second = Child(work, argv).finish()
    finally:
        first.signal(signal.SIGCONT)
    ran = first.finish()
    if ran.exit_code != 0 or not (work / "out" / "config.json").is_file():
        return failed_first(ran, "finish and write out/")
    if f"pid {first.pid}" not in second.stderr:
        return Observed(-1, second.stdout, f"the refusal does not name pid {first.pid}:\n{second.stderr}", 0.0)
    return second


def first_uses(work: Path, argv: list[str]) -> Observed:
    """Two ``recipe check`` runs of the built-in model on one empty cache: both must answer
    ok, one converting and the other waiting for it."""
    cache = str(work / "cache")
    runs = [Child(work, argv, COMPRESS_CACHE=cache), Child(work, argv, COMPRESS_CACHE=cache)]
    first, second = (run.finish(timeout=300) for run in runs)
    if first.exit_code != 0:
        return failed_first(first, "answer ok")
    waited = "waiting for pid" in first.stderr + second.stderr
    stderr = second.stderr + ("" if waited else "\nneither run waited for the other's conversion")
    return Observed(second.exit_code if waited else -1, second.stdout, stderr, second.seconds)


def stale_lock(work: Path) -> list[str]:
    """A lock file left by a killed run: its process is gone and holds no lock."""
    (work / ".out.lock").write_text(f"{DEAD_PID}\n")
    return tiny_apply(work)


def stale_partials(work: Path) -> list[str]:
    """A half-written staging directory and a retired output left by killed runs."""
    partial = work / STALE_PARTIAL
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)
    (work / STALE_OLD).mkdir()
    return tiny_apply(work)


def cached_builtin(work: Path) -> str:
    """A cache already holding the built-in model (the tiny one stands in for it) and the
    staging directory of a conversion that was killed; the model's name."""
    models = work / "cache" / "models"
    models.mkdir(parents=True)
    copy_tiny_model(models, BUILTIN)
    (models / STALE_CACHE_PARTIAL).mkdir()
    return BUILTIN


CASES = [
    Fault(
        id="concurrency/same-output",
        description="a second `compress apply` writing the output directory of a run in progress",
        setup=tiny_apply,
        action=while_writing,
        message="another compress run (pid",
        place="out",
    ),
    Fault(
        id="concurrency/check-while-writing",
        description="`compress recipe check` of a recipe whose output directory a run is writing",
        setup=recipe_setup(),
        action=while_writing,
        message="another compress run (pid",
        place="recipe.yaml:16",
    ),
    Fault(
        id="concurrency/first-use-conversion",
        description="two first runs of the built-in smollm2-135m-instruct on one empty cache (~30 s)",
        setup=recipe_setup(model=BUILTIN, stages=[{"method": "rtn", "bits": 4, "group_size": 64}]),
        action=first_uses,
        message="recipe.yaml: ok",
        exit_code=0,
        timeout=300,
    ),
    Fault(
        id="concurrency/stale-lock-file",
        description="the output's lock file left by a killed run (pid gone)",
        setup=stale_lock,
        subprocess=True,
        message="wrote",
        exit_code=0,
        must_not_exist=(".out.lock",),
    ),
    Fault(
        id="concurrency/stale-partials",
        description="a staging and a retired directory left next to the output by killed runs",
        setup=stale_partials,
        subprocess=True,
        message="left by an interrupted run",
        exit_code=0,
        must_not_exist=(STALE_PARTIAL, STALE_OLD),
    ),
    Fault(
        id="concurrency/stale-cache-partial",
        description="a killed conversion's staging directory in COMPRESS_CACHE",
        setup=recipe_setup(model=cached_builtin),
        env={"COMPRESS_CACHE": "{work}/cache"},
        message="left by an interrupted run",
        exit_code=0,
        must_not_exist=(f"cache/models/{STALE_CACHE_PARTIAL}",),
    ),
]
