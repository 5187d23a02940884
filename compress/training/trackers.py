"""Experiment trackers of a training stage (``report_to: tensorboard | wandb``), through accelerate.

accelerate's trackers do the writing (``Accelerator(log_with=...)``, ``init_trackers``,
``log``); this module chooses where and under which names, as the recipe can say it:

- the logging directory is the stage's ``logging_dir``, by default ``runs/`` next to the
  output directory (``out/smollm2-w4g64`` logs under ``out/runs/``; ``runs/`` in the
  working directory for a recipe without output). TensorBoard writes into
  ``<logging_dir>/<output name>/`` (``tensorboard --logdir out/runs``), wandb keeps its
  files in ``<logging_dir>/wandb/``;
- the project is the output directory's name (``compress`` without one); wandb names the
  run ``<stage number>-<stage label>``; values are tagged ``<stage label>/<name>`` (``loss``,
  ``lr``, ``tokens_per_second``, ``eval_loss`` and the method's own), at the optimizer step;
- wandb reads its own environment (``WANDB_MODE=offline``, ``WANDB_PROJECT`` is overridden
  by the project above, ``WANDB_API_KEY``); nothing here sets its mode.

A resumed run appends to the same TensorBoard directory: TensorBoard drops the values an
interrupted run logged past the checkpoint's step when the resumed run logs that step again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.context import Context, StageRun

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The trackers a stage can report to, and the pip package each needs."""


def missing_tracker(names: list[str]) -> str | None:
    """The refusal for the first of ``names`` that accelerate cannot use here (its package
    is not installed), naming the package to install; None when all are usable."""
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            return f"tracker {name!r} is not installed: pip install {TRACKER_PACKAGES[name]}"
    return None


def logging_directory(context: Context, run: StageRun) -> Path:
    """Where the stage's trackers write: its ``logging_dir``, else ``runs/`` next to the output
    directory, else ``runs/`` in the working directory."""
    chosen = run.method.params.logging_dir
    if chosen is not None:
        return Path(chosen)
    output = context.recipe.output
    return Path("runs") if output is None else output.dir.parent / "runs"


def accelerator_options(context: Context, run: StageRun) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments that make it log to the stage's trackers (none when
    ``report_to`` is empty)."""
    names = run.method.params.report_to
    if not names:
        return {}
    return {"log_with": list(names), "project_dir": str(logging_directory(context, run))}


class StageTrackers:
    """Start, feed and close the trackers of one training stage (on the main process)."""

    def __init__(self, accelerator: Any, context: Context, run: StageRun) -> None:
        self.accelerator, self.run = accelerator, run
        self.names = list(run.method.params.report_to)
        self.directory = logging_directory(context, run)
        output = context.recipe.output
        self.project = "compress" if output is None else output.dir.name

    def start(self) -> None:
        """Open the trackers' runs; wandb also records the stage's parameters as its config."""
        if not self.names:
            return
        if self.accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
        label = f"{self.run.index + 1}-{self.run.stage.label}"
        self.accelerator.init_trackers(self.project, init_kwargs={"wandb": {"name": label, "dir": str(self.directory)}})
        config = {"stage": label, "method": self.run.method.name, **self.run.method.params.model_dump(mode="json")}
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.store_init_configuration(config)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` at optimizer step ``step``, each tagged ``<stage label>/<name>``."""
        if self.names:
            label = self.run.stage.label
            self.accelerator.log({f"{label}/{key}": value for key, value in values.items()}, step=step)

    def finish(self) -> None:
        """Flush and close the trackers' runs.

        Not ``Accelerator.end_training``: it also destroys the process group, which a later
        stage of the same run still needs.
        """
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.trackers = []
