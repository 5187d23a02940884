"""Everything about a recipe that can be checked before weights are read.

Schema, methods and their parameters, data files, metrics, the output format and
directory, and the targets of each stage against a weightless copy of the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from transformers import PretrainedConfig

from compress.blocks import find_blocks, within
from compress.checkpoint import Loader, Writer
from compress.checkpoint.loaders import meta_model
from compress.checkpoint.output import check_output_place, dtype_itemsize, estimated_output_bytes
from compress.data import Sample
from compress.distributed import fsdp_requested, local_processes, local_rank
from compress.errors import Location, UserError, did_you_mean
from compress.host import PluginHost
from compress.hub import check_export
from compress.lazy import lazy_refusal
from compress.method import BlockMethod, Method, Produces
from compress.presets import expand_scheme
from compress.quant.grid import check_group_width
from compress.reach import forward_inputs, unreached
from compress.recipe import (
    DataSpec,
    LocatedRecipe,
    Recipe,
    Stage,
    parse_recipe_file,
    pydantic_error,
    validate_recipe,
)
from compress.targets import invalid_patterns, match_modules, names_near
from compress.training.sharding import fsdp_refusal


@dataclass
class PlannedStage:
    """A validated stage: its method instance and the module names it targets."""

    method: Method
    targets: list[str]
    ignore: list[str]
    target_names: list[str]


@dataclass
class CheckedRecipe:
    path: Path
    recipe: Recipe
    located: LocatedRecipe
    loader: Loader
    task: str
    stages: list[PlannedStage]
    writer: Writer | None
    """The output format's writer, resolved once here (None when the recipe writes nothing)."""
    writer_options: BaseModel | None
    """The output writer's validated options (None when the recipe writes nothing)."""
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    """The data entries made at the check with the model's tokenizer (the sources that check
    tokens), by name: the run starts from them instead of tokenizing again."""


def model_key(located: LocatedRecipe) -> tuple:
    return ("model", "name") if isinstance(located.raw.get("model"), dict) else ("model",)


def build_method(host: PluginHost, recipe: Recipe, located: LocatedRecipe, index: int) -> Method:
    stage = recipe.stages[index]
    methods = host.methods()
    if stage.method not in methods:
        raise located.error(
            f"unknown method {stage.method!r}{did_you_mean(stage.method, list(methods))}{host.refused_for_api()}",
            ("stages", index, "method"),
        )
    method_class = methods[stage.method]
    given = stage.params
    if stage.scheme is not None:
        try:
            given = expand_scheme(stage.scheme, method_class.Params, stage.method, given)
        except UserError as error:
            raise located.error(error.message, ("stages", index, "scheme")) from None
    try:
        params = method_class.Params.model_validate(given)
    except ValidationError as error:
        keys = [*method_class.Params.model_fields, *Stage.model_fields]
        raise pydantic_error(error, located, ("stages", index), keys) from None
    method = method_class(params)
    method.label = stage.label
    try:
        method.check_data(recipe.data)
    except UserError as error:
        raise located.error(error.message, ("stages", index)) from None
    return method


def check_stage_targets(
    model: nn.Module, method: Method, recipe: Recipe, located: LocatedRecipe, index: int
) -> PlannedStage:
    stage = recipe.stages[index]
    targets = stage.targets if stage.targets is not None else list(method.default_targets)
    ignore = stage.ignore if stage.ignore is not None else list(method.default_ignore)
    for part, entries in (("targets", targets), ("ignore", ignore)):
        for entry_index, problem in invalid_patterns(entries):
            raise located.error(problem, ("stages", index, part, entry_index))
    selected, unmatched = match_modules(model, targets, ignore)
    if unmatched:
        key = ("stages", index, "targets", targets.index(unmatched[0])) if stage.targets else ("stages", index)
        near = ", ".join(names_near(model, unmatched[0]))
        raise located.error(f"target {unmatched[0]!r} matches no module of the model (near it: {near})", key)
    if not selected:
        key = ("stages", index, "ignore") if stage.ignore else ("stages", index)
        raise located.error(
            f"stage {index + 1} ({method.name}) selects no module (targets {targets}, ignore {ignore})", key
        )
    quant = method.produces().quant
    for name, module in selected.items():
        if not isinstance(module, method.supported_modules):
            kinds = ", ".join(cls.__name__ for cls in method.supported_modules)
            raise located.error(
                f"{method.name} cannot compress {name} ({type(module).__name__}); it handles {kinds}",
                ("stages", index, "targets"),
            )
        try:
            if quant is not None:
                check_group_width(quant, module.weight[0].numel(), name)
            method.check_layer(name, module)
        except UserError as error:
            raise located.error(f"{error.where}: {error.message}", ("stages", index)) from None
    return PlannedStage(method, targets, ignore, list(selected))


