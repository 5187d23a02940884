"""Directories that appear complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; rename it to ``target`` on success.

    On any exception (KeyboardInterrupt included) the staging directory is removed and
    ``target`` is left as it was. An existing ``target`` is replaced only when
    ``overwrite`` is true, and only once the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError("output directory exists (pass --overwrite to replace it)", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make every output private
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
