"""The fault corpus as a report: runs every case in ``tests/faults/cases_*.py`` and writes
docs/reliability.md.

For each case the report shows the input, what the CLI must answer (exit code, the one
``error:`` line's message and place), what it answered, and the verdict from
``tests.faults.harness.grade``: handled, partly (the right exit code, but the message,
the place or the cleanup is wrong) or not handled (a traceback, a hang or the wrong exit
code). Below the table: the time ``compress recipe check`` takes on the corpus's largest
recipe (``recipe/large-with-typo`` with its typo fixed, so that every check runs), as the
median of ``--repeats`` runs of the command in a child process (interpreter and torch
start-up included) and of ``compress.validate.check_recipe`` alone in this process.

Usage::

    python -m scripts.fault_corpus                       # writes docs/reliability.md
    python -m scripts.fault_corpus --output /tmp/r.md --repeats 3
    python -m scripts.fault_corpus --subprocess          # every case in a child process (slower; what a user sees)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from scripts.common import environment
from tests.faults.cases_recipes_basic import LARGE_STAGES, large_recipe_text
from tests.faults.harness import (
    Fault,
    Observed,
    child_environment,
    compress_command,
    error_line,
    grade,
    load_cases,
    run_fault,
    tiny_model,
    tiny_text,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
GRADES = ("handled", "partly", "not handled")


def cell(text: str, limit: int = 180) -> str:
    """``text`` fit for a markdown table cell: one line, pipes escaped, at most ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def expected(fault: Fault) -> str:
    """What the CLI must answer, in words."""
    if fault.exit_code != 2:
        return f"exit {fault.exit_code}, output shows `{fault.message}`"
    place = f" at `{fault.place}`" if fault.place else ""
    return f"exit 2, one line{place}: `{fault.message}`"


def observed_text(observed: Observed, work: Path) -> str:
    """What the CLI answered: exit code and its error line, the work directory shown as ``.``."""
    line = error_line(observed).replace(str(work), ".")
    return f"exit {observed.exit_code}: {line}" if not observed.timed_out else line


@dataclass
class Row:
    """One case's line in the table."""

    fault: Fault
    observed: str
    grade: str
    problems: str


def run_corpus(cases: list[Fault]) -> list[Row]:
    """Run every case in a fresh directory."""
    rows = []
    for fault in cases:
        with tempfile.TemporaryDirectory(prefix="fault-") as directory:
            work = Path(directory) / "work"
            observed = run_fault(fault, work)
            problems = "; ".join(verdict(fault, observed)).replace(str(work), ".")
            rows.append(Row(fault, observed_text(observed, work), grade(fault, observed), problems))
        print(f"{rows[-1].grade:12} {observed.seconds:6.1f} s  {fault.id}", file=sys.stderr)
    return rows


def time_large_recipe(repeats: int) -> dict[str, float | int]:
    """Median seconds of ``compress recipe check`` (a child process) and of ``check_recipe`` on the large recipe."""
    from compress.host import get_host
    from compress.validate import check_recipe

    with tempfile.TemporaryDirectory(prefix="large-recipe-") as directory:
        work = Path(directory)
        text = large_recipe_text(LARGE_STAGES, error=False)
        recipe = work / "recipe.yaml"
        recipe.write_text(text.format(model=tiny_model(), text=tiny_text(), out=work / "out"), encoding="utf-8")
        probe = Fault(id="timing/large", description="", setup=lambda _: [], message="")
        command, env = compress_command(["recipe", "check", str(recipe)]), child_environment(probe, work)
        commands = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, cwd=work, env=env, check=True, capture_output=True)
            commands.append(time.perf_counter() - start)
        host = get_host()
        check_recipe(host, recipe)  # warm-up: imports and the model's config
        checks = []
        for _ in range(repeats):
            start = time.perf_counter()
            check_recipe(host, recipe)
            checks.append(time.perf_counter() - start)
        return {
            "lines": text.count("\n"),
            "kilobytes": round(recipe.stat().st_size / 1024),
            "command": statistics.median(commands),
            "check": statistics.median(checks),
            "repeats": repeats,
        }


def report(rows: list[Row], timing: dict, seconds: float) -> str:
    """docs/reliability.md's text."""
    totals = Counter(row.grade for row in rows)
    env = environment("cpu")
    lines = [
        "# Reliability: the fault corpus",
        "",
        "Every case is a bad input or a fault run through the real `compress` command line"
        " (`tests/faults/`, one test each in `tests/faults/test_corpus.py`). A case is *handled*"
        " when the command exits with the expected code, prints exactly one `error:` line (the last"
        " line on stderr, no traceback) that contains the expected message and names the place,"
        " and leaves nothing behind: no output, no partial directory, no lock. *Partly*: the"
        " right exit code, but the message, the place or the cleanup is wrong. *Not handled*: a"
        " traceback, a hang or the wrong exit code.",
        "",
        "Regenerate with `python -m scripts.fault_corpus` (this file is its output).",
        "",
        f"**{len(rows)} cases: {totals['handled']} handled, {totals['partly']} partly,"
        f" {totals['not handled']} not handled.**",
        "",
        f"Run on {datetime.date.today().isoformat()}: {env['platform']}, {env['cpu_count']} CPUs,"
        f" Python {env['python']}, torch {env['torch']}, transformers {env['transformers']};"
        f" the whole corpus took {seconds:.0f} s.",
        "",
        "## `compress recipe check` on the largest recipe",
        "",
        f"`recipe/large-with-typo` with its typo fixed: {LARGE_STAGES} rtn stages, each naming"
        f" all 14 Linear layers of the tiny test model twice (exact names and anchored regular"
        f" expressions), {timing['lines']} lines, {timing['kilobytes']} KB. Median of"
        f" {timing['repeats']} runs:",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `compress recipe check` (child process, start-up included) | {timing['command']:.2f} |",
        f"| `check_recipe` alone (parse, schema, plugins, targets, format) | {timing['check']:.2f} |",
        "",
    ]
    categories: dict[str, list[Row]] = {}
    for row in rows:
        categories.setdefault(row.fault.category.rstrip("s"), []).append(row)
    for category, members in categories.items():
        counts = Counter(row.grade for row in members)
        lines += [
            f"## {category} ({len(members)}: {', '.join(f'{counts[g]} {g}' for g in GRADES if counts[g])})",
            "",
            "| id | input | expected | observed | verdict |",
            "|---|---|---|---|---|",
        ]
        for row in members:
            verdict_text = row.grade if row.grade == "handled" else f"**{row.grade}**: {row.problems}"
            lines.append(
                f"| `{row.fault.id}` | {cell(row.fault.description)} | {cell(expected(row.fault))} |"
                f" {cell(row.observed)} | {cell(verdict_text, 300)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (the median is reported)")
    parser.add_argument("--subprocess", action="store_true", help="run every case in a child process")
    parser.add_argument("-k", dest="only", default="", help="run only the cases whose id contains this")
    args = parser.parse_args()
    cases = [case for case in load_cases() if args.only in case.id]
    if args.subprocess:
        cases = [replace(case, subprocess=True) for case in cases]
    start = time.perf_counter()
    rows = run_corpus(cases)
    seconds = time.perf_counter() - start
    timing = time_large_recipe(args.repeats)
    args.output.write_text(report(rows, timing, seconds) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
