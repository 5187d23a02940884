"""Training checkpoints: where they live, what they hold besides accelerate's state, and the
recipe fingerprint that decides whether ``compress apply --resume`` may continue from one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.distributed import is_main_process

if TYPE_CHECKING:
    from compress.context import Context, StageRun
    from compress.training.method import TrainingMethod

CHECKPOINT_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a training checkpoint holds besides accelerate's model/optimizer/RNG state."""

    step: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    processes: int = 1
    sharded: bool = False
    """Whether the model and optimizer are saved as FSDP shards, one set per process: such a
    checkpoint resumes only with the same number of processes."""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        raw = json.loads(path.read_text())
        raw["loss_curve"] = [tuple(point) for point in raw["loss_curve"]]
        raw["eval_curve"] = [tuple(point) for point in raw["eval_curve"]]
        return cls(**raw)


def fingerprint(context: Context, run: StageRun) -> dict[str, Any]:
    """Everything that decides a training stage's result: the model, the data it reads and
    every stage up to and including this one, as flat ``dotted.key: value`` pairs."""
    recipe = context.recipe
    method: TrainingMethod = run.method
    names = sorted({*method.data_names().values(), *method.eval_names().values()})
    tree = {
        "model": recipe.model.model_dump(mode="json"),
        "data": {name: recipe.data[name].model_dump(mode="json") for name in names},
        "stages": [stage.model_dump(mode="json") for stage in recipe.stages[: run.index + 1]],
        "seed": recipe.run.seed,
    }
    return dict(_flatten(tree))


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


RESUMABLE_PARAMETERS = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "steps",
    "report_to",
    "logging_dir",
    "compile",
)
"""Parameters of the resumed stage that ``--resume`` accepts changed: how often it logs,
evaluates and checkpoints, how many steps it runs (extending a run; the schedule then
spans the new total), where it reports, and whether it compiles."""


def resumable_keys(stage_index: int) -> set[str]:
    """The fingerprint keys of :data:`RESUMABLE_PARAMETERS` for the stage at ``stage_index``."""
    return {f"stages[{stage_index}].{name}" for name in RESUMABLE_PARAMETERS}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any], allowed: set[str] = frozenset()) -> list[str]:
    """Human-readable differences between two fingerprints, except at the ``allowed`` keys and
    the keys under them (a list's items, a mapping's keys)."""
    changes = []
    for key in sorted(saved.keys() | current.keys()):
        if any(key == prefix or key.startswith((f"{prefix}[", f"{prefix}.")) for prefix in allowed):
            continue
        if saved.get(key, "<unset>") != current.get(key, "<unset>"):
            changes.append(f"{key}: {saved.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}")
    return changes


def checkpoint_directory(context: Context, run: StageRun) -> Path | None:
    """Where a training stage keeps its checkpoint: ``<output dir>.checkpoints/<stage>``."""
    root = checkpoint_root(context)
    return None if root is None else root / f"{run.index + 1}-{run.stage.label}"


def checkpoint_root(context: Context) -> Path | None:
    output = context.recipe.output
    if output is None:
        return None
    return output.dir.with_name(output.dir.name + ".checkpoints")


def discard_checkpoints(context: Context) -> None:
    """Delete the run's training checkpoints once its output is written."""
    root = checkpoint_root(context)
    if root is not None and is_main_process():
        shutil.rmtree(root, ignore_errors=True)
