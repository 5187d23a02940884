"""``compress.locks.signals_held``: SIGINT and SIGTERM wait for the end of the block, whichever
thread of the process the kernel hands them to, and the block runs in other threads too."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from compress.locks import signals_held


class Terminated(BaseException):
    pass


@contextmanager
def other_thread() -> Iterator[threading.Thread]:
    """A thread that waits (as the memory sampler does) and so can be handed a signal."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_another_thread_is_handed_waits_for_the_block(signum: int) -> None:
    def terminated(_signum: int, _frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    steps = []
    try:
        with other_thread() as thread, pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Terminated):
            with signals_held():
                signal.pthread_kill(thread.ident, signum)
                time.sleep(0.05)  # a handler not held back would run here, at the next bytecode
                steps.append("block finished")
            steps.append("after the block")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == ["block finished"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_handlers_are_back_after_a_block_without_signals() -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with signals_held():
        pass
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_nested_blocks_deliver_once_at_the_outer_end() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            steps.append("inner")
        steps.append("outer")
    assert steps == ["inner", "outer"]


def test_a_block_in_another_thread_runs_unguarded() -> None:
    errors = []

    def run() -> None:
        try:
            with signals_held():  # signal.signal would refuse outside the main thread
                pass
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []
