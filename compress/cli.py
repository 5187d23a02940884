"""The ``compress`` command line."""

from __future__ import annotations

import functools
import inspect
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compress import __version__
from compress.errors import OutputKept, UserError, did_you_mean
from compress.host import get_host

console = Console()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup an interrupt runs runs for it too."""


def raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated


def user_errors(command: Callable) -> Callable:
    """Print a UserError as one line and exit 2; an interrupt exits 130 (SIGINT) or 143
    (SIGTERM) with nothing written, staging directories removed and locks released (an
    interrupted evaluation keeps the output written before it, and says so)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated) or isinstance(interrupt.__cause__, Terminated)
            signal_name = "SIGTERM" if terminated else "SIGINT"
            if isinstance(interrupt, OutputKept):
                click.echo(f"interrupted by {signal_name} {interrupt}", err=True)
            else:
                detail = f"; {interrupt}" if str(interrupt) else ""
                click.echo(f"interrupted by {signal_name}: no output was written{detail}", err=True)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))

    return wrapper


class OptionError(click.BadParameter):
    """An option value refused at parsing, printed like a UserError: one ``error:`` line, exit 2."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Count(click.IntRange):
    """A positive integer option (``--samples``), checked before anything loads."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def fail(self, message: str, param: click.Parameter | None = None, ctx: click.Context | None = None) -> None:
        raise OptionError(message, ctx=ctx, param=param)


COUNT = Count()

OVERRIDES = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change the recipe: a dotted KEY (stages.0.bits, stages.NAME.bits, output.dir) and a YAML VALUE. Repeatable.",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead (keys: docs/cli.md).")


def echo_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout; non-finite numbers (an infinite perplexity) become null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    click.echo(json.dumps(finite(data), indent=2, allow_nan=False, default=str))


def complete_names(registry: str) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion of the names in one of the host's registries (``methods``, ``metrics``):
    each with the first line of its docstring."""

    def complete(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        try:
            found = getattr(get_host(), registry)()
        except UserError:  # a broken plugin setup: nothing to offer, and no traceback in the shell
            return []
        return [
            CompletionItem(name, help=summary(found[name])) for name in sorted(found) if name.startswith(incomplete)
        ]

    return complete


@click.group()
@click.version_option(__version__)
def cli() -> None:
    """Apply compression recipes to models; write checkpoints transformers loads."""


@cli.command()
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--resume", is_flag=True, help="Continue interrupted training stages from their checkpoints.")
@OVERRIDES
@user_errors
def apply(recipe_file: Path, overwrite: bool, resume: bool, overrides: tuple[str, ...]) -> None:
    """Run RECIPE_FILE: load the model, run its stages, evaluate, write the output."""
    from compress.runner import run

    run(recipe_file, overrides, overwrite=overwrite, resume=resume)


@cli.group()
def recipe() -> None:
    """Work with recipe files."""


@recipe.command("check")
@click.argument("recipe_file", type=click.Path(path_type=Path))
@OVERRIDES
@user_errors
def recipe_check(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE_FILE completely without loading weights."""
    from compress.runner import check

    checked = check(recipe_file, overrides)
    for index, planned in enumerate(checked.stages):
        click.echo(f"stage {index + 1}: {planned.method.name} on {len(planned.target_names)} modules")
    click.echo(f"{recipe_file}: ok")


def summary(documented: object) -> str:
    """The first line of a method's (or metric's) docstring."""
    return (inspect.getdoc(documented) or "").partition("\n")[0]


def parameters(method: Any) -> list[dict[str, Any]]:
    """A method's parameters as ``compress methods NAME --json`` prints them."""
    from pydantic_core import to_jsonable_python

    rows = []
    for field_name, field in method.Params.model_fields.items():
        annotation = field.annotation
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        required = field.is_required()
        rows.append(
            {
                "name": field_name,
                "type": annotation,
                "required": required,
                "default": None if required else to_jsonable_python(field.default, fallback=repr),
                "description": field.description or "",
            }
        )
    return rows


