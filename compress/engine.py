"""Runs a checked recipe: load, stages in order, evaluation, write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from compress.activation_points import quantized_points
from compress.checkpoint import LoadedModel
from compress.checkpoint.dtypes import model_dtype, stored_dtype
from compress.checkpoint.lazy import LazyWeights, empty_model, open_lazy
from compress.checkpoint.output import output_directory, output_reserved
from compress.checkpoint.stream import ShardSink, size_in_bytes
from compress.context import (
    Context,
    Report,
    StageRecord,
    StageRun,
    environment_info,
    resolve_device,
)
from compress.devices import onloaded
from compress.distributed import is_main_process
from compress.errors import OutputKept
from compress.evaluate import evaluate
from compress.host import PluginHost
from compress.hub import export_output
from compress.lazy import LazyRun, compress_lazily
from compress.method import BlockMethod, LayerMethod
from compress.quant.activations import quantized_inputs
from compress.resources import Usage, measure
from compress.sequential import compress_blocks, compress_layers
from compress.training.checkpoint import discard_checkpoints
from compress.training.loop import train
from compress.training.method import TrainingMethod
from compress.training.sharding import gathered_units, is_sharded, load_for_run
from compress.tying import untie_targets
from compress.validate import CheckedRecipe, PlannedStage


def load_context(host: PluginHost, checked: CheckedRecipe) -> Context:
    """The run's context with the recipe's model loaded (under FSDP, weightless until it is
    sharded: :func:`compress.training.sharding.load_for_run`)."""
    return context_of(host, checked, lambda: load_for_run(host, checked.recipe, checked.loader, checked.recipe.model))


def load_lazy_context(host: PluginHost, checked: CheckedRecipe) -> tuple[Context, LazyWeights]:
    """``run: mode: lazy``: the run's context with a weightless model, and the weights it is filled from."""
    opened = []

    def load() -> LoadedModel:
        loaded, weights = open_lazy(checked.loader, checked.recipe.model)
        opened.append(weights)
        return loaded

    context = context_of(host, checked, load)
    return context, opened[0]


def context_of(host: PluginHost, checked: CheckedRecipe, load: Callable[[], LoadedModel]) -> Context:
    """The run's context around the model ``load`` returns (the load phase measured)."""
    recipe = checked.recipe
    device = resolve_device(recipe.run.device)
    with measure(device) as usage:
        loaded = load()
    model = {
        "name": recipe.model.name,
        "base_model": loaded.base_model,
        "task": loaded.task,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    }
    if loaded.provenance is not None:
        model["provenance"] = loaded.provenance
    report = Report(
        model=model,
        phases={"load": asdict(usage)},
        environment=environment_info(device),
        recipe={"source": str(checked.path), "overrides": list(checked.located.overrides.values())},
    )
    return Context(host, recipe, loaded, checked.loader, device, report, _data=dict(checked.samples))


@contextmanager
def phase(context: Context, name: str) -> Iterator[None]:
    """Measure a phase of the run into ``context.report.phases[name]`` (also when it raises),
    between the ``compress_phase_start`` and ``compress_phase_end`` hooks (the latter only
    when it did not raise)."""
    usage = Usage()
    try:
        with measure(context.device) as usage:
            context.host.hook.compress_phase_start(context=context, phase=name)
            yield
    finally:
        context.report.phases[name] = asdict(usage)
    context.host.hook.compress_phase_end(context=context, phase=name, usage=context.report.phases[name])


def run_stages(context: Context, checked: CheckedRecipe) -> None:
    whole = nullcontext() if context.sequential else onloaded(context.model, context.device)
    with phase(context, "stages"), whole:
        for index, planned in enumerate(checked.stages):
            run_stage(context, checked, index, planned)


def run_lazy(context: Context, checked: CheckedRecipe, weights: LazyWeights, overwrite: bool) -> None:
    """``run: mode: lazy``: the stages block by block from the shards, each block written as it
    finishes (:func:`compress.lazy.compress_lazily`), then the shard index and the metadata."""
    writer, options = checked.writer, checked.writer_options
    output = checked.recipe.output
    with output_directory(context, writer, checked.located.as_run(), overwrite) as staging:
        sink = ShardSink(staging, size_in_bytes(output.max_shard_size))
        lazy = LazyRun(weights, sink, lambda name, module: writer.stored_tensors(context, name, module, options))
        with phase(context, "stages"):
            runs = [start_stage(context, checked, index, planned) for index, planned in enumerate(checked.stages)]
            with measure(context.device) as usage, ExitStack() as stack:
                for run in runs:
                    stack.enter_context(run.method.around_stage(context, run))
                compress_lazily(context, runs, lazy)
            for run in runs:
                end_stage(context, run, usage, lazy.seconds.get(run.index, 0.0))
        with phase(context, "write"):
            sink.finish()
            writer.write_metadata(context, staging, options)
        context.report.phases["stages"]["peak_materialized_bytes"] = weights.peak_bytes
        context.report.phases["write"]["peak_pending_bytes"] = sink.peak_pending_bytes


