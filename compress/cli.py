"""The ``compress`` command line."""

from __future__ import annotations

import functools
import inspect
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compress import __version__
from compress.errors import UserError, did_you_mean
from compress.host import get_host

console = Console()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup an interrupt runs runs for it too."""


def raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated


def user_errors(command: Callable) -> Callable:
    """Print a UserError as one line and exit 2; an interrupt exits 130 (SIGINT) or 143
    (SIGTERM) with nothing written, staging directories removed and locks released."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            detail = f"; {interrupt}" if str(interrupt) else ""
            signal_name = "SIGTERM" if terminated else "SIGINT"
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


@click.group()
@click.version_option(__version__)
def cli() -> None:
    """Apply compression recipes to models; write checkpoints transformers loads."""


@cli.command()
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--resume", is_flag=True, help="Continue interrupted training stages from their checkpoints.")
@user_errors
def apply(recipe_file: Path, overwrite: bool, resume: bool) -> None:
    """Run RECIPE_FILE: load the model, run its stages, evaluate, write the output."""
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    host = get_host()
    checked = check_recipe(host, recipe_file, overwrite=overwrite)
    apply_recipe(host, checked, overwrite=overwrite, resume=resume)


@cli.group()
def recipe() -> None:
    """Work with recipe files."""


@recipe.command("check")
@click.argument("recipe_file", type=click.Path(path_type=Path))
@user_errors
def recipe_check(recipe_file: Path) -> None:
    """Validate RECIPE_FILE completely without loading weights."""
    from compress.validate import check_recipe

    checked = check_recipe(get_host(), recipe_file)
    for index, planned in enumerate(checked.stages):
        click.echo(f"stage {index + 1}: {planned.method.name} on {len(planned.target_names)} modules")
    click.echo(f"{recipe_file}: ok")


@cli.command()
@click.argument("name", required=False)
@user_errors
def methods(name: str | None) -> None:
    """List installed methods, or document method NAME and its parameters."""

    registry = get_host().methods()
    if name is None:
        table = Table("method", "kind", "summary")
        for method_name, method in sorted(registry.items()):
            table.add_row(method_name, method.kind, (inspect.getdoc(method) or "").splitlines()[0])
        console.print(table)
        return
    if name not in registry:
        raise UserError(f"unknown method {name!r}{did_you_mean(name, list(registry))}")
    method = registry[name]
    console.print(f"[bold]{name}[/bold] ({method.kind})\n")
    console.print(inspect.getdoc(method) or "", markup=False)
    table = Table("parameter", "type", "default", "description", title="parameters")
    for field_name, field in method.Params.model_fields.items():
        annotation = field.annotation
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.default)
        table.add_row(field_name, annotation, default, field.description or "")
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


@cli.command("eval")
@click.argument("checkpoint")
@click.option("--against", "base", required=True, help="The original model (same names as a recipe's model:).")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Evaluation text file.")
@click.option("--samples", type=COUNT, default=8, show_default=True, help="Sequences to evaluate.")
@click.option("--seq-len", type=COUNT, default=512, show_default=True, help="Tokens per sequence (context length).")
@click.option("--metric", "metric_names", multiple=True, help="Metric (repeatable); default: all for the task.")
@click.option("--device", default="auto", show_default=True)
@user_errors
def eval_command(
    checkpoint: str, base: str, data_path: Path, samples: int, seq_len: int, metric_names: tuple[str, ...], device: str
) -> None:
    """Compare CHECKPOINT with the model it was made from: perplexity, KL, top-1, cosine."""
    from compress.context import resolve_device
    from compress.default_plugins.progress import evaluation_table
    from compress.evaluate import evaluate
    from compress.recipe import DataSpec, MetricSpec, ModelSpec

    host = get_host()
    registry = host.metrics()
    for name in metric_names:
        if name not in registry:
            raise UserError(f"unknown metric {name!r}{did_you_mean(name, list(registry))}", "--metric")
    spec = DataSpec(path=data_path, samples=samples, seq_len=seq_len)
    source = host.data_sources()[spec.source]
    source.check(spec)
    # every check that reads no weights comes before the two models load
    models = [ModelSpec(name=name) for name in (base, checkpoint)]
    loaders = [host.loader_for(model) for model in models]
    task = [loader.load_config(model) for loader, model in zip(loaders, models, strict=True)][1][1]
    for name in metric_names:
        if task not in registry[name].tasks:
            raise UserError(f"metric {name!r} does not apply to a {task} model", "--metric")
    names = list(metric_names) or [n for n, cls in registry.items() if task in cls.tasks]
    loaded = [loader.load(model) for loader, model in zip(loaders, models, strict=True)]
    evaluation_data = source.load(spec, loaded[1].tokenizer)
    results = evaluate(
        host,
        loaded[0].model,
        loaded[1].model,
        [MetricSpec(metric=name, data="eval") for name in names],
        {"eval": (spec, evaluation_data)},
        resolve_device(device),
    )
    console.print(evaluation_table(results))


@cli.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--layers", "per_layer", is_flag=True, help="One row per Linear layer.")
@user_errors
def inspect_command(directory: Path, per_layer: bool) -> None:
    """Show DIRECTORY's format, how each layer is stored, and bytes on disk vs bf16."""
    from compress.checkpoint.inspect import inspect_checkpoint, storage_groups

    summary = inspect_checkpoint(directory)
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
