"""lm-evaluation-harness as an evaluation: ``evaluate: [{lm_eval: {tasks: [...]}}]`` and
``compress eval CKPT --lm-eval TASKS``.

The harness runs on the models in memory: its ``HFLM`` wraps the model and tokenizer the run
holds (nothing is reloaded, so the compressed model is measured as the run left it), through
its Python API (``lm_eval.simple_evaluate``). Tasks are the harness's own (``hellaswag``,
``arc_easy``, ...; their data come from the Hub, or its cache when offline), task YAML files
in ``include_path`` directories, or paths of task YAML files. Each task's metrics become rows
``lm_eval/<task>/<metric>`` of report.json's evaluation (and so of the model card and the
console's table), with the original model's value beside the compressed one's.

Choices of ours: stderr is not computed (``bootstrap_iters=0``: bootstrapping is slow and
the report shows point values); the harness's own INFO and WARNING chatter is kept off the
console; a filter other than ``none`` is named in the row (``exact_match,strict-match``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator
from torch import nn

from compress.devices import onloaded
from compress.errors import UserError, did_you_mean
from compress.evaluate import MetricInputs, MetricParams, ModelMetric
from compress.library_warnings import warnings_above_the_bar

if TYPE_CHECKING:
    from compress.recipe import DataSpec, MetricSpec

NOT_INSTALLED = "lm-evaluation-harness is not installed: pip install 'compress[lm-eval]'"


class LMEvalParams(MetricParams):
    tasks: list[str] = Field(
        min_length=1, description="harness task or group names (e.g. arc_easy, hellaswag), or task YAML files"
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; unset = each task's own")
    limit: int | float | None = Field(
        None, gt=0, description="examples per task (a fraction of each task when below 1); unset = all"
    )
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")
    include_path: list[Path] = Field([], description="directories of task YAML files besides the harness's own")
    original: bool = Field(True, description="also evaluate the original model (the report's original column)")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value


def task_manager(params: LMEvalParams, names: list[str]) -> Any:
    """The harness's TaskManager that knows ``names``: without the harness's own tasks when
    ``include_path`` defines every name that is not a task file (indexing the harness's
    thousands of tasks takes seconds), else with them. A UserError names the first unknown
    task, with a did-you-mean."""
    try:
        import lm_eval.tasks  # noqa: F401  (the cached managers below do not import it again)
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    for directory in params.include_path:
        if not directory.is_dir():
            raise UserError(f"include_path {directory} is not a directory", "include_path")
    include = tuple(str(path) for path in params.include_path)
    wanted = [name for name in names if not Path(name).is_file()]
    local = indexed_tasks(include, False)
    if all(name in local.all_tasks for name in wanted):
        return local
    manager = indexed_tasks(include, True)
    for name in wanted:
        if name not in manager.all_tasks:
            raise UserError(f"unknown lm-eval task {name!r}{did_you_mean(name, manager.all_tasks)}", "tasks")
    return manager


@functools.cache
def indexed_tasks(include: tuple[str, ...], with_harness_tasks: bool) -> Any:
    """A TaskManager over the ``include`` directories (and the harness's own tasks), built once
    per process: ``recipe check`` and the run share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=with_harness_tasks)


def result_rows(results: dict[str, Any]) -> dict[str, tuple[float, int | None]]:
    """``{"<task>/<metric>": (value, examples)}`` from ``simple_evaluate``'s results: every
    numeric metric of every task and group, stderr left out."""
    rows: dict[str, tuple[float, int | None]] = {}
    counts = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, int | float) or metric.endswith("_stderr") or not filter_name:
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            rows[f"{task}/{name}"] = (float(value), counts.get(task, {}).get("effective"))
    return rows


def run_harness(model: nn.Module, tokenizer: Any, params: LMEvalParams, manager: Any, device: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` (in memory, wrapped in ``HFLM``) on the tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_logger = logging.getLogger("lm_eval")
    level = harness_logger.level
    harness_logger.setLevel(logging.ERROR)
    try:
        with warnings_above_the_bar(), onloaded(model, device):
            language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size)
            return simple_evaluate(
                model=language_model,
                tasks=list(params.tasks),
                num_fewshot=params.num_fewshot,
                limit=params.limit,
                batch_size=params.batch_size,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=False,
            )
    finally:
        harness_logger.setLevel(level)


class LMEval(ModelMetric):
    """lm-evaluation-harness tasks on the models in memory (its HFLM, its Python API): one row per
    task and metric (accuracy, normalized accuracy, exact match, ...), original beside compressed.
    Reads no data: entry; needs ``pip install 'compress[lm-eval]'``."""

    name = "lm_eval"
    tasks = frozenset({"causal-lm"})
    reads_data = False
    Params = LMEvalParams
    params: LMEvalParams

    def check(self, spec: DataSpec | None, data: dict[str, DataSpec], config: Any) -> None:
        task_manager(self.params, self.params.tasks)

    def rows(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, dict[str, Any]]:
        manager = task_manager(self.params, self.params.tasks)
        measured = {
            "compressed": result_rows(run_harness(compressed, inputs.tokenizer, self.params, manager, inputs.device))
        }
        if self.params.original:
            measured["original"] = result_rows(
                run_harness(original, inputs.tokenizer, self.params, manager, inputs.device)
            )
        rows = {}
        for row, (value, examples) in measured["compressed"].items():
            task = row.split("/", 1)[0]
            rows[row] = {"compressed": value, "data": f"lm-eval {task}", "samples": examples or 0, "tokens": 0}
            if "original" in measured:
                rows[row]["original"] = measured["original"][row][0]
        return rows


def command_line_entry(tasks: str, limit: float | None) -> MetricSpec:
    """The ``evaluate:`` entry of ``compress eval --lm-eval TASKS [--lm-eval-limit N]``, its
    tasks checked (a UserError naming the option) before any model loads."""
    from compress.recipe import MetricSpec

    if limit is not None and limit <= 0:
        raise UserError(f"must be above 0, got {limit:g}", "--lm-eval-limit")
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise UserError("names no task", "--lm-eval")
    params = LMEvalParams(tasks=names, limit=int(limit) if limit is not None and limit >= 1 else limit)
    try:
        LMEval(params).check(None, {}, None)
    except UserError as error:
        raise UserError(error.message, "--lm-eval") from None
    return MetricSpec(metric=LMEval.name, **params.model_dump(exclude_defaults=True))
