"""Reading repositories from the Hugging Face Hub: the user's settings, read when used, and
huggingface_hub's errors as one line each.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` (``HF_HOME``) and ``HF_HUB_OFFLINE``
once, when it is first imported; compress reads them again at each download, so a setting
made after the import (a test, an embedding program) is obeyed too. The token is
huggingface_hub's own (``HF_TOKEN``, then the file ``hf auth login`` writes), never printed.
Downloads go into the standard cache, where huggingface_hub writes each file under a
temporary name and renames it when complete, so an interrupted download never leaves a file
that looks whole, and the next run resumes it.

``COMPRESS_NO_DOWNLOAD=1`` keeps compress from downloading: only what the cache already
holds is used, as with ``HF_HUB_OFFLINE=1``, which also keeps every other library offline.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path

from compress.errors import UserError, one_line

NO_DOWNLOAD = "COMPRESS_NO_DOWNLOAD"
"""The environment switch that keeps compress from downloading from the Hub."""
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def switched_on(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, on, yes, true)."""
    return os.environ.get(name, "").strip().upper() in TRUE_VALUES


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, else as huggingface_hub read it."""
    import huggingface_hub.constants

    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return switched_on("HF_HUB_OFFLINE") or switched_on("TRANSFORMERS_OFFLINE")
    return huggingface_hub.constants.HF_HUB_OFFLINE


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now; None: huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def hub_cache() -> str:
    """The Hub cache directory as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    import huggingface_hub.constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return huggingface_hub.constants.HF_HUB_CACHE


def local_only() -> str | None:
    """Why nothing may be downloaded now (the switch that is on), or None when downloads are allowed."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if switched_on(NO_DOWNLOAD):
        return f"{NO_DOWNLOAD} is set"
    return None


def cached_repo_ids(kind: str) -> list[str]:
    """The ids of the ``kind`` repositories (``model``, ``dataset``) the cache holds, from its folder names."""
    prefix = f"{kind}s--"
    try:
        names = os.listdir(hub_cache())
    except OSError:
        return []
    return [name[len(prefix) :].replace("--", "/") for name in names if name.startswith(prefix)]


def similar_ids(repo_id: str, kind: str) -> list[str]:
    """The id closest to ``repo_id`` among the ``kind`` repositories in the local cache and, with
    downloads allowed, those of its owner on the Hub (one listing request); empty when none is close."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    candidates = cached_repo_ids(kind)
    owner = repo_id.split("/")[0] if "/" in repo_id else None
    if owner and local_only() is None:
        api = HfApi(endpoint=hub_endpoint())
        listing = api.list_models if kind == "model" else api.list_datasets
        # only a hint: when the listing fails, the error stands without it
        with contextlib.suppress(HfHubHTTPError, httpx2.HTTPError, OSError, ValueError):
            candidates += [info.id for info in listing(author=owner, limit=1000)]
    return difflib.get_close_matches(repo_id, candidates, n=1)


def hub_error(error: BaseException, repo_id: str, kind: str, revision: str | None) -> UserError | None:
    """``error``, raised by huggingface_hub while reading the ``kind`` repository ``repo_id``, as one
    line placed at the repository; None for an error that is not about reaching or reading the Hub."""
    import httpx2
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fetch = f"`hf download {repo_id}{' --repo-type dataset' if kind == 'dataset' else ''}`"
    if isinstance(error, GatedRepoError):
        message = f"a gated {kind} repository: accept its conditions on its Hub page, then {LOGIN_HINT}"
    elif isinstance(error, RepositoryNotFoundError):
        close = similar_ids(repo_id, kind)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        access = (
            "or your token cannot read it" if get_token() else f"a private or gated one needs a token: {LOGIN_HINT}"
        )
        message = f"no such {kind} repository on the Hub{hint} ({access})"
    elif isinstance(error, RevisionNotFoundError):
        message = f"the {kind} repository has no revision {revision!r} (a branch, tag or commit)"
    elif isinstance(error, RemoteEntryNotFoundError):
        message = f"the {kind} repository lacks a file it lists: {one_line(str(error))}"
    elif isinstance(error, IncompleteSnapshotError):
        message = (
            f"the local Hugging Face cache holds only part of it and {local_only() or 'the Hub cannot be reached'}; "
            "download it once with network access"
        )
    elif isinstance(error, LocalEntryNotFoundError):
        reason = local_only()
        if reason is not None:
            message = (
                f"{reason} and it is not in the local Hugging Face cache ({hub_cache()}): "
                f"unset it to download, or fetch it first with {fetch}"
            )
        else:
            message = unreachable(error)
    elif isinstance(error, (httpx2.ConnectError, httpx2.TimeoutException, ConnectionError)):
        message = unreachable(error)
    elif isinstance(error, HfHubHTTPError):
        message = f"the Hub refused the download: {one_line(str(error)).split('. ')[0]}"
    elif isinstance(error, httpx2.HTTPError):
        message = f"the download broke off ({type(error).__name__}); run again to resume it"
    else:
        return None
    return UserError(message, f"{repo_id}@{revision}" if revision else repo_id)


def unreachable(error: BaseException) -> str:
    """The one line for a Hub that cannot be reached, with the way to work offline."""
    cause = error.__cause__ or error
    endpoint = hub_endpoint() or "https://huggingface.co"
    return (
        f"cannot reach the Hub at {endpoint} ({type(cause).__name__}); without network, "
        "set HF_HUB_OFFLINE=1 to use the copy in the local Hugging Face cache (fetched once with `hf download`)"
    )


def snapshot(repo_id: str, kind: str, revision: str | None, patterns: list[str]) -> Path:
    """The local snapshot of the files of the ``kind`` repository ``repo_id`` at ``revision`` that
    match ``patterns`` (top-level files only), downloaded into the Hub cache unless a switch keeps
    compress offline (:func:`local_only`); a one-line UserError when that is impossible."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            repo_type=kind,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=["*/*"],
            cache_dir=hub_cache(),
            endpoint=hub_endpoint(),
            local_files_only=local_only() is not None,
        )
    except Exception as error:
        problem = hub_error(error, repo_id, kind, revision)
        if problem is None:
            raise
        raise problem from None
    return Path(folder)
