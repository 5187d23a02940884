"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where in a file a problem is: 1-based line and column, like compilers print them."""

    file: str
    line: int | None = None
    column: int | None = None
    note: str | None = None
    """What put the value there when the file did not, e.g. ``--set stages.0.bits=3``; printed after the position."""

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts) + (f" ({self.note})" if self.note else "")


class UserError(Exception):
    """A problem in the user's input: recipe, files, options, or an installed plugin.

    ``where`` is a Location or a short free-form place (a layer name, a path).
    """

    exit_code = 2

    def __init__(self, message: str, where: Location | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class OutputKept(KeyboardInterrupt):
    """An interrupt that came once the output was written (during its evaluation): the output
    is complete, without evaluation results. Raised from the interrupt it stands for, so
    ``__cause__`` tells SIGINT from SIGTERM."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """A suffix for an unknown-name message: the closest choice, or all of them."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(sorted(choices))})"


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed, for a one-line message
    that quotes another library's (often multi-line) error."""
    return " ".join(text.split())
