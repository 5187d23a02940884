"""The console of ``compress apply``: a line as each phase starts and ends (load, stages, write,
evaluation), progress bars while stages run, and the summary tables at the end of a run.

Bars are removed when done and a line takes their place, so the console keeps a record of
every phase with its time, and no phase runs without a line saying what is happening.
"""

import sys

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from compress import hookimpl

console = Console(stderr=True)
_bars: dict[int, tqdm] = {}


@hookimpl
def compress_run_start(context):
    model, load = context.report.model, context.report.phases["load"]
    console.print(
        f"loaded {model['name']} ({model['parameters'] / 1e6:,.1f}M parameters, {model['dtype']}) "
        f"in {load['seconds']:.1f} s"
    )


@hookimpl
def compress_phase_start(context, phase):
    output = context.recipe.output
    if phase == "write":
        console.print(f"writing {output.dir} ({output.format})")
    elif phase == "evaluation":
        metrics = ", ".join(spec.metric for spec in context.recipe.evaluate)
        if metrics:
            console.print(f"evaluating {metrics}")


@hookimpl
def compress_phase_end(phase, usage):
    state = "interrupted after" if usage.get("interrupted") else "done in"
    device = f", peak device {gib(usage['peak_device_bytes'])} GiB" if usage["peak_device_bytes"] else ""
    console.print(f"{phase}: {state} {usage['seconds']:.1f} s (peak host {gib(usage['peak_host_bytes'])} GiB{device})")


@hookimpl
def compress_stage_start(stage, index, total):
    console.print(f"[bold]stage {index + 1}/{total}[/bold]: {stage.label} ({stage.method})")


@hookimpl
def compress_block_done(stage, block_index, num_blocks):
    bar = _bars.get(id(stage))
    if bar is None:
        bar = _bars[id(stage)] = tqdm(total=num_blocks, desc=stage.label, unit="block", leave=False)
    bar.update(1)


@hookimpl
def compress_stage_progress(stage, step, total, logs):
    bar = _bars.get(id(stage))
    if bar is None:
        bar = _bars[id(stage)] = tqdm(total=total, desc=stage.label, unit="step", leave=False)
    bar.update(step - bar.n)
    # resumption and held-out values get lines of their own: the postfix shows only the latest training values
    if "resumed_from_step" in logs:
        tqdm.write(f"{stage.label}: resuming from step {step}" + (f"/{total}" if total else ""), file=sys.stderr)
        return
    held_out = {key: value for key, value in logs.items() if key.startswith("eval_")}
    if held_out:
        shown = ", ".join(f"{key} {value:.4g}" for key, value in held_out.items())
        tqdm.write(f"{stage.label} step {step}: {shown}", file=sys.stderr)
    else:
        bar.set_postfix(logs, refresh=False)


@hookimpl
def compress_stage_end(stage, record):
    bar = _bars.pop(id(stage), None)
    if bar is not None:
        bar.close()
    console.print(f"{stage.label}: {len(record.layers)} layers in {record.seconds:.1f} s")


@hookimpl
def compress_run_failed():
    for bar in _bars.values():
        bar.close()
    _bars.clear()


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


@hookimpl
def compress_run_end(context):
    stages = Table(title="stages")
    for column in ("#", "stage", "method", "layers", "time (s)", "peak host (GiB)", "peak device (GiB)"):
        stages.add_column(column, justify="right" if column[0] in "#lptp" else "left")
    for i, record in enumerate(context.report.stages):
        stages.add_row(
            str(i + 1),
            record.name,
            record.method,
            str(len(record.layers)),
            f"{record.seconds:.1f}",
            gib(record.peak_host_bytes),
            gib(record.peak_device_bytes),
        )
    all_stages = context.report.phases.get("stages")
    if all_stages:
        stages.add_row(
            "",
            "all stages",
            "",
            "",
            f"{all_stages['seconds']:.1f}",
            gib(all_stages["peak_host_bytes"]),
            gib(all_stages["peak_device_bytes"]),
            style="bold",
        )
    console.print(stages)
    console.print(phases_table(context.report))
    for record in context.report.stages:
        curve = record.details.get("loss_curve")
        if curve:
            console.print(
                f"{record.name}: loss {curve[0][1]:.4g} (step {curve[0][0]}) -> {curve[-1][1]:.4g} "
                f"(step {curve[-1][0]}), {record.details['tokens_per_second']:,.0f} tokens/s"
            )
    if context.report.evaluation:
        console.print(evaluation_table(context.report.evaluation))
    if context.recipe.output is not None:
        console.print(f"wrote {context.recipe.output.dir}")


def phases_table(report):
    """Each phase of the run with its time and peak memory, and the run's total."""
    table = Table(title="run")
    for column in ("phase", "time (s)", "peak host (GiB)", "peak device (GiB)"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    rows = [*report.phases.items(), ("total", report.totals)]
    for name, usage in rows:
        label = f"{name} (interrupted)" if usage.get("interrupted") else name
        table.add_row(
            label,
            f"{usage['seconds']:.1f}",
            gib(usage["peak_host_bytes"]),
            gib(usage["peak_device_bytes"]),
            style="bold" if name == "total" else None,
        )
    return table


def evaluation_table(evaluation):
    table = Table(title="evaluation")
    for column in ("metric", "data", "size", "original", "compressed"):
        table.add_column(column)
    for name, result in evaluation.items():
        original = result.get("original")
        # data without tokens (images) is counted in samples
        size = f"{result['tokens']} ({result['seq_len']}/seq)" if result["tokens"] else f"{result['samples']} samples"
        table.add_row(
            name,
            result["data"],
            size,
            "" if original is None else f"{original:.4f}",
            f"{result['compressed']:.4f}",
        )
    return table
