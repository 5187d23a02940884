"""FIMA-Q's Fisher refresh (``utils/block_recon.py``, ``new_fisher_ro``), streamed over the
calibration samples so that its memory does not grow with their number.

The code runs the whole reconstruction set (1024 images) through the model with only the
current block quantized, keeps the gradient of ``KL(softmax(f(x)/T) || softmax(f̂(x)/T))`` at
the block output for every sample, and every sample's block output, next to every sample's
full-precision probabilities (computed once); then one row of ``G`` is the mean over samples
of ``|∂KL/∂ẑ|`` and one row of ``D`` the mean of ``|ẑ - z|``.

Here the gradient row is a sum accumulated chunk by chunk (float32) and divided at the end,
and a chunk's full-precision probabilities are recomputed from the block's full-precision
outputs through the rest of the model, which is the model the code's targets come from (the
blocks after the one under reconstruction, and the modules after the blocks, are not changed
yet), so no target and no per-sample gradient is stored. Memory beyond what the
reconstruction holds (the block's inputs and full-precision outputs): the block's current
outputs for the calibration set (as the code's), the rest of the model's activations for one
chunk's backward pass, its logits twice, and a row of one sample's output size; the code's
per-sample gradients (as large as the outputs) and targets (samples x tokens x vocabulary for
a language model) are not kept. The cost is one more forward pass of the rest of the model
per chunk, without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from compress.api import Batch

Run = Callable[[Batch, torch.Tensor], Any]
"""The model's output on a batch when the block under reconstruction outputs the given tensor."""


def kl_to(target: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``Σ KL(target || softmax(logits / T))`` over every sample (and token) of the chunk."""
    log_probs = torch.log_softmax(logits.float() / temperature, -1)
    return (target * (target.clamp(min=1e-30).log() - log_probs)).sum()


def fisher_rows(
    after: Callable[[], AbstractContextManager[Run]],
    block: Callable[[torch.Tensor], torch.Tensor],
    fp_inputs: torch.Tensor,
    fp_outputs: torch.Tensor,
    batch: Callable[[slice], Batch],
    temperature: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One refresh: the mean over samples of ``|∂KL/∂ẑ|`` and of ``|ẑ - z|``, flattened, with
    ``ẑ = block(fp_inputs)`` (the block as it is now) and ``z = fp_outputs``. Inside ``after()``
    (``compress.api.after_block`` or ``after_module``) the model runs with the block's output
    replaced, so the block itself runs first, outside it. ``batch(part)`` is the model's batch
    of those samples, on the device; at most ``chunk`` samples go through the model at a time."""
    samples = fp_inputs.shape[0]
    parts = [slice(start, min(start + chunk, samples)) for start in range(0, samples, chunk)]
    with torch.no_grad():
        quantized = torch.cat([block(fp_inputs[part]) for part in parts])
    difference_row = (quantized - fp_outputs).abs().float().sum(0)
    gradient_sum = torch.zeros_like(difference_row)
    with after() as run:
        for part in parts:
            inputs = batch(part)
            with torch.no_grad():
                target = torch.softmax(run(inputs, fp_outputs[part]).logits.float() / temperature, -1)
            hidden = quantized[part].detach().requires_grad_()
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(kl_to(target, run(inputs, hidden).logits, temperature), hidden)
            gradient_sum += gradient.abs().float().sum(0)
    return (gradient_sum / samples).flatten(), (difference_row / samples).flatten()
