"""The plots an output directory holds: the loss curve when a stage trained, the per-layer allocation of a search.

The loss curve is drawn from the curves the training loop records in each stage's report
details (``loss_curve`` and ``eval_curve``, lists of ``(step, loss)``). Both use matplotlib's
object-oriented API on the Agg canvas: no display and no pyplot state, so it runs on
headless machines and leaves the process's matplotlib backend alone.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"
"""Its name in the output directory, next to report.json (the model card embeds it)."""


def trained_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages (as report.json holds them) that recorded a training loss curve."""
    return [stage for stage in stages if stage.get("details", {}).get("loss_curve")]


def write_loss_curve(stages: list[dict[str, Any]], path: Path) -> bool:
    """Plot each trained stage's training loss, and its held-out loss where it has one, into
    the PNG ``path``: one panel per trained stage, loss against optimizer step. Returns whether
    there was anything to plot (nothing is written otherwise)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trained = trained_stages(stages)
    if not trained:
        return False
    figure = Figure(figsize=(7, 3.2 * len(trained)), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, stage in zip(figure.subplots(len(trained), 1, squeeze=False)[:, 0], trained):
        details = stage["details"]
        steps, losses = zip(*details["loss_curve"])
        axes.plot(steps, losses, label="training loss")
        if details.get("eval_curve"):
            eval_steps, eval_losses = zip(*details["eval_curve"])
            axes.plot(eval_steps, eval_losses, "o--", label="held-out loss")
        axes.set_title(f"{stage['name']} ({stage['method']})")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=100)
    return True


def allocation_png(values: list[float], target: float, unit: str, title: str) -> bytes:
    """A PNG bar chart of each targeted layer's chosen cost (in ``unit``), with the budget
    ``target`` as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 0.06 * len(values) + 2), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.bar(range(len(values)), values, width=0.9, color="#4c72b0")
    axes.axhline(target, color="#c44e52", linestyle="--", label=f"budget {target:.4g}")
    axes.set_xlabel("targeted layer (model order)")
    axes.set_ylabel(unit)
    axes.set_title(f"{title}: per-layer allocation")
    axes.legend(loc="upper right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
