"""The block-output gradient pass: equal to autograd through the whole model, called
directly and through ``BlockWork.output_gradients`` in both run modes."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compress import hookimpl
from compress.gradients import block_output_gradients
from compress.method import BlockMethod


def next_token_loss(output, batch, _index: int) -> torch.Tensor:
    """Cross-entropy of each position's next token with the batch's own labels."""
    return F.cross_entropy(output.logits[0, :-1].float(), batch["labels"][0, 1:])


def autograd_gradients(model, samples, loss) -> list[list[torch.Tensor]]:
    """``[block][sample]``: dL/d(block output) by one backward pass through the whole model per sample."""
    blocks = model.model.layers
    gradients: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[torch.Tensor] = []

    def keep(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        outputs.append(hidden)

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        for index, sample in enumerate(samples):
            outputs.clear()
            batch = {key: value.unsqueeze(0) for key, value in sample.items()}
            loss(model(input_ids=batch["input_ids"]), batch, index).backward()
            for block_index, hidden in enumerate(outputs):
                gradients[block_index].append(hidden.grad[0:1].clone())
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad()
    return gradients


def text_samples(count: int, length: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 250, (length,), generator=generator) for _ in range(count)]
    return [{"input_ids": sequence, "labels": sequence.clone()} for sequence in ids]


def test_block_output_gradients_equal_autograd_through_the_whole_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = text_samples(3, 24)
    streamed = block_output_gradients(model, samples, next_token_loss, torch.device("cpu"))
    expected = autograd_gradients(model, samples, next_token_loss)
    assert len(streamed) == 2 and all(len(per_block) == 3 for per_block in streamed)
    for per_block, expected_block in zip(streamed, expected):
        for gradient, reference in zip(per_block, expected_block):
            assert gradient.shape == (1, 24, 64) and gradient.abs().sum() > 0
            torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-7)
    assert all(parameter.grad is None for parameter in model.parameters())  # no weight took a gradient


class RecordGradients(BlockMethod):
    """Test method: records the output gradients the engine hands each block, changes nothing."""

    name = "record-gradients"
    needs_output_gradients = True
    seen: ClassVar[dict[int, list[torch.Tensor]]] = {}

    def output_loss(self, context, output, batch, index):
        return next_token_loss(output, batch, index)

    def compress_block(self, context, work):
        RecordGradients.seen[work.index] = work.output_gradients
        return {}


class GradientsPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(RecordGradients)


@pytest.mark.parametrize("mode", ["sequential", "whole"])
def test_block_work_carries_the_output_gradients_in_both_modes(register_plugin, run_recipe, mode):
    register_plugin(GradientsPlugin, name="record-gradients")
    RecordGradients.seen.clear()
    result = run_recipe({"stages": [{"method": "record-gradients"}], "run": {"mode": mode, "device": "cpu"}})
    context = result.context
    samples = context.data("calibration")
    expected = autograd_gradients(context.reference_model(), samples, next_token_loss)
    assert sorted(RecordGradients.seen) == [0, 1]
    for index, gradients in RecordGradients.seen.items():
        assert len(gradients) == len(samples)
        for gradient, reference in zip(gradients, expected[index]):
            torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-7)


def test_a_method_asking_for_gradients_without_a_loss_is_told_so(register_plugin, run_recipe):
    class NoLoss(BlockMethod):
        """Test method: asks for gradients, defines no loss."""

        name = "no-loss"
        needs_output_gradients = True

    class Plugin:
        @staticmethod
        @hookimpl
        def compress_register_methods(register):
            register(NoLoss)

    register_plugin(Plugin, name="no-loss")
    with pytest.raises(NotImplementedError, match="'no-loss' sets needs_output_gradients but has no output_loss"):
        run_recipe({"stages": [{"method": "no-loss"}]})


def test_the_documented_example_runs_as_printed(register_plugin, run_recipe, tmp_path):
    """docs/plugins.md's ``fisher_demo``, taken from the page and run on the tiny model."""
    import importlib.util
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    (source,) = [block for block in blocks if "class FisherDemo" in block]
    path = tmp_path / "fisher_demo.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fisher_demo", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    class Plugin:
        @staticmethod
        @hookimpl
        def compress_register_methods(register):
            register(example.FisherDemo)

    register_plugin(Plugin, name="fisher-demo")
    layers = run_recipe({"stages": [{"method": "fisher_demo"}]}).context.report.stages[0].layers
    assert len(layers) == 14 and all(details["fisher_mean"] > 0 for details in layers.values())