def check_format_holds(writer: Writer, stages: list[PlannedStage], model: nn.Module, located: LocatedRecipe) -> None:
    """Refuse a recipe whose stages produce what the output format cannot store, or in layers it cannot store."""
    capabilities = writer.capabilities
    modules = dict(model.named_modules())
    for index, stage in enumerate(stages):
        method = stage.method
        produced = method.produces()
        reason = capabilities.refusal(produced)
        if reason:
            raise located.error(
                f"output format {writer.name!r} {reason}, but stage {index + 1} ({method.name}) produces it",
                ("output", "format"),
            )
        if capabilities.layer_types is None or produced == Produces():
            continue
        for name in stage.target_names:
            kind = type(modules[name]).__name__
            if kind not in capabilities.layer_types:
                held = ", ".join(sorted(capabilities.layer_types))
                raise located.error(
                    f"output format {writer.name!r} stores compressed {held} layers only, but stage {index + 1} "
                    f"({method.name}) compresses {name} ({kind})",
                    ("output", "format"),
                )


def check_targets_reached(
    stages: list[PlannedStage], model: nn.Module, task: str, config: PretrainedConfig, located: LocatedRecipe
) -> None:
    """Refuse a calibration stage's target outside the repeated blocks that the model's forward
    pass never reaches (:mod:`compress.reach`), before any weight is read."""
    try:
        blocks_name, _ = find_blocks(model)
    except ValueError:  # no blocks: the engine refuses the stage itself
        return
    outside = {
        index: [name for name in stage.target_names if not within(name, blocks_name)]
        for index, stage in enumerate(stages)
        if isinstance(stage.method, BlockMethod)
    }
    names = list(dict.fromkeys(name for names in outside.values() for name in names))
    missed = (unreached(model, names, task, config) or []) if names else []
    for index, names in outside.items():
        for name in (name for name in names if name in missed):
            raise located.error(
                f"target {name}: the model's forward pass does not reach this layer, so "
                f"{stages[index].method.name} cannot calibrate it (leave it out with ignore:)",
                ("stages", index, "targets"),
            )


def check_zeros_kept(stages: list[PlannedStage], located: LocatedRecipe) -> None:
    """Refuse a stage that would fill the zeros an earlier stage pruned into the same layers
    (its method does not declare ``keeps_zeros`` and prunes nothing itself, e.g. gptq's updates)."""
    for index, stage in enumerate(stages):
        method = stage.method
        if method.keeps_zeros or method.produces().sparsity is not None:
            continue
        for earlier_index, earlier in enumerate(stages[:index]):
            pattern = earlier.method.produces().sparsity
            shared = sorted(set(earlier.target_names) & set(stage.target_names))
            if pattern is not None and shared:
                raise located.error(
                    f"stage {index + 1} ({method.name}) would fill the zeros of the {pattern} sparsity that stage "
                    f"{earlier_index + 1} ({earlier.method.name}) leaves in {shared[0]}"
                    + (f" and {len(shared) - 1} more layers" if len(shared) > 1 else "")
                    + ": quantize before pruning, or in the pruning stage (sparsegpt's bits)",
                    ("stages", index, "method"),
                )


def check_whole_stages(
    host: PluginHost, stages: list[PlannedStage], model: nn.Module, writer: Writer | None, located: LocatedRecipe
) -> None:
    """Each method's :meth:`~compress.method.Method.check_stage`: what needs the whole plan."""
    modules = dict(model.named_modules())
    for index, stage in enumerate(stages):
        try:
            stage.method.check_stage(host.methods(), {n: modules[n] for n in stage.target_names}, writer)
        except UserError as error:
            message = f"{error.where}: {error.message}" if error.where else error.message
            raise located.error(message, ("stages", index)) from None


def stage_key(recipe: Recipe, index: int, where: object) -> tuple:
    """Where a stage's check error goes: at the parameter ``where`` names when the stage gives it,
    else at the stage's method."""
    given = isinstance(where, str) and where in recipe.stages[index].params
    return ("stages", index, where) if given else ("stages", index, "method")


def check_forward_shapes(
    loader: Loader,
    recipe: Recipe,
    located: LocatedRecipe,
    stages: list[PlannedStage],
    model: nn.Module,
    task: str,
    config: Any,
) -> None:
    """Each overriding method's :meth:`~compress.method.Method.check_forward`, with one meta input
    shaped as the data (the image processor is read only when some stage asks)."""
    asking = [i for i, stage in enumerate(stages) if type(stage.method).check_forward is not Method.check_forward]
    if not asking:
        return
    load_tokenizer = getattr(loader, "load_tokenizer", None)  # optional for a loader
    processor = load_tokenizer(recipe.model, config, task) if load_tokenizer is not None else None
    inputs = forward_inputs(model, task, config, processor)
    planned = [(stage.method, stage.target_names) for stage in stages]
    for index in asking:
        try:
            stages[index].method.check_forward(model, inputs, planned[:index])
        except UserError as error:
            raise located.error(error.message, stage_key(recipe, index, error.where)) from None


