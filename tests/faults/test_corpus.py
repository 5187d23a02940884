"""One test per fault case in ``tests/faults/cases_*.py``."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tests.faults.harness import Fault, Observed, debris, grade, load_cases, run_fault, verdict

CASES = load_cases()


def test_ids_are_unique_and_categorized():
    repeated = [name for name, count in Counter(case.id for case in CASES).items() if count > 1]
    assert not repeated, f"repeated ids: {repeated}"
    assert all("/" in case.id for case in CASES)


@pytest.mark.parametrize("fault", CASES, ids=[case.id for case in CASES])
def test_fault_is_handled(fault: Fault, tmp_path: Path):
    observed = run_fault(fault, tmp_path / "work")
    problems = verdict(fault, observed)
    assert not problems, f"{fault.description}: {'; '.join(problems)}\nstderr:\n{observed.stderr}"


def test_verdict_names_each_problem():
    fault = Fault(id="t/x", description="", setup=lambda work: [], message="bad key", place="r.yaml:3")
    good = Observed(2, "", "progress 10%\nerror: r.yaml:3:5: bad key\n", 0.1)
    assert verdict(fault, good) == []
    cases = {
        "a traceback": replace(good, exit_code=1, stderr="Traceback (most recent call last):\nValueError: x\n"),
        "exit code 0, expected 2": replace(good, exit_code=0),
        "2 'error:' lines, expected one": replace(good, stderr="error: r.yaml:3: bad key\nerror: again\n"),
        "the error runs over several lines": replace(good, stderr="error: r.yaml:3:5: bad key\n  more text\n"),
        "the error line lacks 'bad key'": replace(good, stderr="error: r.yaml:3:5: other\n"),
        "does not name the place": replace(good, stderr="error: r.yaml:4:1: bad key\n"),
        "left behind: out": replace(good, leftover=("out",)),
        "removed: keep.txt": replace(good, lost=("keep.txt",)),
        "(a hang)": replace(good, exit_code=None, timed_out=True),
    }
    for expected, observed in cases.items():
        problems = "; ".join(verdict(fault, observed))
        assert expected in problems, (expected, problems)
    assert grade(fault, cases["left behind: out"]) == "partly"
    assert grade(fault, cases["a traceback"]) == "not handled"


def test_debris_is_what_an_interrupted_run_leaves(tmp_path: Path):
    for name in (".out.partial-12-ab", ".out.old-12-cd", ".out.lock", "out", ".hidden", "model.safetensors"):
        (tmp_path / name).mkdir()
    (tmp_path / ".out.partial-12-ab" / ".inner.lock").touch()  # inside debris: not listed again
    assert sorted(debris(tmp_path)) == [".out.lock", ".out.old-12-cd", ".out.partial-12-ab"]
