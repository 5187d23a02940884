"""Directories that appear complete or not at all.

A directory is written into ``.<name>.partial-<pid>-<random>`` beside its target and
renamed into place when complete. A killed run leaves that staging directory behind; the
next run writing the same target removes every one whose process is gone.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import UserError
from compress.locks import pid_alive, signals_held

DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
"""Write failures that are the place's fault (full, read-only, over a size limit), not a bug."""


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_error(error: BaseException) -> str | None:
    """The reason a write failed when the disk or the place is at fault, else None.

    Rust writers (safetensors) raise their own exception types carrying ``(os error N)``.
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code in DISK_ERRORS else None


def _debris_pid(name: str, target: Path) -> int | None:
    found = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:partial|old)-(\d+)-.*", name)
    return int(found.group(1)) if found else None


def remove_stale(target: Path) -> None:
    """Remove the staging and retired directories of ``target`` whose process is gone.

    A run killed between its two renames of an overwrite leaves the previous output only in
    its retired directory: that is put back when ``target`` is missing.
    """
    if not target.parent.is_dir():
        return
    for path in sorted(target.parent.iterdir()):
        pid = _debris_pid(path.name, target)
        if pid is None or pid_alive(pid):
            continue
        previous = path / target.name
        if previous.is_dir() and not target.exists():
            previous.rename(target)
        shutil.rmtree(path, ignore_errors=True)
        print(f"note: removed {path}, left by an interrupted run (pid {pid})", file=sys.stderr)


def follow_umask(directory: Path) -> None:
    """Give every file under ``directory`` the permissions the umask allows: some writers
    (safetensors) create their files 0600, which would make one file of an output private."""
    allowed = 0o666 & ~current_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode | allowed)


def make_staging(target: Path, kind: str) -> Path:
    """An empty directory ``.<target>.<kind>-<pid>-<random>`` beside ``target``."""
    prefix = f".{target.name}.{kind}-{os.getpid()}-"
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    except OSError as error:
        raise UserError(f"cannot write here: {error.strerror}", str(target.parent)) from None
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make every output private
    return staging


def prepare_parent(target: Path) -> list[Path]:
    """Create ``target``'s missing parent directories (returned, outermost first), or say in
    one line why they cannot be."""
    missing = [path for path in [target.parent, *target.parent.parents] if not path.exists()][::-1]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the directory: {error.strerror}", str(error.filename or target.parent)
        ) from None
    return missing


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; rename it to ``target`` on success.

    On any exception (KeyboardInterrupt included) the staging directory is removed and
    ``target`` is left as it was; a write that fails because the disk is full or the place
    is not writable becomes a one-line UserError. An existing ``target`` is replaced only
    when ``overwrite`` is true, and only once the new one is complete; one that appeared
    during the write is refused then. Callers that may race on ``target`` hold
    :func:`compress.locks.locked` around this.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError("output directory exists (pass --overwrite to replace it)", str(target))
    prepare_parent(target)
    remove_stale(target)
    staging = None
    try:
        with signals_held():
            staging = make_staging(target, "partial")
        yield staging
        follow_umask(staging)
        if target.exists() and not overwrite:
            raise UserError("output directory appeared during the run (pass --overwrite to replace it)", str(target))
        with signals_held():  # an interrupt between the renames would leave no output at all
            if target.exists():
                retired = make_staging(target, "old")
                target.rename(retired / target.name)
                staging.rename(target)
                shutil.rmtree(retired)
            else:
                staging.rename(target)
    except BaseException as error:
        if staging is not None:
            with signals_held():
                shutil.rmtree(staging, ignore_errors=True)
        reason = disk_error(error) if isinstance(error, Exception) and not isinstance(error, UserError) else None
        if reason is not None:
            raise UserError(f"cannot write the output: {reason}", str(target)) from None
        raise
