"""Which process this is in a multi-process run (``accelerate launch``, ``torchrun``).

Read from the launchers' environment variables, so importing it costs nothing (the CLI
and the plugin host need it before torch is imported).
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """False in every process but the first of a multi-process (DDP) run."""
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int | None:
    """This process's index on its machine, or None outside a multi-process launch."""
    rank = os.environ.get("LOCAL_RANK")
    return None if rank is None else int(rank)


def local_processes() -> int:
    """How many processes of this run share this machine (1 outside a multi-process launch)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