def data_error(located: LocatedRecipe, name: str, error: UserError) -> UserError:
    """A data source's refusal of entry ``name``, placed as ``DataSource.check`` says: at the entry,
    at the key of it that ``where`` names, or (a Location) at the line of the data file."""
    if isinstance(error.where, Location):
        return error
    if error.where is None:
        return located.error(error.message, ("data", name))
    if error.where in DataSpec.model_fields:
        return located.error(error.message, ("data", name, error.where))
    return located.error(f"{error.message}: {error.where}", ("data", name, "path"))


def check_device(name: str) -> None:
    """Refuse a ``run: device`` this machine lacks (``cuda`` without CUDA, ``cuda:N`` beyond its GPUs),
    and more processes on this machine than it has CUDA devices for them to compute on."""
    if name == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = local_processes()
    if count and processes > count:
        raise UserError(
            f"{processes} processes on this machine, but it has {count} CUDA device(s): start at most {count} "
            f"(accelerate launch --num_processes {count}, torchrun --nproc_per_node {count})"
        )
    if not name.startswith("cuda"):
        return
    index = int(name.partition(":")[2] or local_rank() or 0)
    if index >= count:
        found = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise UserError(f"device {name!r} is not available: this machine has {found}")


def input_replaced_by(output: Path, recipe: Recipe, recipe_file: Path) -> str | None:
    """The run's input (working directory, recipe, model, data) that replacing ``output`` would delete, if any."""
    target = Path(os.path.realpath(output))  # realpath, unlike Path.resolve, accepts symlink loops
    inputs = [
        ("the working directory", Path.cwd()),
        ("the recipe", recipe_file),
        ("the model", Path(recipe.model.name)),
    ]
    inputs += [(f"data {name!r}", spec.path) for name, spec in recipe.data.items()]
    for label, place in inputs:
        resolved = Path(os.path.realpath(place))
        if place.exists() and (resolved == target or target in resolved.parents):
            return label
    return None


def check_data_tokens(
    loader: Loader, recipe: Recipe, located: LocatedRecipe, sources: dict[str, Any], config: PretrainedConfig, task: str
) -> dict[str, list[Sample]]:
    """The data entries' checks that need the tokenizer, when the loader gives it without the
    weights: the samples of the entries whose source checks tokens by making them (returns
    samples from ``check_tokens``), by name."""
    entries = {name: spec for name, spec in recipe.data.items() if hasattr(sources[spec.source], "check_tokens")}
    load_tokenizer = getattr(loader, "load_tokenizer", None)  # optional for a loader
    if not entries or load_tokenizer is None:
        return {}
    tokenizer = load_tokenizer(recipe.model, config, task)
    made = {}
    for name, spec in entries.items():
        try:
            samples = sources[spec.source].check_tokens(spec, tokenizer)
        except UserError as error:
            raise data_error(located, name, error) from None
        if samples is not None:
            made[name] = samples
    return made