@cli.command()
@click.argument("name", required=False, shell_complete=complete_names("methods"))
@JSON
@user_errors
def methods(name: str | None, as_json: bool) -> None:
    """List installed methods, or document method NAME and its parameters."""

    registry = get_host().methods()
    if name is None:
        listing = [{"name": n, "kind": m.kind, "summary": summary(m)} for n, m in sorted(registry.items())]
        if as_json:
            echo_json({"methods": listing})
            return
        table = Table("method", "kind", "summary")
        for entry in listing:
            table.add_row(entry["name"], entry["kind"], entry["summary"])
        console.print(table)
        return
    if name not in registry:
        raise UserError(f"unknown method {name!r}{did_you_mean(name, list(registry))}")
    method = registry[name]
    if as_json:
        doc = inspect.getdoc(method) or ""
        echo_json({"name": name, "kind": method.kind, "doc": doc, "parameters": parameters(method)})
        return
    console.print(f"[bold]{name}[/bold] ({method.kind})\n")
    console.print(inspect.getdoc(method) or "", markup=False)
    table = Table("parameter", "type", "default", "description", title="parameters")
    for row in parameters(method):
        field = method.Params.model_fields[row["name"]]
        table.add_row(
            row["name"], row["type"], "required" if row["required"] else repr(field.default), row["description"]
        )
    console.print(table)


@cli.group(invoke_without_command=True)
@click.pass_context
@user_errors
def plugins(ctx: click.Context) -> None:
    """List installed plugins, their hooks, conflicts between them, and the ones that failed to load."""
    if ctx.invoked_subcommand is not None:
        return
    host = get_host()
    host.survey()
    conflicted = {owner for conflict in host.conflicts for owner in conflict.owners}
    table = Table("plugin", "version", "hooks")
    for info in host.plugins_info():
        name = info["name"] + (" (conflict)" if info["name"] in conflicted else "")
        table.add_row(name, info["version"] or "", ", ".join(info["hooks"]))
    console.print(table)
    for conflict in host.conflicts:
        console.print(f"[red]conflict[/red] {escape(str(conflict))}", highlight=False, soft_wrap=True)
    for broken in host.broken:
        console.print(f"[red]broken[/red] {escape(f'{broken.name}: {broken.error}')}", highlight=False, soft_wrap=True)


@plugins.command("new")
@click.argument("name")
@click.option("--dir", "parent", type=click.Path(path_type=Path), default=Path("."), help="Where to create it.")
@user_errors
def plugins_new(name: str, parent: Path) -> None:
    """Scaffold plugin distribution NAME: pyproject, one working method, a test, a recipe."""
    from compress.scaffold import scaffold_plugin

    created = scaffold_plugin(name, parent)
    click.echo(f"created {created}; next: pip install -e {created} && compress plugins")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to commit to (created when missing); default main.")
@user_errors
def push(directory: Path, repo_id: str, private: bool, revision: str | None) -> None:
    """Upload output DIRECTORY to Hub repository REPO_ID, with its model card."""
    from compress.hub import push as push_directory
    from compress.recipe import HubExport

    url = push_directory(get_host(), directory, HubExport(repo_id=repo_id, private=private, revision=revision))
    click.echo(f"pushed {directory} to {url}")


