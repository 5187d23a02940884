"""The gradient of a model's output loss with respect to each block's output: for the model
as it is, one block on the device at a time (:func:`block_output_gradients`), or at one
block's output when that block outputs given values (:func:`gradients_after_block`), what a
Fisher-weighted block reconstruction such as FIMA-Q needs; the model's output when a block
(:func:`after_block`) or a module before the blocks (:func:`after_module`) outputs given values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from compress.blocks import (
    block_outputs,
    device_batch,
    find_blocks,
    forward,
    hidden_states,
    onloaded_on_use,
    skipping_blocks,
    with_hidden_states,
)
from compress.data import Batch, Sample, collate
from compress.devices import move, on_device, onloaded

OutputLoss = Callable[[Any, Batch, int], torch.Tensor]
"""A scalar loss of one sample from the model's output, the sample's batch of one (on the
device) and the sample's position in the sample list."""


def block_output_gradients(
    model: nn.Module, samples: list[Sample], loss: OutputLoss, device: torch.device
) -> list[list[torch.Tensor]]:
    """``result[b][s]``: the gradient of ``loss`` on sample ``s`` with respect to the output
    (hidden states) of block ``b``, on the host, in the hidden states' dtype.

    Block by block, one block on ``device`` at a time (``model`` may stay on the host): a
    forward pass keeps each block's inputs on the host, the loss is differentiated at the
    last block's output through the modules after the blocks (:func:`skipping_blocks`),
    then each block from the last to the second is run again with gradients and
    back-propagates the gradient of its output to its input, the output of the block
    before. Samples are taken one at a time, so each gradient is that sample's own (what
    a Fisher estimate needs), and no block's weights receive gradients. Host memory: the
    inputs of every block and the gradients, about twice ``blocks x tokens x hidden``
    values. The model should be in eval mode (dropout would differ between the passes).
    """
    stored, returns_tuple = block_outputs(model, samples, device, every=True)
    _, blocks = find_blocks(model)
    gradients: list[list[torch.Tensor]] = [[] for _ in blocks]
    with skipping_blocks(model, device, returns_tuple) as run, torch.enable_grad():
        for position, (sample, (args, kwargs)) in enumerate(zip(samples, stored[-1])):
            batch = device_batch(sample, device)
            hidden = hidden_states(args, kwargs).to(device).requires_grad_()
            (gradient,) = torch.autograd.grad(loss(run(batch, hidden), batch, position), hidden)
            gradients[-1].append(gradient.to("cpu"))
    for index in range(len(blocks) - 1, 0, -1):
        block = blocks[index]
        with onloaded(block, device), torch.enable_grad():
            for (args, kwargs), after in zip(on_device(stored[index - 1], device), gradients[index]):
                hidden = hidden_states(args, kwargs).detach().requires_grad_()
                args, kwargs = with_hidden_states(args, kwargs, hidden)
                output = block(*args, **kwargs)
                output = output[0] if isinstance(output, tuple) else output
                (gradient,) = torch.autograd.grad(output, hidden, after.to(device))
                gradients[index - 1].append(gradient.to("cpu"))
        stored[index - 1] = []  # frees the block's inputs
    return gradients


ChunkLoss = Callable[[Any, Batch, range], torch.Tensor]
"""A scalar loss of several samples from the model's output, their batch (on the device) and
their positions in the sample list; its gradient for each sample is that sample's own when it
sums per-sample losses."""


@contextmanager
def after_block(
    model: nn.Module, index: int, device: torch.device, returns_tuple: bool
) -> Iterator[Callable[[Batch, torch.Tensor], Any]]:
    """Inside, ``run(batch, hidden)`` is the model's output on ``batch`` when block ``index``
    outputs ``hidden`` (on ``device``), whatever its weights and inputs: the blocks up to
    ``index`` are skipped (:func:`skipping_blocks` with ``count``), the later blocks and the
    modules after them compute as the model holds them now, on ``device``, the later blocks
    all there together while inside. Grad mode is the caller's. ``returns_tuple``: the blocks
    return tuples (hidden states first).
    """
    _, blocks = find_blocks(model)
    with ExitStack() as stack:
        for block in blocks[index + 1 :]:
            stack.enter_context(onloaded(block, device))
        yield stack.enter_context(skipping_blocks(model, device, returns_tuple, count=index + 1))


@contextmanager
def after_module(
    model: nn.Module, module: nn.Module, device: torch.device
) -> Iterator[Callable[[Batch, torch.Tensor], Any]]:
    """Inside, ``run(batch, hidden)`` is the model's output on ``batch`` when ``module``, outside
    the blocks (a ViT's patch embedding), outputs ``hidden`` (on ``device``) instead of what it
    computes: the whole model runs on ``device``, every block there together while inside, the
    modules outside them onloaded as :func:`compress.blocks.onloaded_on_use` does. What
    :func:`after_block` is to a block; grad mode is the caller's.
    """
    blocks_name, blocks = find_blocks(model)
    current: list[torch.Tensor] = []

    def run(batch: Batch, hidden: torch.Tensor) -> Any:
        current[:] = [hidden]
        return forward(model, batch)

    with ExitStack() as stack:
        for block in blocks:
            stack.enter_context(onloaded(block, device))
        stack.enter_context(onloaded_on_use(model, blocks_name, device))
        stack.callback(current.clear)
        stack.callback(module.register_forward_hook(lambda *_: current[0]).remove)
        yield run


def chunks(samples: list[Sample], outputs: list[torch.Tensor], batch_size: int) -> Iterator[range]:
    """Positions of ``samples`` in runs of ``batch_size`` when their ``outputs`` have one shape, else one by one."""
    step = batch_size if len({tuple(output.shape) for output in outputs}) == 1 else 1
    for start in range(0, len(samples), step):
        yield range(start, min(start + step, len(samples)))


def gradients_after_block(
    model: nn.Module,
    index: int,
    outputs: list[torch.Tensor],
    samples: list[Sample],
    loss: ChunkLoss,
    device: torch.device,
    returns_tuple: bool,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """Per sample, the gradient of ``loss`` with respect to the output of block ``index`` when
    that block outputs ``outputs[s]``, through the rest of the model (:func:`after_block`);
    on the host, one tensor of the output's shape per sample.

    What a reconstruction needs when it perturbs one block and asks how the model's output
    loss sees the perturbation (FIMA-Q's Fisher refresh). Unlike :func:`block_output_gradients`,
    which holds one block on the device, the blocks after ``index`` are there together.
    Samples run ``batch_size`` at a time (:func:`chunks`). The model should be in eval mode.
    """
    gradients: list[torch.Tensor] = []
    with after_block(model, index, device, returns_tuple) as run, torch.enable_grad():
        for chunk in chunks(samples, outputs, batch_size):
            batch = move(collate([samples[position] for position in chunk], 0), device)
            hidden = torch.cat([outputs[position] for position in chunk]).to(device).requires_grad_()
            (gradient,) = torch.autograd.grad(loss(run(batch, hidden), batch, chunk), hidden)
            gradients.extend(gradient.detach().to("cpu").split(1))
    return gradients
