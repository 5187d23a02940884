"""FIMA-Q's Fisher refresh streamed in chunks (fisher.py) equals the unbounded one, computed
as FIMA-Q's code does: every sample's gradient and output kept, the targets from the
full-precision model stored once; at a block and at the patch embedding (after_module)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import pytest
import torch
from compress_fimaq.fisher import fisher_rows
from torch import nn

from compress.api import after_block, after_module, collate
from tests.models import tiny_vit_config

TEMPERATURE = 20.0


@pytest.fixture(scope="module")
def model_and_samples():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(num_labels=5)).eval()
    samples = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.tensor(i % 5)} for i in range(7)]
    return model, samples


def perturbed(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its weights moved, standing for the block under quantization."""
    torch.manual_seed(1)
    changed = copy.deepcopy(module)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return changed


def unbounded(model, module, replacement, pixels):
    """All samples at once: the module's output replaced by ``replacement(its input)`` through a
    hook, the full-precision targets from the untouched model; per-sample gradients kept."""
    with torch.no_grad():
        targets = torch.softmax(model(pixel_values=pixels).logits / TEMPERATURE, -1)
    kept = {}

    def swap(_module, args, output):
        quantized = replacement(args[0])
        kept["fp"], kept["q"] = (output[0] if isinstance(output, tuple) else output), quantized
        quantized = quantized.detach().requires_grad_()
        kept["hidden"] = quantized
        return (quantized, *output[1:]) if isinstance(output, tuple) else quantized

    handle = module.register_forward_hook(swap)
    try:
        log_probs = torch.log_softmax(model(pixel_values=pixels).logits / TEMPERATURE, -1)
    finally:
        handle.remove()
    loss = torch.nn.functional.kl_div(log_probs, targets, reduction="sum")
    (gradients,) = torch.autograd.grad(loss, kept["hidden"])
    samples = pixels.shape[0]
    return (
        gradients.abs().reshape(samples, -1).mean(0),
        (kept["q"] - kept["fp"]).abs().reshape(samples, -1).mean(0),
    )


def streamed(after, block, fp_inputs, samples, chunk, seen):
    with torch.no_grad():
        fp_outputs = torch.cat([forward_of(block[0], fp_inputs[i : i + 1]) for i in range(len(samples))])

    @contextmanager
    def counting():
        with after() as run:

            def counted(batch, hidden):
                seen.append(hidden.shape[0])
                return run(batch, hidden)

            yield counted

    return fisher_rows(
        counting,
        lambda x: forward_of(block[1], x),
        fp_inputs,
        fp_outputs,
        lambda part: collate(samples[part], 0),
        TEMPERATURE,
        chunk,
    )


def forward_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    output = module(x)
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_a_blocks_streamed_refresh_equals_the_unbounded_one(model_and_samples, chunk):
    model, samples = model_and_samples
    pixels = torch.stack([sample["pixel_values"] for sample in samples])
    block = model.vit.layers[0]
    changed = perturbed(block)
    expected = unbounded(model, block, lambda x: forward_of(changed, x), pixels)
    with torch.no_grad():
        fp_inputs = model.vit.embeddings(pixels)
    seen: list[int] = []
    got = streamed(
        partial(after_block, model, 0, torch.device("cpu"), False), (block, changed), fp_inputs, samples, chunk, seen
    )
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    assert max(seen) <= chunk and sum(seen) == 2 * len(samples)  # targets and gradients: every sample, once each


def test_the_patch_embeddings_streamed_refresh_equals_the_unbounded_one(model_and_samples):
    model, samples = model_and_samples
    pixels = torch.stack([sample["pixel_values"] for sample in samples])
    projection = model.vit.embeddings.patch_embeddings.projection
    changed = perturbed(projection)
    expected = unbounded(model, projection, changed, pixels)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    seen: list[int] = []
    after = partial(after_module, model, projection, torch.device("cpu"))
    got = streamed(after, (projection, changed), pixels, samples, 4, seen)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    assert seen == [4, 4, 3, 3]
    with torch.no_grad():  # the hook is gone: the model computes its own patch embedding again
        assert torch.equal(model(pixel_values=pixels).logits, before)
    assert not projection._forward_hooks
