"""Hub models and datasets that cannot be read: each is refused in one line, with nothing written.

The model cases run against the loopback Hub (tests/hub_server.py), started around the run, which
holds the tiny model as ``someone/tiny-llama`` (and, gated, as ``someone/gated-llama``); the
Hugging Face cache is the work directory's ``hf-cache``. The dataset cases read a local dataset
directory (JSON-lines train and test splits) or the loopback Hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.faults.harness import (
    Fault,
    Observed,
    data_entry,
    recipe_argv,
    recipe_setup,
    run_in_process,
    tiny_model,
    tiny_text,
    write_recipe,
)
from tests.hub_server import HubServer

TOKEN = "hf_loopbacktesttoken0123456789"
MODEL = "someone/tiny-llama"
NO_NETWORK = "http://127.0.0.1:9"
"""The discard port on loopback: nothing listens there, as when there is no network."""
HUB_ENV = {"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": "{work}/hf-cache", "HF_TOKEN": "", "COMPRESS_NO_DOWNLOAD": ""}


def publish(hub: HubServer) -> None:
    files = {path.name: path.read_bytes() for path in tiny_model().iterdir() if path.is_file()}
    hub.publish(MODEL, files)
    hub.publish("someone/gated-llama", files, gated=True)
    rows = "".join(json.dumps({"text": f"row {i}: {tiny_text().read_text()[:200]}"}) + "\n" for i in range(40))
    hub.publish("someone/rows", {"data/train.jsonl": rows.encode()}, kind="dataset")


def hub_case(*, network: bool = True, env: dict[str, str] | None = None, **fields: Any) -> Fault:
    """A fault run in-process with the loopback Hub up (``HF_ENDPOINT`` at it), or, without
    ``network``, with ``HF_ENDPOINT`` at a port nothing listens on."""
    fault = Fault(env={**HUB_ENV, **(env or {})}, **fields)

    def action(work: Path, argv: list[str]) -> Observed:
        with HubServer(token=TOKEN) as hub:
            publish(hub)
            endpoint = hub.endpoint if network else NO_NETWORK
            return run_in_process(replace(fault, env={**fault.env, "HF_ENDPOINT": endpoint}), work, argv)

    return replace(fault, action=action)


def dataset_setup(**entry: Any) -> Callable[[Path], list[str]]:
    """A setup writing a local dataset directory and a recipe whose calibration entry reads it
    through ``source: hub`` (``entry``'s keys added; ``path`` replaces the directory)."""

    def setup(work: Path) -> list[str]:
        directory = work / "dataset"
        directory.mkdir()
        text = tiny_text().read_text()
        for split in ("train", "test"):
            rows = (json.dumps({"text": text[i : i + 300], "label": i % 2}) + "\n" for i in range(0, 6000, 300))
            (directory / f"{split}.jsonl").write_text("".join(rows))
        write_recipe(
            work, data={"calibration": data_entry(**{"path": "dataset", "source": "hub", **entry})}, evaluate=[]
        )
        return recipe_argv("check")

    return setup


NOTHING_WRITTEN = ("out", "hf-cache/models--someone--tiny-lama/snapshots")

CASES = [
    hub_case(
        id="hub/model-not-found",
        description="`model:` is a Hub id that does not exist (a misspelling), downloads on",
        setup=recipe_setup(model="someone/tiny-lama", command="apply"),
        message="no such model repository on the Hub (did you mean 'someone/tiny-llama'?)",
        place="recipe.yaml:1:8",
        must_not_exist=NOTHING_WRITTEN,
    ),
    hub_case(
        id="hub/model-no-network",
        description="`model:` is a Hub id, downloads on, and the Hub cannot be reached",
        setup=recipe_setup(model=MODEL, command="apply"),
        network=False,
        message="cannot reach the Hub at http://127.0.0.1:9 (ConnectError); without network, set HF_HUB_OFFLINE=1",
        place="recipe.yaml:1:8",
        must_not_exist=("out", "hf-cache/models--someone--tiny-llama/snapshots"),
    ),
    hub_case(
        id="hub/model-offline-not-cached",
        description="`model:` is a Hub id that is not in the cache, with HF_HUB_OFFLINE=1",
        setup=recipe_setup(model=MODEL),
        env={"HF_HUB_OFFLINE": "1"},
        message="HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache",
        place="recipe.yaml:1:8",
    ),
    hub_case(
        id="hub/model-no-download-not-cached",
        description="`model:` is a Hub id that is not in the cache, with COMPRESS_NO_DOWNLOAD=1",
        setup=recipe_setup(model=MODEL),
        env={"COMPRESS_NO_DOWNLOAD": "1"},
        message="COMPRESS_NO_DOWNLOAD is set and it is not in the local Hugging Face cache",
        place="recipe.yaml:1:8",
    ),
    hub_case(
        id="hub/model-gated-without-token",
        description="`model:` is a gated Hub repository and there is no token",
        setup=recipe_setup(model="someone/gated-llama"),
        message="a gated model repository: accept its conditions on its Hub page, then log in",
        place="recipe.yaml:1:8",
    ),
    hub_case(
        id="hub/model-unknown-revision",
        description="`model: {name: <Hub id>, revision: v9}`, a revision the repository lacks",
        setup=recipe_setup(model={"name": MODEL, "revision": "v9"}),
        message="the model repository has no revision 'v9'",
        place="recipe.yaml:2:9",
    ),
    Fault(
        id="hub/data-missing-column",
        description="`source: hub` data whose `field` names a column the dataset lacks",
        setup=dataset_setup(field="content"),
        message="the dataset has no column 'content' (it has: 'text', 'label')",
        place="recipe.yaml:",
    ),
    Fault(
        id="hub/data-missing-split",
        description="`source: hub` data whose `split` the dataset lacks",
        setup=dataset_setup(split="validation"),
        message="no split 'validation' (it has: train, test)",
        place="recipe.yaml:",
    ),
    Fault(
        id="hub/data-column-not-text",
        description="`source: hub` data whose text column holds numbers",
        setup=dataset_setup(field="label"),
        message="'label': expected text, found int",
        place="dataset [train] row 0",
    ),
    hub_case(
        id="hub/data-not-found",
        description="`source: hub` data whose path is neither on disk nor on the Hub",
        setup=dataset_setup(path="someone/no-such-rows"),
        message="no such dataset repository on the Hub",
        place="recipe.yaml:",
    ),
    hub_case(
        id="hub/data-no-network",
        description="`source: hub` data on the Hub, downloads on, and the Hub cannot be reached",
        setup=dataset_setup(path="someone/rows"),
        network=False,
        message="cannot reach the Hub at http://127.0.0.1:9",
        place="recipe.yaml:",
    ),
    Fault(
        id="hub/data-keys-on-a-file",
        description="`split:` on `source: text` data",
        setup=recipe_setup(data={"calibration": data_entry(split="test")}, evaluate=[]),
        message="split is for source: hub; text data reads a file",
        place="recipe.yaml:",
    ),
]
