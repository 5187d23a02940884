"""Exclusive locks between compress processes, held on a file beside what they guard.

A lock is ``flock`` on ``.<name>.lock`` (through the ``filelock`` library), so the kernel
releases it when its process dies, however it dies. The file holds the holder's pid, for
the message a refused process prints, and is removed on release; a killed holder leaves
the file, which the next holder reuses and removes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from compress.errors import UserError

POLL_S = 0.1
"""How often a waiting process tries the lock again."""


class LockBusy(Exception):
    """Another process holds the lock."""

    def __init__(self, path: Path, holder: int | None) -> None:
        super().__init__(f"{path} is held by {'pid ' + str(holder) if holder else 'another process'}")
        self.path = path
        self.holder = holder


def lock_path(target: Path) -> Path:
    """The lock file guarding ``target``: hidden, beside it."""
    return target.parent / f".{target.name}.lock"


def holder(path: Path) -> int | None:
    """The pid written in lock file ``path``, if it can be read."""
    with suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def running_holder(target: Path) -> int | None:
    """The pid of a live process recorded as holding the lock guarding ``target``, read
    without taking the lock (a killed holder's file names a process that is gone)."""
    pid = holder(lock_path(target))
    return pid if pid is not None and pid != os.getpid() and pid_alive(pid) else None


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the block and deliver them at its end, so that a
    step and the record of it (a lock taken, a directory created) are never cut apart.

    Python runs signal handlers in the main thread, whichever thread the kernel hands a
    signal to; so the main thread's handlers are swapped for ones that note the signal, and
    the noted signals are raised again once the handlers are back. (A thread's signal mask
    would hold nothing back: the kernel gives the signal to a thread that does not block it,
    the memory sampler's or torch's, and Python then runs the handler in the main thread at
    once.) In any other thread the block runs unguarded, which is safe: a handler cannot
    interrupt that thread, it raises in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not installed from Python, which cannot be put back; the default acts alike
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


@contextmanager
def locked(target: Path, wait: bool, announce: Callable[[int | None], None] | None = None) -> Iterator[None]:
    """Hold the lock guarding ``target`` for the block.

    With ``wait`` false a lock held by another process raises :class:`LockBusy` at once;
    with ``wait`` true this calls ``announce`` with the holder's pid, then waits for it
    (an interrupt still ends the wait).
    """
    path = lock_path(target)
    lock = FileLock(path, timeout=0)
    announced = False
    try:
        while True:
            with signals_held():
                if _acquire(lock, path):
                    break
            if not wait:
                raise LockBusy(path, holder(path))
            if announce is not None and not announced:
                announce(holder(path))
                announced = True
            time.sleep(POLL_S)
        yield
    finally:
        # ``is_locked``, not a flag set after acquiring: a held signal is raised as the block that
        # acquired ends, before a flag could be set
        if lock.is_locked:
            with signals_held():
                # unlinked before the unlock: a waiter that then locks this inode finds it gone and retries
                path.unlink(missing_ok=True)
                lock.release()


def _acquire(lock: FileLock, path: Path) -> bool:
    """Take ``lock`` if it is free, recording this process's pid in it."""
    try:
        lock.acquire()
    except Timeout:
        return False
    except OSError as error:
        raise UserError(f"cannot create the lock file: {error.strerror}", str(path)) from None
    path.write_text(f"{os.getpid()}\n")
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