def run_stage(context: Context, checked: CheckedRecipe, index: int, planned: PlannedStage) -> None:
    run = start_stage(context, checked, index, planned)
    with measure(context.device) as usage, run.method.around_stage(context, run):
        dispatch(context, run)
    end_stage(context, run, usage, usage.seconds)


def start_stage(context: Context, checked: CheckedRecipe, index: int, planned: PlannedStage) -> StageRun:
    """The stage's run and report record, its tied targets untied, ``compress_stage_start`` called."""
    stage = checked.recipe.stages[index]
    total = len(checked.stages)
    modules = dict(context.model.named_modules())
    method = planned.method
    record = StageRecord(
        stage.label, method.name, method.kind, method.params.model_dump(mode="json"), method.produces().to_json()
    )
    run = StageRun(stage, method, {n: modules[n] for n in planned.target_names}, record, index, total)
    if method.kind != "training" and (untied := untie_targets(context.model, run.targets)):
        record.details["untied"] = untied
    context.host.hook.compress_stage_start(context=context, stage=stage, index=index, total=total)
    return run


def end_stage(context: Context, run: StageRun, usage: Usage, seconds: float) -> None:
    """Record the stage's ``seconds`` and the peaks of ``usage``; call ``compress_stage_end``."""
    record = run.record
    record.seconds = seconds
    record.peak_host_bytes = usage.peak_host_bytes
    record.peak_device_bytes = usage.peak_device_bytes
    context.report.stages.append(record)
    context.host.hook.compress_stage_end(context=context, stage=run.stage, record=record)


def dispatch(context: Context, run: StageRun) -> None:
    """Run a stage the way its method's base class says: the engine drives layer, block and
    training methods; any other method runs itself (``Method.apply``)."""
    method = run.method
    if isinstance(method, TrainingMethod):
        train(context, run, method)
    elif isinstance(method, BlockMethod):
        compress_blocks(context, run, method.compress_block)
    elif isinstance(method, LayerMethod):
        compress_layers(context, run, method.compress_layer)
    else:
        method.apply(context, run)


def run_evaluation(context: Context, compressed: nn.Module) -> None:
    specs = context.recipe.evaluate
    if not specs:
        return
    metrics = context.host.metrics()
    datasets = {
        spec.data: (context.recipe.data[spec.data], context.data(spec.data))
        for spec in specs
        if metrics[spec.metric].reads_data
    }
    # the in-memory model holds the weight grids; recorded activation quantization is applied here
    in_memory = compressed is context.model
    with (
        quantized_inputs(compressed, context.layers) if in_memory else nullcontext(),
        quantized_points(compressed, context.points),  # also a dense checkpoint read back in another dtype
    ):
        context.report.evaluation = evaluate(
            context.host,
            context.reference_model(),
            compressed,
            specs,
            datasets,
            context.device,
            tokenizer=context.tokenizer,
            data=context.data,
        )


