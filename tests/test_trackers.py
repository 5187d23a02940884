"""``report_to``: training stages log to TensorBoard and wandb through accelerate's trackers."""

from __future__ import annotations

import os
import sys
import types

import pytest
import yaml
from accelerate import tracking
from accelerate.utils import LoggerType

from compress.errors import UserError
from compress.validate import check_recipe
from tests.test_train import NextToken, NextTokenPlugin


@pytest.fixture
def train_run(register_plugin, run_recipe, tiny_text_file):
    register_plugin(NextTokenPlugin, name="next-token")
    NextToken.interrupt_at = NextToken.diverge_at = None

    def run(**stage):
        data = {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}
        return run_recipe(
            {
                "data": {"train": data, "evaluation": data},
                "stages": [
                    {
                        "method": "next_token",
                        "steps": 4,
                        "batch_size": 2,
                        "lr": 1e-3,
                        "log_every": 1,
                        "eval_data": "evaluation",
                        "eval_every": 2,
                        **stage,
                    }
                ],
                "output": {"dir": "out"},
            }
        )

    return run


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def same_curve(logged: list[tuple[int, float]], curve: list) -> bool:
    """Same steps, values equal to float32 precision (TensorBoard stores float32)."""
    return [step for step, _ in logged] == [step for step, _ in curve] and [value for _, value in logged] == (
        pytest.approx([value for _, value in curve], rel=1e-6)
    )


def test_tensorboard_gets_loss_lr_tokens_per_second_and_eval_loss_at_each_log_point(train_run):
    result = train_run(report_to="tensorboard")
    details = result.report["stages"][0]["details"]
    logged = scalars(result.output.parent / "runs" / result.output.name)
    assert set(logged) == {
        "next_token/loss",
        "next_token/lr",
        "next_token/tokens_per_second",
        "next_token/eval_loss",
    }
    assert same_curve(logged["next_token/loss"], details["loss_curve"]) and len(details["loss_curve"]) == 4
    assert same_curve(logged["next_token/eval_loss"], details["eval_curve"])
    assert [step for step, _ in logged["next_token/eval_loss"]] == [2, 4]
    learning_rates = [value for _, value in logged["next_token/lr"]]
    assert learning_rates[0] > learning_rates[-1] == pytest.approx(0.0)  # the cosine schedule after each step
    assert all(value > 0 for _, value in logged["next_token/tokens_per_second"])


def test_logging_dir_puts_the_events_where_the_recipe_says(train_run, tmp_path):
    result = train_run(report_to=["tensorboard"], logging_dir=str(tmp_path / "logs"), eval_every=None)
    assert [step for step, _ in scalars(tmp_path / "logs" / result.output.name)["next_token/loss"]] == [1, 2, 3, 4]
    assert not (result.output.parent / "runs").exists()


class FakeWandb(types.ModuleType):
    """What accelerate's WandBTracker calls of wandb, recording it; the mode comes from WANDB_MODE
    as in wandb itself."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[dict] = []
        self.config = types.SimpleNamespace(
            update=lambda values, allow_val_change: self.runs[-1]["config"].update(values)
        )

    def init(self, project, **kwargs):
        run = {"project": project, **kwargs, "mode": os.environ.get("WANDB_MODE", "online"), "config": {}, "logs": []}
        self.runs.append(run)
        return types.SimpleNamespace(
            log=lambda values, step=None, **_: run["logs"].append((step, values)),
            finish=lambda: run.update(finished=True),
        )


def test_wandb_gets_the_same_values_and_keeps_its_offline_mode(train_run, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "_available_trackers", [*tracking._available_trackers, LoggerType.WANDB])
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train_run(report_to=["wandb", "tensorboard"])
    [run] = fake.runs
    assert run["mode"] == "offline" and run["finished"]
    assert run["project"] == result.output.name and run["name"] == "1-next_token"
    assert run["dir"] == str(result.output.parent / "runs")
    assert run["config"]["steps"] == 4 and run["config"]["method"] == "next_token"
    losses = [(step, values["next_token/loss"]) for step, values in run["logs"] if "next_token/loss" in values]
    assert losses == [tuple(point) for point in result.report["stages"][0]["details"]["loss_curve"]]
    assert same_curve(scalars(result.output.parent / "runs" / result.output.name)["next_token/loss"], losses)


@pytest.mark.parametrize("value", ["wandb", "[tensorboard, wandb]"])
def test_a_tracker_that_is_not_installed_is_refused_at_recipe_check(
    register_plugin, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, value
):
    host = register_plugin(NextTokenPlugin, name="next-token")
    monkeypatch.setattr(tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    recipe = tmp_path / "recipe.yaml"
    data = {"train": {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}}
    head = yaml.safe_dump({"model": str(tiny_model_dir), "data": data, "output": {"dir": str(tmp_path / "out")}})
    recipe.write_text(head + f"stages:\n  - method: next_token\n    batch_size: 2\n    report_to: {value}\n")
    with pytest.raises(UserError) as error:
        check_recipe(host, recipe)
    assert error.value.message == "stages.0.report_to: Value error, tracker 'wandb' is not installed: pip install wandb"
    assert str(error.value.where).endswith(f":{head.count(chr(10)) + 4}:16")
