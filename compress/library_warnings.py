"""Library warnings during a loop that draws a progress bar: one clean line each, once.

Libraries warn through :mod:`warnings` (torch, transformers' deprecations) and through
:mod:`logging` (accelerate's "Removed shared tensor ... while saving" on every checkpoint of
a model with tied weights, transformers' own logger). Written straight to stderr, they
land in the middle of the bar's line and repeat at every save. Inside
:func:`warnings_above_the_bar` each distinct message is written once, through
``tqdm.write`` (which clears the bar, writes the line and redraws the bar), as
``warning (SOURCE): MESSAGE``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


class _Once:
    """Writes each distinct (source, message) once above the progress bars."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def write(self, source: str, message: str) -> None:
        text = " ".join(message.split())
        if (source, text) not in self.seen:
            self.seen.add((source, text))
            tqdm.write(f"warning ({source}): {text}", file=sys.stderr)


class _OnceHandler(logging.Handler):
    def __init__(self, once: _Once) -> None:
        super().__init__(logging.WARNING)
        self.once = once

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.once.write(record.name, record.getMessage())
        except Exception:
            self.handleError(record)


@contextmanager
def warnings_above_the_bar() -> Iterator[None]:
    """Route :mod:`warnings` and WARNING-or-worse log records through ``tqdm.write``, each
    distinct message once, for the duration.

    The root logger gets the handler (records that reach no other handler would otherwise
    go to stderr through :data:`logging.lastResort`); transformers' logger, which writes
    to stderr itself, propagates to it instead for the duration. Handlers that the
    program configured on the root logger keep receiving the records.
    """
    once = _Once()
    handler = _OnceHandler(once)
    root = logging.getLogger()
    root.addHandler(handler)
    transformers_logger = logging.getLogger("transformers")
    transformers_handlers = list(transformers_logger.handlers)
    propagate = transformers_logger.propagate
    for own in transformers_handlers:
        transformers_logger.removeHandler(own)
    transformers_logger.propagate = True

    def show(message: Any, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        once.write(category.__name__, str(message))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        root.removeHandler(handler)
        transformers_logger.propagate = propagate
        for own in transformers_handlers:
            transformers_logger.addHandler(own)