def read_written(context: Context, directory: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint just written to ``directory``, loaded like the recipe's model: by the
    recipe's loader when it reads such a directory, else by the first loader that claims it,
    with the recipe's model options (dtype, trust_remote_code) and the run's task; ``dtype``
    overrides the recipe's."""
    update = {"name": str(directory), "task": context.task, "revision": None}
    if dtype is not None:
        update["dtype"] = str(dtype).removeprefix("torch.")
    spec = context.recipe.model.model_copy(update=update)
    loader = context.loader if context.loader.claims(spec) else context.host.loader_for(spec)
    return loader.load(spec).model.eval()


def evaluate_and_write(context: Context, checked: CheckedRecipe, overwrite: bool) -> None:
    """Write the checkpoint, then evaluate what is written: the staged checkpoint itself when
    the format requantizes or stores another dtype than the model's (read back in the model's
    dtype, so the comparison with the original is of the stored values, not of the arithmetic).

    An interrupt during the evaluation keeps the written checkpoint: the output is completed
    without evaluation results (the report says the evaluation was interrupted) and
    :class:`compress.errors.OutputKept` is raised.
    """
    output = checked.recipe.output
    if not is_main_process():
        return
    if output is None:
        if checked.recipe.evaluate:
            with phase(context, "evaluation"):
                run_evaluation(context, context.model)
        return
    writer, options = checked.writer, checked.writer_options
    cast = stored_dtype(options, context.model) != model_dtype(context.model)
    interrupted = None
    with output_directory(context, writer, checked.located.as_run(), overwrite) as staging:
        with phase(context, "write"):
            writer.write(context, staging, options)
        if not checked.recipe.evaluate:
            return
        try:
            with phase(context, "evaluation"):
                if writer.requantizes or cast:
                    dtype = model_dtype(context.model) if cast and not writer.requantizes else None
                    run_evaluation(context, read_written(context, staging, dtype))
                else:
                    run_evaluation(context, context.model)
        except KeyboardInterrupt as interrupt:
            interrupted = interrupt
            usage = context.report.phases.setdefault("evaluation", asdict(Usage()))
            usage["interrupted"] = True
            context.report.evaluation = {}
            context.host.hook.compress_phase_end(context=context, phase="evaluation", usage=usage)
    if interrupted is not None:
        raise OutputKept(f"during evaluation: the output is complete, without evaluation results: {output.dir}") from (
            interrupted
        )


def write_gathered(context: Context, checked: CheckedRecipe, overwrite: bool) -> None:
    """Write a sharded (FSDP) run's model: every process gathers it one block at a time, and the
    main process fills that block of a weightless copy of the model, hands the writer's tensors
    to the shard stream and empties the block again; so its host holds one block and one
    pending shard, never the whole model. Trained parameters are stored in the loaded dtype."""
    sharded = context.model
    first: dict[int, str] = {}
    aliases = {n for n, p in sharded.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
    dtype = getattr(torch, context.report.model["dtype"])
    skeleton = empty_model(sharded.config, context.task, dtype, checked.recipe.model.trust_remote_code)
    wanted = {key: tensor.dtype for key, tensor in skeleton.state_dict().items() if key not in aliases}
    if not is_main_process():
        for _ in gathered_units(sharded, wanted):
            pass
        return
    writer, options = checked.writer, checked.writer_options
    loaded = context.loaded
    context.loaded = replace(loaded, model=skeleton)  # the writer reads the model's class, config and dtype
    try:
        with output_directory(context, writer, checked.located.as_run(), overwrite) as staging:
            with phase(context, "write"):
                sink = ShardSink(staging, size_in_bytes(checked.recipe.output.max_shard_size))
                for unit, tensors in gathered_units(sharded, wanted):
                    module = skeleton.get_submodule(unit)
                    module.load_state_dict(
                        {key.removeprefix(f"{unit}."): tensor for key, tensor in tensors.items()},
                        strict=False,
                        assign=True,
                    )
                    tensors = writer.stored_tensors(context, unit, module, options)
                    sink.add({key: tensor for key, tensor in tensors.items() if key not in aliases})
                    module.to("meta")
                sink.finish()
                writer.write_metadata(context, staging, options)
            context.report.phases["write"]["peak_pending_bytes"] = sink.peak_pending_bytes
    finally:
        context.loaded = loaded


def apply_recipe(host: PluginHost, checked: CheckedRecipe, overwrite: bool = False, resume: bool = False) -> Context:
    """The whole of ``compress apply``; returns the context with the finished report.

    In a multi-process run every process compresses and trains; only the first
    evaluates and writes. The output directory is locked from before the model loads
    until the run ends: a second run writing it is refused at once.
    """
    with output_reserved(checked.recipe.output, overwrite):
        return run_recipe(host, checked, overwrite, resume)


def run_recipe(host: PluginHost, checked: CheckedRecipe, overwrite: bool, resume: bool) -> Context:
    """Load, run the stages, evaluate, write and export, with the output directory reserved."""
    torch.manual_seed(checked.recipe.run.seed)
    weights = None
    if checked.recipe.run.mode == "lazy":
        context, weights = load_lazy_context(host, checked)
    else:
        context = load_context(host, checked)
    context.resume = resume
    host.hook.compress_run_start(context=context)
    try:
        if weights is not None:
            run_lazy(context, checked, weights, overwrite)
        else:
            run_stages(context, checked)
            try:
                if is_sharded(context.model):
                    write_gathered(context, checked, overwrite)
                else:
                    evaluate_and_write(context, checked, overwrite)
            except OutputKept:
                discard_checkpoints(context)  # the output is complete: there is nothing to resume
                raise
        discard_checkpoints(context)
    except BaseException as error:
        host.hook.compress_run_failed(context=context, error=error)
        raise
    host.hook.compress_run_end(context=context)
    if is_main_process():
        export_output(host, checked.recipe)
    return context
