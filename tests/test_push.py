"""``compress push`` and a recipe's ``export.hub``, against a Hub stand-in on loopback (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.errors import UserError
from compress.hub import LOGIN_HINT, push
from compress.recipe import HubExport
from tests.hub_server import HubServer

TOKEN = "hf_loopbacktesttoken0123456789"
COMPRESS = str(Path(sys.executable).parent / "compress")
RECIPE = {
    "stages": [{"method": "rtn", "bits": 4, "group_size": 64}],
    "output": {"dir": "out", "max_shard_size": "100KB"},
    "evaluate": ["perplexity", "kl"],
}


def folder_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def folder_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The loopback Hub, with HF_ENDPOINT and HF_TOKEN pointing at it and no stored token."""
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield server


@pytest.fixture
def output(run_recipe) -> Path:
    """A real ``compress apply`` output of the tiny model: rtn, evaluated, in several shards."""
    return run_recipe(RECIPE).output


def test_push_command_uploads_every_file_byte_for_byte(hub: HubServer, output: Path):
    assert len(list(output.glob("*.safetensors"))) > 1 and (output / "model.safetensors.index.json").is_file()
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(
        [COMPRESS, "push", str(output), "someone/tiny-rtn"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"{hub.endpoint}/someone/tiny-rtn/commit/" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert not any(TOKEN.encode() in data for data in folder_bytes(output).values())
    assert hub.state.repos["someone/tiny-rtn"]["main"] == folder_bytes(output)
    assert hub.state.private["someone/tiny-rtn"] is False
    calls = " ".join(hub.state.calls)
    for endpoint in ("/api/repos/create", "/api/validate-yaml", "/preupload/main", "/commit/main"):
        assert endpoint in calls


def test_model_card_has_the_hub_metadata_metrics_and_recipe(
    hub: HubServer, output: Path, tiny_model_dir, compress_host
):
    push(compress_host, output, HubExport(repo_id="someone/card"))
    card = hub.state.repos["someone/card"]["main"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == tiny_model_dir.name
    assert metadata["base_model_relation"] == "quantized"
    assert metadata["pipeline_tag"] == "text-generation"  # optimum's TasksManager, from LlamaForCausalLM
    assert metadata["library_name"] == "transformers"
    assert metadata["tags"] == ["compress", "rtn"]
    assert "| perplexity |" in card and "| kl |" in card
    assert "method: rtn" in card and "group_size: 64" in card


def test_missing_card_is_written_before_the_upload(hub: HubServer, output: Path, compress_host):
    card = (output / "README.md").read_text()
    (output / "README.md").unlink()
    push(compress_host, output, HubExport(repo_id="someone/rebuilt"))
    assert (output / "README.md").read_text() == card  # the same card compress apply wrote
    assert hub.state.repos["someone/rebuilt"]["main"]["README.md"] == card.encode()


def test_private_repository_on_a_new_branch(hub: HubServer, output: Path, compress_host):
    push(compress_host, output, HubExport(repo_id="someone/private", private=True, revision="w4g64"))
    assert hub.state.private["someone/private"] is True
    assert hub.state.repos["someone/private"]["w4g64"] == folder_bytes(output)
    assert hub.state.repos["someone/private"]["main"] == {}


def test_recipe_export_pushes_the_written_output(hub: HubServer, run_recipe):
    run = run_recipe({**RECIPE, "export": {"hub": {"repo_id": "someone/exported", "revision": "v1"}}})
    assert hub.state.repos["someone/exported"]["v1"] == folder_bytes(run.output)


def test_a_failed_commit_is_retried(hub: HubServer, output: Path, compress_host, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", waits.append)
    hub.state.fail_commits = 1
    push(compress_host, output, HubExport(repo_id="someone/retried"))
    assert hub.state.calls.count("POST /api/models/someone/retried/commit/main") == 2
    assert waits == [1]  # huggingface_hub's own backoff
    assert hub.state.repos["someone/retried"]["main"] == folder_bytes(output)


@pytest.mark.parametrize("failure", ["500", "drop"])
def test_upload_that_keeps_failing_is_one_line_and_leaves_the_output_untouched(
    hub: HubServer, output: Path, compress_host, monkeypatch, failure: str
):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    hub.state.fail_commits, hub.state.failure = 100, failure
    before = folder_digest(output)
    with pytest.raises(UserError) as raised:
        push(compress_host, output, HubExport(repo_id="someone/failing"))
    message = str(raised.value)
    assert "\n" not in message
    assert f"upload to {hub.endpoint}/someone/failing failed" in message and "local output is intact" in message
    assert hub.state.calls.count("POST /api/models/someone/failing/commit/main") == 6  # 1 + 5 retries
    assert hub.state.repos["someone/failing"]["main"] == {}
    assert folder_digest(output) == before


# --- bad input ------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, ["push", *args], catch_exceptions=False)


def test_directory_without_report_is_refused(hub: HubServer, output: Path):
    (output / "report.json").unlink()
    result = invoke(str(output), "someone/x")
    assert result.exit_code == 2
    assert "not a complete compress output: no report.json" in result.output
    assert hub.state.calls == []


def test_missing_shard_is_refused(hub: HubServer, output: Path):
    shard = sorted(output.glob("model-*.safetensors"))[-1]
    shard.unlink()
    result = invoke(str(output), "someone/x")
    assert result.exit_code == 2
    assert f"shard {shard.name} listed in model.safetensors.index.json is missing" in result.output


def test_truncated_shard_is_refused(hub: HubServer, output: Path):
    shard = sorted(output.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = invoke(str(output), "someone/x")
    assert result.exit_code == 2 and "corrupt safetensors file" in result.output


def test_invalid_repo_id_is_refused(hub: HubServer, output: Path):
    result = invoke(str(output), "not a repo id!")
    assert result.exit_code == 2 and "invalid Hub repository id" in result.output


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def test_missing_token_says_how_to_log_in(output: Path, no_token: None):
    result = CliRunner().invoke(cli, ["push", str(output), "someone/x"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: no Hugging Face token: log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"
    ]


def test_recipe_export_without_token_fails_before_the_run(run_recipe, no_token: None, tmp_path: Path):
    with pytest.raises(UserError, match="no Hugging Face token"):
        run_recipe({**RECIPE, "export": {"hub": {"repo_id": "someone/x"}}})
    assert not (tmp_path / "out-0").exists()


def test_recipe_check_refuses_an_export_without_token(tiny_model_dir: Path, no_token: None, tmp_path: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\n"
        "stages:\n  - {method: rtn, bits: 4, group_size: 64}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
        "export:\n  hub: {repo_id: someone/x}\n"
    )
    result = CliRunner().invoke(cli, ["recipe", "check", str(recipe)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {recipe}:6:8: no Hugging Face token: {LOGIN_HINT}"]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"stages": RECIPE["stages"], "export": {"hub": {"repo_id": "someone/x"}}}, "export needs an output directory"),
        ({**RECIPE, "export": {"hub": {"repo_id": "someone/x", "privat": True}}}, "unknown key 'privat'"),
    ],
    ids=["no-output", "misspelled-key"],
)
def test_bad_export_section_is_refused_at_check(run_recipe, recipe: dict, message: str):
    with pytest.raises(UserError, match=message):
        run_recipe(recipe)
