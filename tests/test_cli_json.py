"""``--json`` on ``compress methods``, ``compress inspect`` and ``compress eval``: the keys docs/cli.md lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import cli


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def parsed(*args: str):
    """The command's stdout, which must be one JSON document and nothing else."""
    return json.loads(invoke(*args, "--json").stdout)


@pytest.fixture(scope="module")
def written(tiny_model_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit compressed-tensors checkpoint of the tiny model."""
    work = tmp_path_factory.mktemp("json")
    recipe = {
        "model": str(tiny_model_dir),
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["lm_head"]}],
        "output": {"dir": str(work / "out"), "format": "compressed-tensors"},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    invoke("apply", str(work / "recipe.yaml"))
    return work / "out"


def test_methods_json_lists_every_method(host) -> None:
    listing = parsed("methods")["methods"]
    assert [entry["name"] for entry in listing] == sorted(host.methods())
    rtn = next(entry for entry in listing if entry["name"] == "rtn")
    assert rtn == {"name": "rtn", "kind": "data-free", "summary": "Round-to-nearest (RTN) weight quantization."}


def test_methods_name_json_documents_each_parameter(host) -> None:
    document = parsed("methods", "rtn")
    assert (document["name"], document["kind"]) == ("rtn", "data-free")
    assert document["doc"].startswith("Round-to-nearest")
    parameters = {row["name"]: row for row in document["parameters"]}
    assert list(parameters) == list(host.methods()["rtn"].Params.model_fields)
    assert parameters["bits"]["required"] is True and parameters["bits"]["default"] is None
    assert parameters["group_size"] == {
        "name": "group_size",
        "type": "int | None",
        "required": False,
        "default": 128,
        "description": host.methods()["rtn"].Params.model_fields["group_size"].description,
    }


def test_inspect_json_sums_up_like_the_table(written: Path, host) -> None:
    summary = parsed("inspect", str(written))
    assert summary["format"] == "compressed-tensors (pack-quantized)" and summary["sparsity"] is None
    assert summary["ratio"] == pytest.approx(summary["disk_bytes"] / summary["bf16_bytes"])
    layers = summary["layers"]
    assert len(layers) == 14 and all(layer["storage"] == "int4 group 32 sym" for layer in layers)
    assert summary["groups"] == [
        {
            "storage": "int4 group 32 sym",
            "layers": 14,
            "disk_bytes": sum(layer["disk_bytes"] for layer in layers),
            "bf16_bytes": sum(layer["bf16_bytes"] for layer in layers),
            "ratio": summary["linear"]["ratio"],
        }
    ]
    assert summary["linear"]["ratio"] < 0.5
    assert "Linear layers: " in invoke("inspect", str(written)).stdout, "the human output stays"


def test_eval_json_holds_the_evaluation(written: Path, tiny_model_dir: Path, tiny_text_file: Path, host) -> None:
    args = ["eval", str(written), "--against", str(tiny_model_dir), "--data", str(tiny_text_file)]
    args += ["--samples", "2", "--seq-len", "32", "--device", "cpu", "--metric", "perplexity", "--metric", "kl"]
    result = parsed(*args)
    assert (result["checkpoint"], result["against"], result["task"]) == (str(written), str(tiny_model_dir), "causal-lm")
    evaluation = result["evaluation"]
    # the command's data is named "eval", so the keys are the metrics' with ":eval" (compress.evaluate.metric_key)
    assert set(evaluation) == {"perplexity:eval", "kl:eval"}
    perplexity = evaluation["perplexity:eval"]
    assert {"compressed", "original", "data", "samples", "tokens", "seq_len"} <= set(perplexity)
    assert (perplexity["samples"], perplexity["tokens"], perplexity["seq_len"]) == (2, 64, 32)
    assert math.isfinite(perplexity["compressed"]) and evaluation["kl:eval"]["compressed"] >= 0
