"""Runs a checked recipe: load, stages in order, evaluation, write."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from compress.checkpoint.output import write_output
from compress.context import Context, Report, StageRun, StageRecord, environment_info, resolve_device
from compress.evaluate import evaluate
from compress.host import PluginHost
from compress.resources import measure
from compress.sequential import onloaded
from compress.validate import CheckedRecipe, PlannedStage


def load_context(host: PluginHost, checked: CheckedRecipe) -> Context:
    recipe = checked.recipe
    device = resolve_device(recipe.run.device)
    loaded = checked.loader.load(recipe.model)
    report = Report(
        model={
            "name": recipe.model.name,
            "base_model": loaded.base_model,
            "task": loaded.task,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        },
        environment=environment_info(device),
    )
    return Context(host, recipe, loaded, checked.loader, device, report)


def run_stages(context: Context, checked: CheckedRecipe) -> None:
    with measure(context.device) as usage:
        with nullcontext() if context.sequential else onloaded(context.model, context.device):
            for index, planned in enumerate(checked.stages):
                run_stage(context, checked, index, planned)
    context.report.totals = {
        "seconds": usage.seconds,
        "peak_host_bytes": usage.peak_host_bytes,
        "peak_device_bytes": usage.peak_device_bytes,
    }


def run_stage(context: Context, checked: CheckedRecipe, index: int, planned: PlannedStage) -> None:
    stage = checked.recipe.stages[index]
    total = len(checked.stages)
    modules = dict(context.model.named_modules())
    record = StageRecord(stage.label, planned.method.name, planned.method.params.model_dump(mode="json"))
    run = StageRun(stage, planned.method, {n: modules[n] for n in planned.target_names}, record, index, total)
    context.host.hook.compress_stage_start(context=context, stage=stage, index=index, total=total)
    with measure(context.device) as usage:
        planned.method.apply(context, run)
    record.seconds = usage.seconds
    record.peak_host_bytes = usage.peak_host_bytes
    record.peak_device_bytes = usage.peak_device_bytes
    context.report.stages.append(record)
    context.host.hook.compress_stage_end(context=context, stage=stage, record=record)


def run_evaluation(context: Context) -> None:
    specs = context.recipe.evaluate
    if not specs:
        return
    datasets = {spec.data: (context.recipe.data[spec.data], context.data(spec.data)) for spec in specs}
    context.report.evaluation = evaluate(
        context.host, context.reference_model(), context.model, specs, datasets, context.device
    )


def apply_recipe(host: PluginHost, checked: CheckedRecipe, overwrite: bool = False) -> Context:
    """The whole of ``compress apply``; returns the context with the finished report."""
    torch.manual_seed(checked.recipe.run.seed)
    context = load_context(host, checked)
    host.hook.compress_run_start(context=context)
    try:
        run_stages(context, checked)
        run_evaluation(context)
        if checked.recipe.output is not None:
            write_output(context, Path(checked.path), checked.writer_options, overwrite)
    except BaseException as error:
        host.hook.compress_run_failed(context=context, error=error)
        raise
    host.hook.compress_run_end(context=context)
    return context
