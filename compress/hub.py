"""Publishing an output directory to the Hugging Face Hub (``compress push``, a recipe's ``export.hub``).

The directory is checked to be a complete ``compress`` output first; its README.md model
card is written when missing (``compress apply`` writes one); then huggingface_hub's
``create_repo`` and ``upload_folder`` send it. The token comes from the standard places
(``HF_TOKEN``, the file ``hf auth login`` writes) through ``huggingface_hub.get_token``
and is never printed or written; the endpoint from ``HF_ENDPOINT`` (default the Hub).

Retries: huggingface_hub retries the preupload call and, through its hf_xet upload
pipeline (hf_xet is its dependency on x86-64 and arm64), the commit itself, with
exponential backoff on 5xx answers and dropped connections (5 retries, 1 s doubling to
8 s). Retrying the commit is safe because it targets an explicit branch and files the
Hub already holds unchanged are skipped; for the same reason pushing again after a
failure is safe, which is the remedy where the commit is not retried (no hf_xet) and for
``create_repo`` and ``create_branch``, which are not retried. Nothing in the local
directory is written except a missing README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from compress.checkpoint.loaders import stored_tensors
from compress.errors import UserError
from compress.host import PluginHost
from compress.hub_download import hub_endpoint
from compress.modelcard import directory_card
from compress.recipe import HubExport, Recipe

try:  # huggingface_hub 2 sends requests through httpx2, 1.x through httpx
    from httpx2 import HTTPError
except ImportError:
    from httpx import HTTPError

REQUIRED_FILES = ("config.json", "report.json", "recipe.yaml")
SHARD_INDEX = "model.safetensors.index.json"
LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"


def check_output(directory: Path) -> None:
    """Raise UserError unless ``directory`` is a complete ``compress apply`` output."""
    if not directory.is_dir():
        raise UserError("not a directory", str(directory))
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise UserError(f"not a complete compress output: no {name}", str(directory))
    index = directory / SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"not a complete compress output: unreadable {SHARD_INDEX}", str(directory)) from None
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise UserError(
                f"not a complete compress output: shard {missing[0]} listed in {SHARD_INDEX} is missing",
                str(directory),
            )
    stored_tensors(directory)  # none at all, or one cut short


def hub_token() -> str:
    """The user's Hugging Face token; a UserError that says how to log in when there is none."""
    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token: {LOGIN_HINT}")
    return token


def hub_api(token: str) -> HfApi:
    """An API client for ``HF_ENDPOINT``, read now (huggingface_hub reads it once, at import)."""
    return HfApi(endpoint=hub_endpoint(), token=token)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def push(host: PluginHost, directory: Path, target: HubExport) -> str:
    """Upload ``directory`` to ``target.repo_id``; returns the commit's URL."""
    try:
        validate_repo_id(target.repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid Hub repository id: {_first_line(error)}", target.repo_id) from None
    check_output(directory)
    token = hub_token()
    if not (directory / "README.md").is_file():
        directory_card(host, directory).save(directory / "README.md")
    api = hub_api(token)
    try:
        api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision is not None:
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=target.repo_id,
            folder_path=directory,
            revision=target.revision,
            commit_message=f"Upload {directory.name} with compress",
        )
    except (OSError, HTTPError, ValueError) as error:
        raise UserError(
            f"upload to {api.endpoint}/{target.repo_id} failed ({_first_line(error)}); "
            "the local output is intact, push it again with `compress push`",
            str(directory),
        ) from None
    return commit.commit_url


def check_export(recipe: Recipe) -> None:
    """Fail before the run, not after it, when a recipe exports and no token is there."""
    if recipe.export is not None and recipe.export.hub is not None:
        hub_token()


def export_output(host: PluginHost, recipe: Recipe) -> str | None:
    """Run the recipe's ``export:`` on its written output; returns the commit URL, if any."""
    if recipe.export is None or recipe.export.hub is None or recipe.output is None:
        return None
    return push(host, Path(recipe.output.dir), recipe.export.hub)
