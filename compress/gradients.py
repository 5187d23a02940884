"""The gradient of a model's output loss with respect to each block's output, one block on
the device at a time (what a Fisher-weighted block reconstruction such as FIMA-Q needs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.blocks import block_outputs, device_batch, find_blocks, hidden_states, skipping_blocks, with_hidden_states
from compress.data import Batch, Sample
from compress.devices import on_device, onloaded

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