def check_recipe(host: PluginHost, source: Path | LocatedRecipe, overwrite: bool = True) -> CheckedRecipe:
    """Validate a recipe (a file, or one already parsed, e.g. with ``--set`` overrides applied)
    completely without reading weights; raise a located UserError."""
    located = source if isinstance(source, LocatedRecipe) else parse_recipe_file(source)
    recipe = validate_recipe(located)
    path = located.path
    try:
        check_device(recipe.run.device)
    except UserError as error:
        raise located.error(error.message, ("run", "device")) from None
    methods = [build_method(host, recipe, located, index) for index in range(len(recipe.stages))]
    for index, method in enumerate(methods):
        written = {key for earlier in methods[:index] for key in earlier.writes_state}
        for key in method.reads_state:
            if key not in written:
                message = f"method {method.name!r} reads state {key!r}, which no earlier stage writes"
                raise located.error(message, ("stages", index))
        try:
            method.check_previous_stages(methods[:index])
        except UserError as error:
            raise located.error(error.message, stage_key(recipe, index, error.where)) from None

    sources = host.data_sources()
    for name, spec in recipe.data.items():
        if spec.source not in sources:
            raise located.error(
                f"unknown data source {spec.source!r}{did_you_mean(spec.source, list(sources))}",
                ("data", name, "source"),
            )
        try:
            sources[spec.source].check(spec)
        except UserError as error:
            raise data_error(located, name, error) from None

    writer = writer_options = None
    if recipe.output is not None:
        writers = host.writers()
        if recipe.output.format not in writers:
            raise located.error(
                f"unknown output format {recipe.output.format!r}{did_you_mean(recipe.output.format, list(writers))}",
                ("output", "format"),
            )
        writer = writers[recipe.output.format]
        try:
            writer_options = writer.Options.model_validate(recipe.output.options)
        except ValidationError as error:
            raise pydantic_error(error, located, ("output",)) from None
        replaced = input_replaced_by(recipe.output.dir, recipe, Path(path))
        if replaced is not None:
            raise located.error(
                f"output directory {recipe.output.dir} is or contains {replaced}, which writing it would delete",
                ("output", "dir"),
            )
        if recipe.output.dir.exists() and not overwrite:
            raise located.error(
                f"output directory {recipe.output.dir} exists (pass --overwrite to replace it)", ("output", "dir")
            )
    try:
        check_export(recipe)
    except UserError as error:
        raise located.error(error.message, ("export", "hub")) from None

    try:
        loader = host.loader_for(recipe.model)
    except UserError as error:
        raise located.error(f"model {recipe.model.name!r}: {error.message}", model_key(located)) from None
    try:
        config, task = loader.load_config(recipe.model)
    except UserError as error:
        raise located.error(
            f"{error.message}: {error.where}" if error.where else error.message, model_key(located)
        ) from None
    for name, spec in recipe.data.items():
        check_model = getattr(sources[spec.source], "check_model", None)  # optional for a data source
        try:
            if check_model is not None:
                check_model(spec, task, config)
        except UserError as error:
            raise data_error(located, name, error) from None

    metrics = host.metrics()
    for index, spec in enumerate(recipe.evaluate):
        if spec.metric not in metrics:
            raise located.error(
                f"unknown metric {spec.metric!r}{did_you_mean(spec.metric, list(metrics))}", ("evaluate", index)
            )
        if task not in metrics[spec.metric].tasks:
            raise located.error(f"metric {spec.metric!r} does not apply to a {task} model", ("evaluate", index))
        if metrics[spec.metric].reads_data and spec.data not in recipe.data:
            raise located.error(
                f"metric {spec.metric!r} reads data {spec.data!r}, which data: lacks", ("evaluate", index)
            )
        params_class = metrics[spec.metric].Params
        # the parameters' place: under the metric's name in the {METRIC: {...}} shorthand
        entry = (
            ("evaluate", index, spec.metric)
            if ("evaluate", index, spec.metric) in located.marks
            else ("evaluate", index)
        )
        try:
            metric_params = params_class.model_validate(spec.params)
        except ValidationError as error:
            raise pydantic_error(error, located, entry, [*params_class.model_fields, "data"]) from None
        try:
            metrics[spec.metric](metric_params).check(recipe.data.get(spec.data), recipe.data, config)
        except UserError as error:
            key = (*entry, error.where) if error.where in spec.params else entry
            raise located.error(error.message, key) from None

    skeleton = meta_model(config, task, recipe.model.trust_remote_code)
    stages = [check_stage_targets(skeleton, method, recipe, located, i) for i, method in enumerate(methods)]
    check_zeros_kept(stages, located)
    if fsdp_requested():
        targets = [stage.target_names for stage in stages]
        reason, key = fsdp_refusal(methods, targets, writer, bool(recipe.evaluate), loader)
        if reason:
            raise located.error(reason, key)
    if recipe.run.mode == "lazy":
        targets = [stage.target_names for stage in stages]
        reason, key = lazy_refusal(methods, targets, writer, loader, bool(recipe.evaluate))
        if reason:
            raise located.error(reason, key)
    check_targets_reached(stages, skeleton, task, config, located)
    if writer is not None:
        check_format_holds(writer, stages, skeleton, located)
        quantized = {
            name: s.method.produces().quant.bits for s in stages if s.method.produces().quant for name in s.target_names
        }
        dtype = recipe.model.dtype if recipe.model.dtype != "auto" else getattr(config, "dtype", None)
        try:
            check_output_place(
                recipe.output.dir, estimated_output_bytes(skeleton, quantized, writer, dtype_itemsize(dtype))
            )
        except UserError as error:
            raise located.error(f"output directory {error.where}: {error.message}", ("output", "dir")) from None
    check_whole_stages(host, stages, skeleton, writer, located)
    check_forward_shapes(loader, recipe, located, stages, skeleton, task, config)
    samples = check_data_tokens(loader, recipe, located, sources, config, task)  # the slowest check comes last
    return CheckedRecipe(Path(path), recipe, located, loader, task, stages, writer, writer_options, samples)
