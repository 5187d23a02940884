"""The README.md model card of an output directory, through huggingface_hub.

One card, built from what ``report.json`` and ``recipe.yaml`` hold: ``compress apply``
writes it from the run's report, ``compress push`` rebuilds it from the directory when
the README.md is missing. The report records each stage's method as it ran (name, kind,
what it produces), so the card describes the run whether or not its methods are installed
where the card is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from compress.errors import UserError

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

{{ base_model }} compressed with [compress](https://github.com/compress-ml/compress).

## Stages

| # | stage | method | kind | layers | time (s) |
| --- | --- | --- | --- | --- | --- |
{{ stages_table }}

## Evaluation

{{ evaluation_table }}

## Recipe

```yaml
{{ recipe }}
```
"""


def evaluation_markdown(evaluation: dict) -> str:
    if not evaluation:
        return "No evaluation was run."
    rows = ["| metric | data | original | compressed |", "| --- | --- | --- | --- |"]
    for name, result in evaluation.items():
        original = result.get("original")
        rows.append(
            f"| {name} | {result.get('data', '')} | "
            f"{'' if original is None else format(original, '.4g')} | {result['compressed']:.4g} |"
        )
    return "\n".join(rows)


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
    quantized = requantizing_format or any(p.get("quant") or p.get("activation_bits") for p in produced)
    trained = any(stage.get("kind") == "training" for stage in stages)
    return "quantized" if quantized else "finetune" if trained else None


def build_card(report: dict[str, Any], recipe_text: str, architecture: str | None, writer: Writer | None) -> ModelCard:
    """The card for a run: ``report`` as report.json holds it, the recipe file's text as run,
    the output format's writer (None when it is not installed here)."""
    output_format = recipe_output_format(recipe_text)
    base_model = report["model"]["base_model"]
    stages = report["stages"]
    methods = sorted({stage["method"] for stage in stages})
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=base_model_relation(stages, bool(writer is not None and writer.requantizes)),
        library_name="transformers",
        pipeline_tag=pipeline_tag(architecture, report["model"]["task"]),
        tags=["compress", *methods, *([output_format] if output_format != "dense" else [])],
    )
    stages_table = "\n".join(
        f"| {i + 1} | {s['name']} | {s['method']} | {s.get('kind', '')} | {len(s['layers'])} | {s['seconds']:.1f} |"
        for i, s in enumerate(stages)
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=f"{base_model.split('/')[-1]} ({', '.join(methods) or output_format})",
        base_model=base_model,
        stages_table=stages_table,
        evaluation_table=evaluation_markdown(report.get("evaluation", {})),
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
