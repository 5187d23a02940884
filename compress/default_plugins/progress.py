"""Progress bars while stages run, and the summary tables at the end of a run."""

import sys

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from compress import hookimpl

console = Console(stderr=True)
_bars: dict[int, tqdm] = {}


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
    totals = context.report.totals
    if totals:
        stages.add_row(
            "",
            "all stages",
            "",
            "",
            f"{totals['seconds']:.1f}",
            gib(totals["peak_host_bytes"]),
            gib(totals["peak_device_bytes"]),
            style="bold",
        )
    console.print(stages)
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
