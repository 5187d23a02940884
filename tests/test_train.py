"""The shared training loop: straight-through training, NaN stop, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from compress import hookimpl
from compress.context import LayerState
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.quant import QuantScheme, compute_grid
from compress.straight_through import straight_through
from compress.training.method import TrainingMethod
from compress.validate import check_recipe
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID


class NextToken(TrainingMethod):
    """Plain next-token cross-entropy; interrupts or diverges on request (test only)."""

    name = "next_token"
    interrupt_at: int | None = None
    diverge_at: int | None = None

    def prepare(self, context, run, device):
        self.calls = 0

    def loss(self, model, batches):
        self.calls += 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        loss = model(**batches["train"]).loss
        if self.calls == self.diverge_at:
            loss = loss * float("nan")
        return loss, {}


class NextTokenPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(NextToken)


@pytest.fixture
def train_host(host):
    host.register(NextTokenPlugin, name="next-token")
    NextToken.interrupt_at = NextToken.diverge_at = None
    return host


def training_recipe(write_recipe, tmp_path, **stage):
    return write_recipe(
        data={
            "train": {"path": str(WIKITEXT_VALID), "samples": 8, "seq_len": 32},
            "evaluation": {"path": str(WIKITEXT_TEST), "samples": 2, "seq_len": 32},
        },
        stages=[
            {"method": "rtn", "bits": 4, "group_size": 64},
            {
                "method": "next_token",
                "steps": 4,
                "batch_size": 2,
                "lr": 1e-3,
                "log_every": 1,
                "latent_weights": "original",
                **stage,
            },
        ],
        output={"dir": str(tmp_path / "out")},
        evaluate=["perplexity"],
    )


def targeted_weights(context):
    return {
        name: module.weight.detach().clone() for name, module in context.model.named_modules() if name in context.layers
    }


def test_training_updates_weights_and_keeps_them_on_their_grids(train_host, write_recipe, tmp_path):
    context = apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    record = context.report.stages[1]
    assert record.details["steps"] == 4 and len(record.details["loss_curve"]) == 4
    assert record.details["constrained_layers"] == len(context.layers) > 0
    modules = dict(context.model.named_modules())
    assert record.layers == {name: {"trained_parameters": modules[name].weight.numel()} for name in context.layers}
    for name, state in context.layers.items():
        weight = modules[name].weight.detach()
        assert torch.equal(state.quant.fake_quantize(weight), weight), name
    first = check_recipe(train_host, training_recipe(write_recipe, tmp_path, steps=1), overwrite=True)
    untrained = apply_recipe(train_host, first, overwrite=True)
    changed = [n for n, w in targeted_weights(context).items() if not torch.equal(w, targeted_weights(untrained)[n])]
    assert changed, "training moved no weight to another grid point"
    assert not (tmp_path / "out.checkpoints").exists()


def test_straight_through_passes_gradients_unchanged_and_keeps_zeros():
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    grid = compute_grid(layer.weight.data, QuantScheme(bits=3, group_size=4), "layer")
    state = LayerState("test", quant=grid, sparsity="unstructured")
    zeros = layer.weight.detach() == 0
    with straight_through({"layer": layer}, {"layer": state}):
        x = torch.randn(5, 8)
        out = layer(x)
        assert torch.equal(layer.weight, grid.fake_quantize(layer.weight.detach()) * ~zeros)
        out.sum().backward()
        original = layer.parametrizations.weight.original
        assert torch.allclose(original.grad, torch.ones(5, 4).T @ x)
        with torch.no_grad():
            original.add_(torch.randn_like(original))
    weight = layer.weight.detach()
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "parametrizations")
    assert torch.all(weight[zeros] == 0)
    assert torch.equal(grid.fake_quantize(weight), weight)


def test_nan_loss_stops_naming_the_step_and_writes_nothing(train_host, write_recipe, tmp_path):
    NextToken.diverge_at = 3
    with pytest.raises(UserError, match="loss is nan at step 3"):
        apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    assert not (tmp_path / "out").exists()


def test_nan_loss_between_log_points_is_caught_at_the_next_checkpoint_naming_its_step(
    train_host, write_recipe, tmp_path
):
    NextToken.diverge_at = 2
    recipe = training_recipe(write_recipe, tmp_path, steps=8, log_every=4, checkpoint_every=3)
    with pytest.raises(UserError, match="loss is nan at step 2"):
        apply_recipe(train_host, check_recipe(train_host, recipe))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_interrupted_training_resumes_to_the_same_weights(train_host, write_recipe, tmp_path, capsys):
    recipe = training_recipe(write_recipe, tmp_path, checkpoint_every=2)
    straight = apply_recipe(train_host, check_recipe(train_host, recipe))
    expected = targeted_weights(straight)
    expected_curve = straight.report.stages[1].details["loss_curve"]
    (tmp_path / "out").rename(tmp_path / "first")

    NextToken.interrupt_at = 3
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt) as interrupt:
        apply_recipe(train_host, check_recipe(train_host, recipe))
    checkpoint = tmp_path / "out.checkpoints" / "2-next_token"
    assert f"stopping after this step; checkpoint at {checkpoint}" in capsys.readouterr().err
    assert str(interrupt.value) == (
        f"training checkpoint at {checkpoint} (step 3/4); continue with compress apply RECIPE --resume"
    )
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    assert not (tmp_path / "out").exists()

    NextToken.interrupt_at = None
    with pytest.raises(UserError, match="pass --resume"):
        apply_recipe(train_host, check_recipe(train_host, recipe))
    capsys.readouterr()
    resumed = apply_recipe(train_host, check_recipe(train_host, recipe), resume=True)
    assert "next_token: resuming from step 3/4" in capsys.readouterr().err
    assert resumed.report.stages[1].details["resumed_from_step"] == 3
    assert resumed.report.stages[1].details["loss_curve"] == expected_curve
    for name, weight in targeted_weights(resumed).items():
        assert torch.equal(weight, expected[name]), name
    assert not (tmp_path / "out.checkpoints").exists()


def test_resuming_with_a_changed_recipe_is_refused_naming_the_change(train_host, write_recipe, tmp_path):
    NextToken.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    NextToken.interrupt_at = None
    changed = training_recipe(write_recipe, tmp_path, lr=5e-4)
    with pytest.raises(UserError, match=r"recipe changed.*stages\[1\]\.lr: 0\.001 -> 0\.0005"):
        apply_recipe(train_host, check_recipe(train_host, changed), resume=True)


def test_resume_accepts_other_cadences_and_more_steps_but_not_fewer(train_host, write_recipe, tmp_path):
    straight = apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    expected = targeted_weights(straight)
    (tmp_path / "out").rename(tmp_path / "first")
    NextToken.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    NextToken.interrupt_at = None

    fewer = training_recipe(write_recipe, tmp_path, steps=1)
    with pytest.raises(UserError, match="checkpoint is at step 2, past this stage's steps: 1"):
        apply_recipe(train_host, check_recipe(train_host, fewer), resume=True)

    cadence = training_recipe(write_recipe, tmp_path, log_every=2, checkpoint_every=3, eval_every=1)
    resumed = apply_recipe(train_host, check_recipe(train_host, cadence), resume=True)
    assert resumed.report.stages[1].details["resumed_from_step"] == 2
    for name, weight in targeted_weights(resumed).items():
        assert torch.equal(weight, expected[name]), name

    (tmp_path / "out").rename(tmp_path / "second")
    NextToken.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path)))
    NextToken.interrupt_at = None
    longer = apply_recipe(
        train_host, check_recipe(train_host, training_recipe(write_recipe, tmp_path, steps=6)), resume=True
    )
    details = longer.report.stages[1].details
    assert details["resumed_from_step"] == 2 and details["steps"] == 6
    assert [step for step, _ in details["loss_curve"]] == [1, 2, 3, 4, 5, 6]


def test_held_out_losses_reach_the_console(train_host, write_recipe, tmp_path, capsys):
    recipe = training_recipe(write_recipe, tmp_path, eval_data="evaluation", eval_every=2)
    context = apply_recipe(train_host, check_recipe(train_host, recipe))
    err = capsys.readouterr().err
    for step, value in context.report.stages[1].details["eval_curve"]:
        assert f"next_token step {step}: eval_loss {value:.4g}" in err
    assert len(context.report.stages[1].details["eval_curve"]) == 2


def test_training_set_smaller_than_a_batch_fails_at_recipe_check(train_host, write_recipe, tmp_path):
    recipe = training_recipe(write_recipe, tmp_path, batch_size=16)
    with pytest.raises(UserError, match="8 samples, fewer than one batch"):
        check_recipe(train_host, recipe)


def test_two_process_ddp_gives_the_one_process_loss_curve(write_recipe, tmp_path):
    """The same global batch split over two processes (torchrun, gloo on the CPU) trains the
    same model: accelerate shards the batches, DDP averages the gradients."""
    import subprocess
    import sys

    curves, tokens = {}, {}
    for processes in (1, 2):
        recipe = write_recipe(
            data={"train": {"path": str(WIKITEXT_VALID), "samples": 16, "seq_len": 32}},
            stages=[
                {"method": "rtn", "bits": 3, "group_size": 64},
                {
                    "method": "distill",
                    "steps": 4,
                    "batch_size": 4,
                    "lr": 1e-4,
                    "log_every": 1,
                    "latent_weights": "original",
                },
            ],
            output={"dir": str(tmp_path / f"out{processes}")},
            evaluate=[],
            run={"device": "cpu"},
        )
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            if processes == 2
            else [sys.executable]
        )
        subprocess.run([*launcher, "-m", "compress", "apply", str(recipe)], check=True, capture_output=True)
        report = json.loads((tmp_path / f"out{processes}" / "report.json").read_text())
        details = report["stages"][1]["details"]
        assert details["devices"] == processes
        assert details["first_step_seconds"] > 0 and details["steady_tokens_per_second"] > 0
        curves[processes] = [loss for _, loss in details["loss_curve"]]
        tokens[processes] = details["tokens"]
    assert curves[2] == pytest.approx(curves[1], rel=1e-4)
    assert tokens[2] == tokens[1] == 4 * 4 * 32  # the global batches' tokens, counted once however many processes


def trained(train_host, write_recipe, tmp_path, **stage):
    """The context after the training recipe with ``stage``'s settings, and its loss curve."""
    recipe = training_recipe(write_recipe, tmp_path, **stage)
    context = apply_recipe(train_host, check_recipe(train_host, recipe, overwrite=True), overwrite=True)
    return context, [loss for _, loss in context.report.stages[1].details["loss_curve"]]


def test_gradient_checkpointing_gives_the_same_training(train_host, write_recipe, tmp_path):
    curves = []
    for checkpointing in (False, True):
        context, curve = trained(train_host, write_recipe, tmp_path, steps=2, gradient_checkpointing=checkpointing)
        curves.append(curve)
        assert not context.model.is_gradient_checkpointing
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_compiled_training_gives_the_eager_loss_curve(train_host, write_recipe, tmp_path):
    curves = []
    for compiled in (False, True):
        context, curve = trained(train_host, write_recipe, tmp_path, steps=3, compile=compiled)
        curves.append(curve)
        modules = dict(context.model.named_modules())
        for name, state in context.layers.items():
            assert torch.equal(state.quant.fake_quantize(modules[name].weight.detach()), modules[name].weight), name
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
