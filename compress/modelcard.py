"""The README.md model card of an output directory, through huggingface_hub.

One card, built from what ``report.json`` and ``recipe.yaml`` hold: ``compress apply``
writes it from the run's report, ``compress push`` rebuilds it from the directory when
the README.md is missing (the same card: everything in it comes from those files). The
report records each stage's method as it ran (name, kind, what it produces), so the card
describes the run whether or not its methods are installed where the card is rebuilt.

It says what the weights are (the base model, and where they came from when they are not
that model's own), how to load the written format, the stages, the data by name (never a
local absolute path), the evaluation, the loss curve of training stages and the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from compress.errors import UserError
from compress.plots import LOSS_CURVE_FILE, trained_stages
from compress.sample_data import PREFIX as SAMPLE_PREFIX
from compress.sample_data import SAMPLES

if TYPE_CHECKING:
    from compress.checkpoint import Writer
    from compress.context import Context
    from compress.host import PluginHost

# Used when optimum is not importable (the GPU machines run compress from a checkout
# without it); optimum knows every transformers architecture, this table only our tasks.
PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "encoder": "feature-extraction",
    "image-classification": "image-classification",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use

{{ usage }}

## Stages

| # | stage | method | kind | layers | time (s) |
| --- | --- | --- | --- | --- | --- |
{{ stages_table }}
{{ training }}
## Data

{{ data_table }}

## Evaluation

{{ evaluation_table }}

## Recipe

```yaml
{{ recipe }}
```
"""

AUTO_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "AutoTokenizer", "tokenizer"),
    "encoder": ("AutoModel", "AutoTokenizer", "tokenizer"),
    "image-classification": ("AutoModelForImageClassification", "AutoImageProcessor", "processor"),
}
"""Per task: the transformers class that loads the model, the one that loads its preprocessor, and its variable."""

FORMAT_PACKAGES = {"compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes"}
"""The package transformers needs to load each non-dense format."""


def evaluation_markdown(evaluation: dict, interrupted: bool = False) -> str:
    """The evaluation table; a sentence when there is none (or the evaluation was interrupted)."""
    if interrupted:
        return (
            "The evaluation was interrupted before it finished; the checkpoint itself is complete "
            "(`compress eval` measures it)."
        )
    if not evaluation:
        return "No evaluation was run."
    rows = ["| metric | data | original | compressed |", "| --- | --- | --- | --- |"]
    for name, result in evaluation.items():
        original = result.get("original")
        rows.append(
            f"| {name} | {data_name(str(result.get('data', '')), short=True)} | "
            f"{'' if original is None else format(original, '.4g')} | {result['compressed']:.4g} |"
        )
    return "\n".join(rows)


def data_name(path: str, short: bool = False) -> str:
    """Data as the card names it: a shipped sample by its dataset (``short``: by its own name),
    a file given by an absolute path by its name alone (the path means nothing to a reader of
    the card), anything else (a relative path, a Hub dataset id) as the recipe wrote it."""
    sample = SAMPLES.get(path.removeprefix(SAMPLE_PREFIX)) if path.startswith(SAMPLE_PREFIX) else None
    if sample is None:
        return Path(path).name if Path(path).is_absolute() else path
    if short:
        return f"{sample.name} (sample)"
    return f"[{sample.hub_dataset}](https://huggingface.co/datasets/{sample.hub_dataset}) ({sample.description})"


