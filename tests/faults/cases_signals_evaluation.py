"""Signals during the evaluation of ``compress apply``, which runs after the checkpoint is
written: SIGINT and SIGTERM keep the written output, complete but without evaluation
results, and say so in one line (exit 130 / 143); no staging directory or lock is left."""

from __future__ import annotations

import signal
from pathlib import Path

from compress.pytest_plugin import TINY_TEXT
from tests.faults.cases_concurrency import Child, failed_first
from tests.faults.harness import APPLY, Fault, Observed, write_recipe

EVALUATION_STARTED = "compress_phase_start(phase='evaluation')"
"""What COMPRESS_TRACE prints as the evaluation begins (the write has finished)."""


def evaluated_recipe(work: Path) -> list[str]:
    """rtn into bf16 compressed-tensors, evaluated on 64 sequences of 256 tokens: the evaluation
    reads the checkpoint back and runs both models long enough to be caught in."""
    text = work / "text.txt"
    text.write_text(TINY_TEXT * 200, encoding="utf-8")
    write_recipe(
        work,
        data={"evaluation": {"path": str(text), "samples": 64, "seq_len": 256}},
        stages=[{"method": "rtn", "bits": 4, "group_size": 32}],
        output={"dir": str(work / "out"), "format": "compressed-tensors", "dtype": "bfloat16"},
        evaluate=["perplexity", "kl"],
    )
    return APPLY


def interrupt_evaluation(signum: int):
    """An action sending ``signum`` to the run once its evaluation has started."""

    def action(work: Path, argv: list[str]) -> Observed:
        child = Child(work, argv, COMPRESS_TRACE="1")
        if not child.wait_until(lambda: EVALUATION_STARTED in child.stderr()):
            return failed_first(child.finish(), "reach the evaluation")
        child.signal(signum)
        return child.finish()

    return action


CASES = [
    Fault(
        id=f"signals/{signum.name.lower()}-evaluation",
        description=f"{signum.name} during the evaluation of `compress apply`, after the write "
        f"(sent once COMPRESS_TRACE shows the evaluation phase start)",
        setup=evaluated_recipe,
        action=interrupt_evaluation(signum),
        message=f"interrupted by {signum.name} during evaluation: the output is complete, without evaluation results",
        exit_code=code,
        must_exist=("out/model.safetensors", "out/report.json", "out/README.md"),
    )
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143))
]
