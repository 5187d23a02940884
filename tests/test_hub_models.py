"""``model:`` as a Hub id, downloaded through huggingface_hub from the loopback Hub (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress.checkpoint.loaders import HubLoader
from compress.cli import cli
from compress.errors import UserError
from compress.recipe import ModelSpec
from tests.hub_server import HubServer

TOKEN = "hf_loopbacktesttoken0123456789"
REPO = "someone/tiny-llama"


def folder_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path):
    """The loopback Hub holding the tiny model as ``REPO`` (plus a pickle and an ONNX copy a model
    does not need), an empty cache, no token, downloads allowed."""
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("COMPRESS_NO_DOWNLOAD", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        extras = {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx"}
        server.publish(REPO, {**folder_files(tiny_model_dir), **extras})
        yield server


def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def cached_files(tmp_path: Path, repo: str = REPO) -> set[str]:
    snapshots = cache(tmp_path) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {path.name for path in snapshots.glob("*/*")}


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def write_recipe(tmp_path: Path, tiny_text_file: Path, model: str | dict = REPO) -> Path:
    recipe = {
        "model": model,
        "data": {"calibration": {"path": str(tiny_text_file), "samples": 2, "seq_len": 32}},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def compress(*args: str):
    return CliRunner().invoke(cli, list(args))


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result.stderr.rstrip().splitlines()[-1] == lines[0], result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_recipe_check_reads_config_and_tokenizer_not_weights(hub, tmp_path, tiny_text_file, compress_host):
    result = compress("recipe", "check", str(write_recipe(tmp_path, tiny_text_file)))
    assert result.exit_code == 0, result.output
    assert cached_files(tmp_path) == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert not any("safetensors" in call or "/lfs/" in call for call in hub.state.calls)


def test_apply_downloads_what_a_model_needs(hub, tmp_path, tiny_text_file, tiny_model_dir, compress_host):
    rows = "".join(json.dumps({"text": line}) + "\n" for line in tiny_text_file.read_text().splitlines())
    hub.publish("someone/rows", {"data/test.jsonl": rows.encode()}, kind="dataset")
    recipe = yaml.safe_load(write_recipe(tmp_path, tiny_text_file).read_text())
    recipe["data"]["evaluation"] = {"source": "hub", "path": "someone/rows", "split": "test", "streaming": True}
    recipe["data"]["evaluation"] |= {"samples": 2, "seq_len": 32}
    recipe["evaluate"] = ["perplexity"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = compress("apply", str(tmp_path / "recipe.yaml"))
    assert result.exit_code == 0, result.output
    assert "Fetching 5 files" in result.stderr  # huggingface_hub's progress bar
    assert cached_files(tmp_path) == {p.name for p in tiny_model_dir.iterdir()}  # no pickle, no onnx/
    assert any(call.startswith("GET /lfs/") for call in hub.state.calls)  # the weights came through the "CDN"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert REPO in json.dumps(report) and "perplexity" in json.dumps(report)
    assert f"base_model: {REPO}" in (tmp_path / "out" / "README.md").read_text()


def test_a_second_load_reads_the_cache(hub, tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    first = HubLoader().load(ModelSpec(name=REPO))
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(weights_of(first.model)[k], v) for k, v in weights_of(expected).items())
    downloads = [call for call in hub.state.calls if call.startswith("GET /someone") or call.startswith("GET /lfs")]
    hub.state.calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    second = HubLoader().load(ModelSpec(name=REPO))
    assert hub.state.calls == [] and len(downloads) == 5
    assert second.base_model == REPO and second.tokenizer is not None


def test_revision_pins_a_commit_or_branch(hub, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    old_commit = hub.publish(REPO, folder_files(tiny_model_dir))
    original = load_file(tiny_model_dir / "model.safetensors")
    tensors = {name: tensor + 1 for name, tensor in original.items()}
    save_file(tensors, tmp_path / "changed.safetensors", metadata={"format": "pt"})
    changed = {**folder_files(tiny_model_dir), "model.safetensors": (tmp_path / "changed.safetensors").read_bytes()}
    hub.publish(REPO, changed)
    hub.publish(REPO, folder_files(tiny_model_dir), branch="v1")

    name = "model.embed_tokens.weight"
    latest = HubLoader().load(ModelSpec(name=REPO)).model.state_dict()[name]
    pinned = HubLoader().load(ModelSpec(name=REPO, revision=old_commit)).model.state_dict()[name]
    branch = HubLoader().load(ModelSpec(name=REPO, revision="v1")).model.state_dict()[name]
    assert torch.equal(latest, tensors[name])
    assert torch.equal(pinned, original[name]) and torch.equal(branch, pinned)
    with pytest.raises(UserError, match="has no revision 'v2'") as raised:
        HubLoader().load_config(ModelSpec(name=REPO, revision="v2"))
    assert raised.value.where == f"{REPO}@v2"


def test_offline_uses_the_cache_or_says_it_is_not_there(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"):
        HubLoader().load_config(ModelSpec(name=REPO))
    assert hub.state.calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    HubLoader().load_config(ModelSpec(name=REPO))  # config.json only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert HubLoader().load_config(ModelSpec(name=REPO))[1] == "causal-lm"
    with pytest.raises(UserError, match="holds only part of it and HF_HUB_OFFLINE is set"):
        HubLoader().load(ModelSpec(name=REPO))


def test_no_download_switch_keeps_to_the_cache(hub, monkeypatch, tmp_path, tiny_text_file, compress_host):
    monkeypatch.setenv("COMPRESS_NO_DOWNLOAD", "1")
    line = error_line(compress("recipe", "check", str(write_recipe(tmp_path, tiny_text_file))))
    assert "COMPRESS_NO_DOWNLOAD is set and it is not in the local Hugging Face cache" in line
    assert f"hf download {REPO}" in line and hub.state.calls == []
    monkeypatch.delenv("COMPRESS_NO_DOWNLOAD")
    HubLoader().load(ModelSpec(name=REPO))
    monkeypatch.setenv("COMPRESS_NO_DOWNLOAD", "1")
    hub.state.calls.clear()
    assert HubLoader().load(ModelSpec(name=REPO)).base_model == REPO
    assert hub.state.calls == []


def test_unknown_repository_is_one_line_and_writes_nothing(hub, tmp_path, tiny_text_file, compress_host):
    misspelled = "someone/tiny-lama"
    line = error_line(compress("apply", str(write_recipe(tmp_path, tiny_text_file, misspelled))))
    assert f"no such model repository on the Hub (did you mean {REPO!r}?)" in line  # the owner's models, listed
    assert "hf auth login" in line and misspelled in line
    assert not (tmp_path / "out").exists()
    assert not (cache(tmp_path) / "models--someone--tiny-lama" / "snapshots").exists()
    assert "no such model repository on the Hub (a private" in error_line(
        compress("recipe", "check", str(write_recipe(tmp_path, tiny_text_file, "nobody/tiny-llama")))
    )


@pytest.mark.parametrize("kind", ["private", "gated"])
def test_a_private_or_gated_repository_needs_the_token(hub, tiny_model_dir, monkeypatch, kind):
    hub.publish("someone/closed", folder_files(tiny_model_dir), private=kind == "private", gated=kind == "gated")
    expected = "a gated model repository: accept its conditions" if kind == "gated" else "no such model repository"
    with pytest.raises(UserError, match=expected) as raised:
        HubLoader().load_config(ModelSpec(name="someone/closed"))
    assert "hf auth login" in raised.value.message
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert HubLoader().load(ModelSpec(name="someone/closed")).base_model == "someone/closed"


def test_no_network_says_so_and_how_to_go_offline(hub, monkeypatch, tmp_path, tiny_text_file, compress_host):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    line = error_line(compress("recipe", "check", str(write_recipe(tmp_path, tiny_text_file))))
    assert "cannot reach the Hub at http://127.0.0.1:9" in line and "set HF_HUB_OFFLINE=1" in line
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    HubLoader().load(ModelSpec(name=REPO))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # downloaded once: the cache serves
    assert HubLoader().load(ModelSpec(name=REPO)).base_model == REPO


def test_what_is_not_a_hub_id_is_not_claimed(hub):
    for name in ("someone/tiny llama", "someone/", "a/b/c", "someone/tiny--llama"):
        assert not HubLoader().claims(ModelSpec(name=name)), name
    assert HubLoader().claims(ModelSpec(name=REPO))


def test_a_broken_download_resumes_and_never_leaves_a_whole_looking_file(hub, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda seconds: None)
    hub.state.cut_downloads, hub.state.cut_after = 1, 1000
    assert HubLoader().load(ModelSpec(name=REPO)).base_model == REPO  # huggingface_hub resumed it
    assert sum(call.startswith("GET /lfs/") for call in hub.state.calls) == 2

    other = "someone/other-llama"
    hub.publish(other, hub.state.repos[REPO]["main"])
    hub.state.cut_downloads, hub.state.cut_after = 100, 0
    with pytest.raises(UserError, match="the download broke off .*run again to resume it"):
        HubLoader().load(ModelSpec(name=other))
    assert "model.safetensors" not in cached_files(tmp_path, other)
    weights = hashlib.sha256(hub.state.repos[other]["main"]["model.safetensors"]).hexdigest()
    assert not (cache(tmp_path) / "models--someone--other-llama" / "blobs" / weights).exists()
    hub.state.cut_downloads = 0
    assert HubLoader().load(ModelSpec(name=other)).base_model == other


def test_a_repository_without_config_is_not_a_model(hub):
    hub.publish("someone/weights-only", {"model.safetensors": b"x" * 8})
    with pytest.raises(UserError, match="no config.json"):
        HubLoader().load_config(ModelSpec(name="someone/weights-only"))


def test_remote_code_files_come_only_when_trusted(hub, tiny_model_dir, tmp_path):
    hub.publish("someone/custom", {**folder_files(tiny_model_dir), "modeling_custom.py": b"raise SystemExit\n"})
    HubLoader().load(ModelSpec(name="someone/custom"))
    assert "modeling_custom.py" not in cached_files(tmp_path, "someone/custom")