def parse_metric(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME(KEY=VALUE, ...)`` (values read as YAML scalars) as the name and its parameters."""
    import yaml

    name, _, rest = text.partition("(")
    if not rest:
        return name, {}
    if not rest.endswith(")"):
        raise UserError(f"expected NAME(KEY=VALUE, ...), found {text!r}", "--metric")
    params = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise UserError(f"expected KEY=VALUE in {text!r}, found {item!r}", "--metric")
        params[key.strip()] = yaml.safe_load(value)
    return name.strip(), params


def check_metric(metric_class: type, params: dict[str, Any], spec: Any, config: Any) -> None:
    """Refuse ``--metric`` parameters the metric does not take, or that do not fit the data or the model."""
    from pydantic import ValidationError

    try:
        checked = metric_class.Params.model_validate(params)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(map(str, problem["loc"]))
        raise UserError(f"metric {metric_class.name!r}: {where}: {problem['msg']}", "--metric") from None
    if spec is not None:
        try:
            metric_class(checked).check(spec, {"eval": spec}, config)
        except UserError as error:
            raise UserError(f"metric {metric_class.name!r}: {error.message}", "--metric") from None


@cli.command("eval")
@click.argument("checkpoint")
@click.option("--against", "base", required=True, help="The original model (same names as a recipe's model:).")
@click.option(
    "--data",
    "data_path",
    type=click.Path(),
    help="Evaluation text file, or builtin:NAME for a sample shipped with compress (needed but for --lm-eval alone).",
)
@click.option("--source", default="text", show_default=True, help="Data source of --data (e.g. jsonl, chat, qa).")
@click.option(
    "--loss-on",
    type=click.Choice(["all", "answers"]),
    default="all",
    show_default=True,
    help="Tokens scored: all, or answers only (jsonl/chat/qa data).",
)
@click.option("--samples", type=COUNT, default=8, show_default=True, help="Sequences to evaluate.")
@click.option("--seq-len", type=COUNT, default=512, show_default=True, help="Tokens per sequence (context length).")
@click.option(
    "--metric",
    "metric_names",
    multiple=True,
    shell_complete=complete_names("metrics"),
    help="Metric (repeatable), with parameters as NAME(KEY=VALUE, ...); default: all for the task.",
)
@click.option(
    "--lm-eval",
    "lm_eval_tasks",
    help="lm-evaluation-harness tasks, comma-separated (names or task YAML files), on both models.",
)
@click.option("--lm-eval-limit", type=float, help="Examples per lm-eval task (a fraction when below 1).")
@click.option("--device", default="auto", show_default=True)
@JSON
@user_errors
def eval_command(
    checkpoint: str,
    base: str,
    data_path: str | None,
    source: str,
    loss_on: str,
    samples: int,
    seq_len: int,
    metric_names: tuple[str, ...],
    lm_eval_tasks: str | None,
    lm_eval_limit: float | None,
    device: str,
    as_json: bool,
) -> None:
    """Compare CHECKPOINT with the model it was made from: perplexity, KL, top-1, cosine, lm-eval tasks."""
    from compress.activation_points import checkpoint_points, quantized_points
    from compress.context import resolve_device
    from compress.default_plugins.progress import evaluation_table
    from compress.evaluate import evaluate
    from compress.lm_eval import command_line_entry
    from compress.recipe import DataSpec, MetricSpec, ModelSpec
    from compress.sample_data import resolve as resolve_sample

    host = get_host()
    registry = host.metrics()
    metric_params = dict(parse_metric(text) for text in metric_names)
    metric_names = tuple(metric_params)
    for name in metric_names:
        if name not in registry:
            raise UserError(f"unknown metric {name!r}{did_you_mean(name, list(registry))}", "--metric")
    lm_eval = command_line_entry(lm_eval_tasks, lm_eval_limit) if lm_eval_tasks is not None else None
    if data_path is None and (metric_names or lm_eval is None):
        raise UserError("give the evaluation text (--data FILE), or only --lm-eval TASKS", "--data")
    if data_path is not None:
        if source not in host.data_sources():
            raise UserError(
                f"unknown data source {source!r}{did_you_mean(source, list(host.data_sources()))}", "--source"
            )
        try:
            data_file = resolve_sample(data_path)
        except ValueError as error:
            raise UserError(str(error), "--data") from None
        spec = DataSpec(path=data_file, samples=samples, seq_len=seq_len, source=source, loss_on=loss_on)
        reader = host.data_sources()[spec.source]
        reader.check(spec)
    # every check that reads no weights comes before the two models load
    models = [ModelSpec(name=name) for name in (base, checkpoint)]
    loaders = [host.loader_for(model) for model in models]
    config, task = [loader.load_config(model) for loader, model in zip(loaders, models, strict=True)][1]
    for name in metric_names:
        if task not in registry[name].tasks:
            raise UserError(f"metric {name!r} does not apply to a {task} model", "--metric")
        check_metric(registry[name], metric_params[name], spec if data_path is not None else None, config)
    if data_path is None:
        names = []
    else:
        names = list(metric_names) or [
            n for n, cls in registry.items() if task in cls.tasks and cls.reads_data and cls.by_default
        ]
    loaded = [loader.load(model) for loader, model in zip(loaders, models, strict=True)]
    datasets = {} if data_path is None else {"eval": (spec, reader.load(spec, loaded[1].tokenizer))}
    # a dense checkpoint's activation points (fimaq) are evaluated as they were calibrated
    with quantized_points(loaded[1].model, checkpoint_points(checkpoint)):
        results = evaluate(
            host,
            loaded[0].model,
            loaded[1].model,
            [MetricSpec(metric=name, data="eval", **metric_params.get(name, {})) for name in names]
            + ([lm_eval] if lm_eval else []),
            datasets,
            resolve_device(device),
            tokenizer=loaded[1].tokenizer,
        )
    if as_json:
        echo_json({"checkpoint": checkpoint, "against": base, "task": task, "evaluation": results})
        return
    console.print(evaluation_table(results))


@cli.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--layers", "per_layer", is_flag=True, help="One row per Linear layer.")
@JSON
@user_errors
def inspect_command(directory: Path, per_layer: bool, as_json: bool) -> None:
    """Show DIRECTORY's format, how each layer is stored, and bytes on disk vs bf16."""
    from compress.checkpoint.inspect import inspect_checkpoint, storage_groups

    summary = inspect_checkpoint(directory)
    if as_json:
        echo_json(inspection(directory, summary, storage_groups(summary)))
        return
    console.print(
        f"[bold]{directory}[/bold]: {summary.format}" + (f", {summary.sparsity} sparsity" if summary.sparsity else "")
    )
    table = Table("storage", "layers", "on disk (MB)", "bf16 (MB)", "ratio")
    rows = [(layer.storage, [layer]) for layer in summary.layers] if per_layer else storage_groups(summary).items()
    for storage, layers in rows:
        disk, bf16 = sum(l.disk_bytes for l in layers), sum(l.bf16_bytes for l in layers)
        label = layers[0].name if per_layer else str(len(layers))
        table.add_row(storage, label, f"{disk / 1e6:.2f}", f"{bf16 / 1e6:.2f}", f"{disk / bf16:.3f}")
    console.print(table)
    console.print(
        f"Linear layers: {summary.linear_ratio():.3f} x bf16; whole checkpoint: "
        f"{summary.disk_bytes / 1e6:.1f} MB on disk vs {summary.bf16_bytes / 1e6:.1f} MB in bf16 "
        f"({summary.disk_bytes / summary.bf16_bytes:.3f} x)"
    )


def inspection(directory: Path, summary: Any, groups: dict[str, list[Any]]) -> dict[str, Any]:
    """``compress inspect --json``: the checkpoint summary, each storage group and each Linear layer."""

    def sizes(layers: list[Any]) -> dict[str, Any]:
        disk, bf16 = sum(layer.disk_bytes for layer in layers), sum(layer.bf16_bytes for layer in layers)
        return {"disk_bytes": disk, "bf16_bytes": bf16, "ratio": disk / bf16 if bf16 else None}

    return {
        "directory": str(directory),
        "format": summary.format,
        "sparsity": summary.sparsity,
        "disk_bytes": summary.disk_bytes,
        "bf16_bytes": summary.bf16_bytes,
        "ratio": summary.disk_bytes / summary.bf16_bytes if summary.bf16_bytes else None,
        "linear": sizes(summary.layers),
        "groups": [{"storage": storage, "layers": len(layers), **sizes(layers)} for storage, layers in groups.items()],
        "layers": [{"name": layer.name, "storage": layer.storage, **sizes([layer])} for layer in summary.layers],
    }


@user_errors
def register_commands() -> None:
    """Add the plugins' commands to the CLI (loading the plugins, which can fail with a UserError)."""
    host = get_host()
    for impl in host.hook.compress_register_commands.get_hookimpls():
        host.call_guarded(impl, "compress_register_commands", cli=cli)


def main() -> None:
    signal.signal(signal.SIGTERM, raise_terminated)
    register_commands()
    cli()
