"""The output directory as a reader meets it: stored dtype, model card, loss-curve plot,
report phases and the console lines, on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compress.modelcard import build_card
from compress.plots import LOSS_CURVE_FILE

RTN = {"method": "rtn", "bits": 4, "group_size": 32}


def stored_dtypes(directory: Path) -> dict[str, torch.dtype]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118


def card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.mark.parametrize("output_format", ["dense", "compressed-tensors"])
def test_bfloat16_output_of_a_float32_model(run_recipe, output_format):
    run = run_recipe({"stages": [RTN], "output": {"format": output_format, "dtype": "bfloat16"}, "evaluate": ["kl"]})
    dtypes = stored_dtypes(run.output)
    floating = {key: dtype for key, dtype in dtypes.items() if dtype.is_floating_point}
    assert set(floating.values()) == {torch.bfloat16}, floating
    assert next(run.context.model.parameters()).dtype == torch.float32  # the in-memory model is not cast
    assert json.loads((run.output / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(run.output, dtype="auto")
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, run.context.model.model.norm.weight.to(torch.bfloat16))
    # evaluation read the stored bf16 checkpoint back, so the KL includes the bf16 rounding
    assert run.report["evaluation"]["kl"]["compressed"] > 0


def test_the_default_dtype_is_the_models(run_recipe):
    run = run_recipe({"stages": [RTN], "output": {"format": "dense"}, "evaluate": []})
    assert {dtype for dtype in stored_dtypes(run.output).values()} == {torch.float32}
    assert json.loads((run.output / "config.json").read_text())["dtype"] == "float32"


def test_card_says_how_to_load_the_format(run_recipe):
    compressed = run_recipe({"stages": [RTN], "output": {"format": "compressed-tensors"}, "evaluate": []})
    metadata, text = card(compressed.output)
    assert 'AutoModelForCausalLM.from_pretrained("' in text and "AutoTokenizer.from_pretrained" in text
    assert "transformers and compressed-tensors installed" in text and "vllm serve " in text
    assert metadata["tags"] == ["compress", "rtn", "compressed-tensors"]
    dense = run_recipe({"stages": [RTN], "output": {"format": "dense"}, "evaluate": []})
    _, text = card(dense.output)
    assert "AutoModelForCausalLM.from_pretrained" in text and "vllm" not in text


def test_card_names_data_without_local_paths(run_recipe, tiny_text_file):
    data = {"path": str(tiny_text_file), "samples": 2, "seq_len": 32}
    run = run_recipe(
        {"data": {"calibration": data, "evaluation": data}, "stages": [RTN], "output": {}, "evaluate": ["perplexity"]}
    )
    metadata, text = card(run.output)
    body = text.split("## Recipe")[0]  # the recipe as run is quoted verbatim below
    assert str(tiny_text_file.parent) not in body
    assert f"| calibration | {tiny_text_file.name} | 2 | 32 |" in body
    assert f"| perplexity | {tiny_text_file.name} |" in body
    assert "datasets" not in metadata  # a local file is no Hub dataset


def test_card_of_a_shipped_sample_names_its_hub_dataset():
    report = {
        "model": {"base_model": "org/model", "task": "causal-lm"},
        "stages": [],
        "evaluation": {
            "perplexity": {"original": 27.6, "compressed": 28.0, "data": "builtin:wikitext-2-test"},
        },
    }
    recipe = "data:\n  evaluation: {path: 'builtin:wikitext-2-test', samples: 8, seq_len: 512}\noutput: {dir: out/x}\n"
    text = str(build_card(report, recipe, "LlamaForCausalLM", None))
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["datasets"] == ["Salesforce/wikitext"]
    assert "| perplexity | wikitext-2-test (sample) | 27.6 | 28 |" in text
    assert "[Salesforce/wikitext](https://huggingface.co/datasets/Salesforce/wikitext)" in text
    assert "What was compressed" not in text


def test_card_states_the_provenance_of_the_weights():
    report = {
        "model": {"base_model": "org/model", "task": "causal-lm", "provenance": "its GGUF, dequantized"},
        "stages": [],
        "evaluation": {},
    }
    text = str(build_card(report, "output: {dir: out/x}\n", "LlamaForCausalLM", None))
    assert yaml.safe_load(text.split("---\n")[1])["base_model"] == "org/model"
    assert "**What was compressed:** its GGUF, dequantized." in text


def test_training_stage_writes_the_loss_curve_into_the_card(run_recipe, tiny_text_file):
    data = {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}
    distill = {
        "method": "distill",
        "steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 0,
        "log_every": 1,
        "eval_data": "heldout",
        "eval_every": 2,
        "latent_weights": "original",
    }
    run = run_recipe(
        {
            "data": {"train": data, "heldout": dict(data, samples=2), "evaluation": dict(data, samples=2)},
            "stages": [RTN, distill],
            "output": {},
            "evaluate": ["kl"],
        }
    )
    plot = run.output / LOSS_CURVE_FILE
    assert plot.read_bytes().startswith(b"\x89PNG")
    _, text = card(run.output)
    assert f"![training and held-out loss by step]({LOSS_CURVE_FILE})" in text
    curve = run.report["stages"][1]["details"]["loss_curve"]
    assert f"- distill: loss {curve[0][1]:.4g} at step 1 to {curve[-1][1]:.4g} at step 4" in text


def test_no_plot_without_training(run_recipe):
    run = run_recipe({"stages": [RTN], "output": {}, "evaluate": []})
    assert not (run.output / LOSS_CURVE_FILE).exists()
    assert "## Training" not in card(run.output)[1]


def test_report_phases_cover_the_whole_run(run_recipe, capsys):
    run = run_recipe({"stages": [RTN], "output": {"format": "compressed-tensors"}, "evaluate": ["kl"]})
    written = json.loads((run.output / "report.json").read_text())
    phases = written["phases"]
    assert list(phases) == ["load", "stages", "write", "evaluation"]
    for usage in phases.values():
        assert usage["seconds"] > 0 and usage["peak_host_bytes"] > 0
    assert written["totals"]["seconds"] == pytest.approx(sum(usage["seconds"] for usage in phases.values()))
    assert written["totals"]["peak_host_bytes"] == max(usage["peak_host_bytes"] for usage in phases.values())
    console = capsys.readouterr().err
    for line in (
        "loaded ",
        "rtn: 14 layers in ",
        "writing ",
        "write: done in ",
        "evaluating kl",
        "evaluation: done in ",
    ):
        assert line in console, line
    assert console.index("write: done in ") < console.index("evaluation: done in ")


def test_card_lists_hub_datasets_by_id():
    report = {"model": {"base_model": "org/model", "task": "causal-lm"}, "stages": [], "evaluation": {}}
    recipe = (
        "data:\n  calibration: {source: hub, path: Salesforce/wikitext, name: wikitext-2-raw-v1}\n"
        "  evaluation: {path: /home/me/data/test.txt}\noutput: {dir: out/x}\n"
    )
    text = str(build_card(report, recipe, "LlamaForCausalLM", None))
    assert yaml.safe_load(text.split("---\n")[1])["datasets"] == ["Salesforce/wikitext"]
    assert "| calibration | Salesforce/wikitext | 128 | 512 |" in text
    assert "| evaluation | test.txt | 128 | 512 |" in text and "/home/me" not in text.split("## Recipe")[0]
