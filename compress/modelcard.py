"""The README.md model card of an output directory, through huggingface_hub."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from compress.context import Context

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

| # | stage | method | layers | time (s) |
| --- | --- | --- | --- | --- |
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


def model_card(context: Context, recipe_text: str) -> ModelCard:
    report = context.report
    methods = sorted({stage.method for stage in report.stages})
    card_data = ModelCardData(
        base_model=context.loaded.base_model,
        base_model_relation="quantized",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(context.task),
        tags=["compress", *methods],
    )
    stages_table = "\n".join(
        f"| {i + 1} | {s.name} | {s.method} | {len(s.layers)} | {s.seconds:.1f} |"
        for i, s in enumerate(report.stages)
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=f"{context.loaded.base_model.split('/')[-1]} ({', '.join(methods)})",
        base_model=context.loaded.base_model,
        stages_table=stages_table,
        evaluation_table=evaluation_markdown(report.evaluation),
        recipe=recipe_text.strip(),
    )
