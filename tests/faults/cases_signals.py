"""Signals during ``compress apply``: SIGINT and SIGTERM while loading and in a stage answer
one line and exit 130 / 143 with nothing left; a SIGKILL leaves a staging directory that
the next run removes.

The write of the tiny model takes milliseconds, and the evaluation follows it inside the
staging directory: a signal sent once the staging directory appears lands in the evaluation,
which keeps the written output (cases_signals_evaluation.py). An interrupt inside the write
itself is tested in-process (tests/test_interrupted_evaluation.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.faults.cases_concurrency import Child, appears, failed_first
from tests.faults.harness import APPLY, Fault, Observed, data_entry, write_recipe

PHASES = {
    "loading": "the output lock is taken, right before the weights are read",
    "a stage": "gptq's stage has started (COMPRESS_TRACE shows compress_stage_start)",
}


def slow_recipe(work: Path) -> list[str]:
    """gptq on enough calibration data and an evaluation long enough to be caught in."""
    data = data_entry(samples=32, seq_len=128)
    write_recipe(
        work,
        data={"calibration": data, "evaluation": data},
        stages=[{"method": "gptq", "bits": 4, "group_size": 32}],
        evaluate=["perplexity", "kl"],
    )
    return APPLY


def phase_started(work: Path, child: Child, phase: str) -> Callable[[], bool]:
    if phase == "loading":
        return appears(work, ".out.lock")
    return lambda: "compress_stage_start(" in child.stderr()


def interrupt(signum: int, phase: str) -> Callable[[Path, list[str]], Observed]:
    """An action sending ``signum`` to the run once it is in ``phase``."""

    def action(work: Path, argv: list[str]) -> Observed:
        child = Child(work, argv, COMPRESS_TRACE="1")
        if not child.wait_until(phase_started(work, child, phase)):
            return failed_first(child.finish(), f"reach {phase}")
        child.signal(signum)
        return child.finish()

    return action


def killed_then_rerun(work: Path, argv: list[str]) -> Observed:
    """SIGKILL in the write, then the same command again: it removes what the first left."""
    first = Child(work, argv)
    if not first.wait_until(appears(work, ".out.partial-*")):
        return failed_first(first.finish(), "reach the write")
    first.signal(signal.SIGKILL)
    first.finish()
    if not any(work.glob(".out.partial-*")) or (work / "out").exists():
        return Observed(-1, "", "the killed run left no staging directory, or a complete output", 0.0)
    return Child(work, argv).finish()


def signal_cases() -> list[Fault]:
    cases = []
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        for phase, marker in PHASES.items():
            cases.append(
                Fault(
                    id=f"signals/{signum.name.lower()}-{phase.split()[-1]}",
                    description=f"{signum.name} during {phase} of `compress apply` (sent once {marker})",
                    setup=slow_recipe,
                    action=interrupt(signum, phase),
                    message=f"interrupted by {signum.name}",
                    exit_code=code,
                    must_not_exist=("out",),
                )
            )
    return cases


CASES = [
    *signal_cases(),
    Fault(
        id="signals/sigkill-write-then-rerun",
        description="SIGKILL during the write, then the same `compress apply` again",
        setup=slow_recipe,
        action=killed_then_rerun,
        message="left by an interrupted run",
        exit_code=0,
    ),
]