def recipe_data(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipe's ``data:`` entries (the recipe file as written, before the schema)."""
    return {name: entry for name, entry in (recipe.get("data") or {}).items() if isinstance(entry, dict)}


def data_markdown(recipe: dict[str, Any]) -> str:
    entries = recipe_data(recipe)
    if not entries:
        return "The recipe reads no data."
    rows = ["| use | dataset | samples | tokens per sample |", "| --- | --- | --- | --- |"]
    for name, entry in entries.items():
        rows.append(
            f"| {name} | {data_name(str(entry.get('path', '')))} | {entry.get('samples', 128)} | "
            f"{entry.get('seq_len', 512)} |"
        )
    return "\n".join(rows)


def hub_datasets(recipe: dict[str, Any]) -> list[str]:
    """The Hub datasets the recipe's data comes from (the card's ``datasets`` metadata): those
    of shipped samples, and the ids ``source: hub`` entries read (not their local directories or files)."""
    found = set()
    for entry in recipe_data(recipe).values():
        path = str(entry.get("path", ""))
        sample = SAMPLES.get(path.removeprefix(SAMPLE_PREFIX)) if path.startswith(SAMPLE_PREFIX) else None
        if sample is not None:
            found.add(sample.hub_dataset)
        elif entry.get("source") == "hub" and path and not Path(path).exists():
            found.add(path)
    return sorted(found)


def usage_markdown(directory: str, output_format: str, task: str) -> str:
    """How to load the written checkpoint: transformers for every format, vLLM too for a
    compressed-tensors causal LM (the format vLLM serves)."""
    model_class, preprocessor_class, preprocessor = AUTO_CLASSES.get(task, AUTO_CLASSES["encoder"])
    package = FORMAT_PACKAGES.get(output_format)
    needs = f"transformers and {package}" if package else "transformers"
    lines = [
        f"With {needs} installed (`{directory}` is this directory, or the Hub repository it was pushed to):",
        "",
        "```python",
        f"from transformers import {model_class}, {preprocessor_class}",
        "",
        f'model = {model_class}.from_pretrained("{directory}", dtype="auto")',
        f'{preprocessor} = {preprocessor_class}.from_pretrained("{directory}")',
        "```",
    ]
    if output_format == "compressed-tensors" and task == "causal-lm":
        lines += [
            "",
            "Served by vLLM, which reads compressed-tensors checkpoints:",
            "",
            "```bash",
            f"vllm serve {directory}",
        ]
        lines += ["```"]
    return "\n".join(lines)


def summary_markdown(model: dict[str, Any]) -> str:
    base_model = model["base_model"]
    link = f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else base_model
    text = f"{link} compressed with [compress](https://github.com/compress-ml/compress)."
    if model.get("provenance"):
        text += (
            f"\n\n**What was compressed:** {model['provenance']}. The evaluation below compares with "
            "that model, not with the original checkpoint."
        )
    return text


def training_markdown(stages: list[dict[str, Any]]) -> str:
    """The loss-curve section when a stage trained (the PNG is written next to report.json)."""
    trained = trained_stages(stages)
    if not trained:
        return ""
    lines = ["", "## Training", ""]
    for stage in trained:
        curve = stage["details"]["loss_curve"]
        lines.append(
            f"- {stage['name']}: loss {curve[0][1]:.4g} at step {curve[0][0]} to {curve[-1][1]:.4g} at step {curve[-1][0]}"
        )
    lines += ["", f"![training and held-out loss by step]({LOSS_CURVE_FILE})", ""]
    return "\n".join(lines)


def pipeline_tag(architecture: str | None, task: str) -> str | None:
    """The Hub's pipeline tag for a transformers model class, inferred by optimum's TasksManager."""
    try:
        import transformers
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return PIPELINE_TAGS.get(task)
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        return PIPELINE_TAGS.get(task)
    try:
        return TasksManager.infer_task_from_model(model_class)
    except (KeyError, ValueError, RuntimeError):  # a class optimum has no task for
        return PIPELINE_TAGS.get(task)


def recipe_output_format(recipe_text: str) -> str:
    """The output format a recipe file names (``dense`` when it names none)."""
    return ((yaml.safe_load(recipe_text) or {}).get("output") or {}).get("format", "dense")


def base_model_relation(stages: list[dict[str, Any]], requantizing_format: bool) -> str | None:
    """``quantized`` when a stage or the output format quantizes, ``finetune`` when a stage trains.

    Read from each stage's recorded ``kind`` and ``produces``; a stage recorded without
    them (a report of an older compress) counts for neither.
    """
    produced = [stage.get("produces") or {} for stage in stages]
    quantized = requantizing_format or any(
        p.get("quant") or p.get("mixed") or p.get("activation_bits") for p in produced
    )
    trained = any(stage.get("kind") == "training" for stage in stages)
    return "quantized" if quantized else "finetune" if trained else None


def build_card(report: dict[str, Any], recipe_text: str, architecture: str | None, writer: Writer | None) -> ModelCard:
    """The card for a run: ``report`` as report.json holds it, the recipe file's text as run,
    the output format's writer (None when it is not installed here)."""
    recipe = yaml.safe_load(recipe_text) or {}
    output = recipe.get("output") or {}
    output_format = output.get("format", "dense")
    base_model = report["model"]["base_model"]
    stages = report["stages"]
    methods = sorted({stage["method"] for stage in stages})
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=base_model_relation(stages, bool(writer is not None and writer.requantizes)),
        datasets=hub_datasets(recipe) or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag(architecture, report["model"]["task"]),
        tags=["compress", *methods, *([output_format] if output_format != "dense" else [])],
    )
    stages_table = "\n".join(
        f"| {i + 1} | {s['name']} | {s['method']} | {s.get('kind', '')} | {len(s['layers'])} | {s['seconds']:.1f} |"
        for i, s in enumerate(stages)
    )
    interrupted = bool(report.get("phases", {}).get("evaluation", {}).get("interrupted"))
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=f"{base_model.split('/')[-1]} ({', '.join(methods) or output_format})",
        summary=summary_markdown(report["model"]),
        usage=usage_markdown(str(output.get("dir", ".")), output_format, report["model"]["task"]),
        stages_table=stages_table,
        training=training_markdown(stages),
        data_table=data_markdown(recipe),
        evaluation_table=evaluation_markdown(report.get("evaluation", {}), interrupted),
        recipe=recipe_text.strip(),
    )


def model_card(context: Context, writer: Writer, recipe_text: str) -> ModelCard:
    """The card ``compress apply`` writes into its output directory."""
    return build_card(context.report.to_json(), recipe_text, type(context.model).__name__, writer)


def directory_card(host: PluginHost, directory: Path) -> ModelCard:
    """The card of a finished output directory, rebuilt from its report.json, recipe.yaml and config.json."""
    try:
        report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"unreadable JSON: {error}", str(directory)) from None
    architecture = (config.get("architectures") or [None])[0]
    recipe_text = (directory / "recipe.yaml").read_text(encoding="utf-8")
    return build_card(report, recipe_text, architecture, host.writers().get(recipe_output_format(recipe_text)))
