"""The training contract beyond one loss on one dataset: named datasets, parameter groups and
extra parameters, the straight-through opt-out, the global batch and ``context.state``."""

from __future__ import annotations

import os
import signal
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compress import hookimpl
from compress.api import Method, TrainingMethod, UserError, model_inputs
from compress.cli import cli
from compress.engine import apply_recipe
from compress.training.loop import DatasetStream, batch_split
from compress.training.method import TrainParams
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID
from tests.test_bad_input import assert_user_error


def next_token_loss(model: nn.Module, batch: dict, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits.float() * gain
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


class TwoData(TrainingMethod):
    """Learns the retain data and, half as much, the forget data through a learned gain on the
    logits in its own parameter group; logs what each step read in ``context.state`` (test only)."""

    name = "two_data"
    datasets = ("forget", "retain")
    writes_state = ("two_data",)
    interrupt_at: int | None = None

    def prepare(self, context, run, device):
        self.context, self.calls = context, 0
        self.gain = nn.Parameter(torch.ones((), device=device))
        context.state["two_data"] = {"seen": []}

    def extra_parameters(self):
        return [self.gain]

    def parameter_groups(self, trainable):
        return [{"params": trainable}, {"params": [self.gain], "lr": 0.05}]

    def loss(self, model, batches):
        self.calls += 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        rows = {name: [hash(tuple(row.tolist())) for row in batch["input_ids"]] for name, batch in batches.items()}
        self.context.state["two_data"]["seen"].append(rows)
        loss = next_token_loss(model, batches["retain"], self.gain)
        return loss + 0.5 * next_token_loss(model, batches["forget"], self.gain), {}

    def finish(self, context, run):
        run.record.details["gain"] = self.gain.item()


class TwoDataSGD(TwoData):
    """TwoData with plain SGD, whose steps follow the gradients' size (test only)."""

    name = "two_data_sgd"

    def configure_optimizer(self, groups):
        return torch.optim.SGD(groups, lr=self.params.lr)


class FreeWeights(TrainingMethod):
    """Trains the layers' weights freely (no host straight-through) and puts them back on their
    grids itself when done (test only)."""

    name = "free_weights"
    straight_through = False
    parametrized: ClassVar[list[bool]] = []
    off_grid: ClassVar[bool] = False

    def prepare(self, context, run, device):
        self.targets = run.targets

    def loss(self, model, batches):
        FreeWeights.parametrized.append(any(parametrize.is_parametrized(m) for m in self.targets.values()))
        return next_token_loss(model, batches["train"]), {}

    def finish(self, context, run):
        with torch.no_grad():
            for name, module in run.targets.items():
                if name not in context.layers:
                    continue
                projected = context.layers[name].quant.fake_quantize(module.weight)
                FreeWeights.off_grid |= not torch.equal(projected, module.weight)
                module.weight.copy_(projected)


class NeedsReference(TrainingMethod):
    """Reads a dataset besides its training data (test only)."""

    name = "needs_reference"
    needs_data = ("reference",)

    def loss(self, model, batches):
        return next_token_loss(model, batches["train"]), {}


class ReadsState(Method):
    """Reads what two_data wrote (test only)."""

    name = "reads_state"
    kind = "search"
    reads_state = ("two_data",)

    def apply(self, context, run):
        run.record.details["steps_seen"] = len(context.state["two_data"]["seen"])


class ContractPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        for method in (TwoData, TwoDataSGD, FreeWeights, NeedsReference, ReadsState):
            register(method)


@pytest.fixture
def contract_host(host):
    host.register(ContractPlugin, name="contract-test")
    TwoData.interrupt_at = None
    FreeWeights.parametrized, FreeWeights.off_grid = [], False
    return host


def two_data_recipe(write_recipe, tmp_path, stages=None, **stage):
    return write_recipe(
        data={
            "forget": {"path": str(WIKITEXT_TEST), "samples": 4, "seq_len": 16},
            "retain": {"path": str(WIKITEXT_VALID), "samples": 8, "seq_len": 16},
        },
        stages=stages or [{"method": "two_data", "steps": 5, "batch_size": 2, "lr": 1e-3, "log_every": 1, **stage}],
        output={"dir": str(tmp_path / "out")},
        evaluate=[],
    )


def stage_line(path, method: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == f"- method: {method}")


def test_each_dataset_is_read_at_its_own_epoch_and_position(contract_host, write_recipe, tmp_path):
    context = apply_recipe(contract_host, check_recipe(contract_host, two_data_recipe(write_recipe, tmp_path)))
    seen = context.state["two_data"]["seen"]
    forget, retain = [step["forget"] for step in seen], [step["retain"] for step in seen]
    assert len(seen) == 5 and all(len(rows) == 2 for rows in forget + retain)
    # forget holds 2 batches an epoch, retain 4: each epoch reads every sample once, in a new order
    assert sorted(forget[0] + forget[1]) == sorted(forget[2] + forget[3]) and len({*forget[0], *forget[1]}) == 4
    assert forget[:2] != forget[2:4]
    first_retain_epoch = {row for rows in retain[:4] for row in rows}
    assert len(first_retain_epoch) == 8 and set(retain[4]) <= first_retain_epoch
    assert not {row for rows in forget for row in rows} & first_retain_epoch


def test_resumed_run_equals_the_uninterrupted_one_with_extra_parameters_and_state(
    contract_host, write_recipe, tmp_path
):
    recipe = two_data_recipe(write_recipe, tmp_path, checkpoint_every=2)
    checked = check_recipe(contract_host, recipe)
    straight = apply_recipe(contract_host, checked)
    expected = {name: value.clone() for name, value in straight.model.state_dict().items()}
    gain = checked.stages[0].method.gain.detach().clone()
    assert gain.item() != 1.0
    (tmp_path / "out").rename(tmp_path / "first")

    TwoData.interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(contract_host, check_recipe(contract_host, recipe))
    TwoData.interrupt_at = None
    checked = check_recipe(contract_host, recipe)
    resumed = apply_recipe(contract_host, checked, resume=True)
    details = resumed.report.stages[0].details
    assert details["resumed_from_step"] == 3
    assert details["loss_curve"] == straight.report.stages[0].details["loss_curve"]
    assert torch.equal(checked.stages[0].method.gain.detach(), gain)
    assert resumed.state == straight.state
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_resuming_with_other_extra_parameters_is_refused(contract_host, write_recipe, tmp_path, monkeypatch):
    recipe = two_data_recipe(write_recipe, tmp_path, checkpoint_every=2)
    TwoData.interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(contract_host, check_recipe(contract_host, recipe))
    TwoData.interrupt_at = None
    for gains in ([torch.zeros(())] * 2, [torch.zeros(3)]):  # one parameter more, one of another shape

        def groups(self, trainable, gains=gains):
            return [{"params": trainable}, {"params": [nn.Parameter(gain) for gain in gains], "lr": 0.05}]

        monkeypatch.setattr(TwoData, "parameter_groups", groups)
        with pytest.raises(UserError, match=r"the checkpoint does not fit this stage's parameters \(.*\); delete it"):
            apply_recipe(contract_host, check_recipe(contract_host, recipe), resume=True)
    assert not (tmp_path / "out").exists()


def test_a_method_parameter_group_trains_at_its_own_learning_rate(contract_host, write_recipe, tmp_path):
    checked = check_recipe(contract_host, two_data_recipe(write_recipe, tmp_path, steps=1, schedule="constant"))
    original = checked.loader.load(checked.recipe.model).model
    before = {name: value.clone() for name, value in original.state_dict().items()}
    context = apply_recipe(contract_host, checked)
    # Adam's first step moves every parameter by its learning rate
    assert abs(checked.stages[0].method.gain.item() - 1.0) == pytest.approx(0.05, rel=1e-3)
    moved = max((value - before[name]).abs().max().item() for name, value in context.model.state_dict().items())
    assert moved == pytest.approx(1e-3, rel=1e-2)


def test_straight_through_opt_out_leaves_the_weights_free(contract_host, write_recipe, tmp_path):
    recipe = write_recipe(
        data={"train": {"path": str(WIKITEXT_VALID), "samples": 4, "seq_len": 16}},
        stages=[
            {"method": "rtn", "bits": 4, "group_size": 64},
            {"method": "free_weights", "steps": 2, "batch_size": 2, "lr": 1e-2},
        ],
        output={"dir": str(tmp_path / "out")},
        evaluate=[],
    )
    context = apply_recipe(contract_host, check_recipe(contract_host, recipe))
    assert context.report.stages[1].details["constrained_layers"] == 0
    assert FreeWeights.parametrized == [False, False]
    assert FreeWeights.off_grid, "the free weights never left their grid"


def test_accumulated_micro_batches_train_the_one_batch_run(contract_host, write_recipe, tmp_path):
    curves = []
    for micro in (4, 1):
        recipe = write_recipe(
            data={"train": {"path": str(WIKITEXT_VALID), "samples": 8, "seq_len": 16}},
            stages=[
                {
                    "method": "free_weights",
                    "steps": 3,
                    "batch_size": 4,
                    "micro_batch_size": micro,
                    "lr": 1e-3,
                    "log_every": 1,
                }
            ],
            output={"dir": str(tmp_path / f"out{micro}")},
            evaluate=[],
        )
        details = apply_recipe(contract_host, check_recipe(contract_host, recipe)).report.stages[0].details
        assert details["micro_steps"] == 4 // micro
        curves.append([loss for _, loss in details["loss_curve"]])
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_dataset_stream_deals_the_same_global_batches_to_any_number_of_processes():
    samples = [{"input_ids": torch.tensor([i, i, i])} for i in range(10)]

    def stream(process, processes, micro):
        return DatasetStream("train", samples, 0, 4, micro, process, processes, pad_id=0)

    def rows(batches):
        return sorted(int(row[0]) for batch in batches for row in batch["input_ids"])

    alone = stream(0, 1, 4)
    for step in range(6):
        shards = [stream(p, 2, 1).batches(step) for p in range(2)]
        assert [len(shard) for shard in shards] == [2, 2]
        assert rows(shards[0] + shards[1]) == rows(alone.batches(step))
        assert alone.tokens(step) == 12
    epoch = [rows(alone.batches(step)) for step in (0, 1)]
    assert not set(epoch[0]) & set(epoch[1])
    assert rows(alone.batches(2)) != epoch[0]


def test_batch_split_over_devices():
    assert batch_split(TrainParams(batch_size=8, micro_batch_size=2), 2, "stage") == (2, 2)
    assert batch_split(TrainParams(batch_size=8), 2, "stage") == (4, 1)
    with pytest.raises(UserError, match="batch_size 6 does not split evenly over 4 devices"):
        batch_split(TrainParams(batch_size=6), 4, "stage")
    with pytest.raises(
        UserError, match="each of 2 devices takes 3 samples of batch_size 6, not a multiple of micro_batch_size 2"
    ):
        batch_split(TrainParams(batch_size=6, micro_batch_size=2), 2, "stage")


@pytest.mark.parametrize(
    ("stages", "data", "pattern"),
    [
        ([{"method": "two_data"}], {"retain"}, r"method 'two_data' reads data: forget:, which the recipe lacks"),
        (
            [{"method": "two_data", "data": {"forget": "gone", "retain": "retain"}}],
            {"retain", "forget"},
            r"reads data: gone: \(as forget\), which the recipe lacks",
        ),
        (
            [{"method": "two_data", "data": "retain"}],
            {"retain", "forget"},
            r"data: names one entry, but method 'two_data' reads 2 datasets: give \{forget: ENTRY, retain: ENTRY\}",
        ),
        (
            [{"method": "two_data", "eval_data": {"forget": "forget", "retain": "retain", "extra": "retain"}}],
            {"retain", "forget"},
            r"eval_data: has 'extra', which method 'two_data' does not read \(it reads forget, retain\)",
        ),
        (
            [{"method": "two_data", "data": {"forget": "forget"}}],
            {"retain", "forget"},
            r"data: lacks dataset 'retain' of method 'two_data'",
        ),
        ([{"method": "needs_reference"}], {"train"}, r"method 'needs_reference' needs data: reference: in the recipe"),
        (
            [{"method": "two_data", "batch_size": 4, "micro_batch_size": 3}],
            {"retain", "forget"},
            r"batch_size 4 is not a multiple of micro_batch_size 3",
        ),
        (
            [{"method": "free_weights", "latent_weights": "original"}],
            {"train"},
            r"latent_weights: original needs the host's straight-through, which method 'free_weights' does not use",
        ),
        (
            [{"method": "rtn", "bits": 4}, {"method": "reads_state"}],
            {"train"},
            r"method 'reads_state' reads state 'two_data', which no earlier stage writes",
        ),
    ],
)
def test_bad_training_stage_is_one_line_at_recipe_check(contract_host, write_recipe, tmp_path, stages, data, pattern):
    from click.testing import CliRunner

    files = {"forget": WIKITEXT_TEST, "retain": WIKITEXT_VALID, "train": WIKITEXT_VALID}
    recipe = write_recipe(
        data={name: {"path": str(files[name]), "samples": 8, "seq_len": 16} for name in sorted(data)},
        stages=stages,
        output={"dir": str(tmp_path / "out")},
        evaluate=[],
    )
    line = assert_user_error(CliRunner().invoke(cli, ["recipe", "check", str(recipe)]), pattern)
    assert line.startswith(f"error: {recipe}:{stage_line(recipe, stages[-1]['method'])}:"), line


def test_state_written_by_an_earlier_stage_is_read_by_a_later_one(contract_host, write_recipe, tmp_path):
    stages = [{"method": "two_data", "steps": 2, "batch_size": 2}, {"method": "reads_state"}]
    context = apply_recipe(contract_host, check_recipe(contract_host, two_data_recipe(write_recipe, tmp_path, stages)))
    assert context.report.stages[1].details["steps_seen"] == 2


def test_two_processes_train_the_one_process_run_with_extra_parameters(write_recipe, tmp_path):
    """The same recipe at 1 and 2 processes (torchrun, gloo on the CPU), the second with
    accumulation: the gain outside the model is averaged like the model's gradients, and
    the method's own optimizer is used."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from compress.engine import apply_recipe\n"
        "from compress.host import PluginHost\n"
        "from compress.validate import check_recipe\n"
        "from tests.test_training_contract import ContractPlugin\n"
        "host = PluginHost()\nhost.load_plugins()\nhost.register(ContractPlugin, name='contract-test')\n"
        "apply_recipe(host, check_recipe(host, sys.argv[1]))\n"
    )
    curves = {}
    for processes, micro in ((1, None), (2, 1)):
        stage = {
            "method": "two_data_sgd",
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": micro,
            "lr": 1e-3,
            "log_every": 1,
        }
        recipe = two_data_recipe(write_recipe, tmp_path, [stage])
        recipe.write_text(recipe.read_text().replace(str(tmp_path / "out"), str(tmp_path / f"out{processes}")))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"][
            : 5 if processes == 2 else 1
        ]
        root = Path(__file__).resolve().parents[1]
        subprocess.run(
            [*launcher, str(script), str(recipe)],
            check=True,
            capture_output=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        details = json.loads((tmp_path / f"out{processes}" / "report.json").read_text())["stages"][0]["details"]
        assert (details["devices"], details["micro_steps"]) == (processes, 2 if processes == 2 else 1)
        curves[processes] = [loss for _, loss in details["loss_curve"]], details["gain"]
    assert curves[1][1] != 1.0
    assert curves[2][0] == pytest.approx(curves[1][0], rel=1e-5)
    assert curves[2][1] == pytest.approx(curves[1][1], rel=1e-6)
