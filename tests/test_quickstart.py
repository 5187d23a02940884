"""The quickstart from a plain clone: its recipe, the WikiText-2 sample shipped inside the
package, what the built-in model says it is, and (slow) the real run."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from compress.checkpoint.builtin import forget_gguf_name
from compress.checkpoint.inspect import inspect_checkpoint
from compress.errors import UserError
from compress.recipe import DataSpec, load_recipe
from compress.sample_data import HERE, SAMPLES, label, resolve
from tests.conftest import ROOT, WIKITEXT_TEST

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_the_quickstart_reads_only_the_shipped_sample():
    recipe, _ = load_recipe(QUICKSTART)
    for spec in recipe.data.values():
        assert spec.path.parent == HERE and spec.path.is_file(), spec.path
    assert "../shared" not in QUICKSTART.read_text()


def test_the_quickstart_writes_bf16_w4a16_compressed_tensors():
    recipe, _ = load_recipe(QUICKSTART)
    assert recipe.output.format == "compressed-tensors" and recipe.output.options == {"dtype": "bfloat16"}
    stage = recipe.stages[0]
    assert stage.method == "rtn" and stage.params == {"bits": 4, "group_size": 64}
    assert [spec.metric for spec in recipe.evaluate] == ["perplexity", "kl", "top1"]


def test_every_sample_is_package_data_with_its_license_beside_it():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["compress.sample_data"]
    readme = (HERE / "README.md").read_text()
    assert "README.md" in shipped
    for name, sample in SAMPLES.items():
        assert any(fnmatch(sample.file, pattern) for pattern in shipped), sample.file
        assert (HERE / sample.file).stat().st_size < 300_000
        assert f"`builtin:{name}`" in readme and "CC BY-SA 3.0" in readme and sample.hub_dataset in readme


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="needs ../shared/data (the sample's origin)")
def test_the_wikitext_sample_is_a_prefix_of_the_test_split():
    sample = (HERE / SAMPLES["wikitext-2-test"].file).read_bytes()
    assert WIKITEXT_TEST.read_bytes().startswith(sample)
    assert sample.endswith(b" \n \n")  # cut where an article ends


def test_builtin_paths_resolve_and_label_back():
    path = resolve("builtin:wikitext-2-test")
    assert Path(path) == HERE / "wikitext-2-test.txt"
    assert label(Path(path)) == "builtin:wikitext-2-test"
    assert resolve("data/train.txt") == "data/train.txt" and label("data/train.txt") == "data/train.txt"
    assert DataSpec(path="builtin:wikitext-2-test").path == Path(path)


def test_an_unknown_sample_is_refused_at_its_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    text = QUICKSTART.read_text().replace("builtin:wikitext-2-test", "builtin:wikitext2-test")
    recipe.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "wikitext2-test" in row)
    with pytest.raises(UserError, match=r"no shipped data sample named 'wikitext2-test' \(did you mean") as refused:
        load_recipe(recipe)
    assert str(refused.value).startswith(f"{recipe}:{line}:")


def test_the_gguf_name_is_not_kept_as_the_model_name():
    config = LlamaConfig(_model_name_or_path="Smollm2 135M 8k Lc100K Mix1 Ep2")
    assert config.to_dict()["_model_name_or_path"]
    forget_gguf_name(config)
    assert "_model_name_or_path" not in config.to_dict()


def check_quickstart_output(out: Path) -> None:
    """What the quickstart's output must be: W4A16 compressed-tensors well under the bf16 size,
    bf16 dense parts, honest about its base model, evaluated against the built-in model."""
    summary = inspect_checkpoint(out)  # what `compress inspect` prints
    assert summary.disk_bytes / summary.bf16_bytes < 0.45
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "_model_name_or_path" not in config
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1 GGUF" in report["model"]["provenance"]
    assert 0 < report["evaluation"]["kl"]["compressed"] < 1.0
    assert report["evaluation"]["perplexity"]["original"] == pytest.approx(27.6, abs=0.1)
    card = (out / "README.md").read_text()
    assert "**What was compressed:** the Q4_1 GGUF" in card and "vllm serve" in card


@pytest.mark.slow
def test_the_real_quickstart(tmp_path):
    """The README's command, run from the repository root (into a temporary output directory)."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    out = tmp_path / "out"
    recipe["output"]["dir"] = str(out)
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "compress", "apply", str(tmp_path / "quickstart.yaml")]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=1800)
    check_quickstart_output(out)
