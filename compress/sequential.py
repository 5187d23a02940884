"""The engine's block loops: data-free and calibration stages, one transformer block at a
time on the compute device.

In ``sequential`` mode the model stays on the host; each block is moved to the device,
compressed and moved back, so device memory holds about one block plus its activations.
In ``whole`` mode the engine has moved the model to the device before the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn

from compress.blocks import (
    capture_block_inputs,
    capture_inputs_after_blocks,
    capture_inputs_before_blocks,
    find_blocks,
    hidden_states,
    reached_before_blocks,
    run_block,
    within,
)
from compress.context import Context, StageRun
from compress.devices import BlockMover, onloaded
from compress.errors import UserError
from compress.gradients import block_output_gradients
from compress.method import BlockWork


def _report_layer(context: Context, run: StageRun, name: str, details: dict[str, Any]) -> None:
    run.record.layers[name] = details


def compress_layers(
    context: Context,
    run: StageRun,
    compress_layer: Callable[[Context, str, nn.Module], dict[str, Any]],
) -> None:
    """Data-free stages: each targeted layer, block by block through the device."""
    blocks_name, blocks = find_blocks(context.model)
    device = context.device
    for index, block in enumerate(blocks):
        block_name = f"{blocks_name}.{index}"
        in_block = {n: m for n, m in run.targets.items() if within(n, block_name)}
        with onloaded(block, device) if context.sequential else _nothing():
            for name, module in in_block.items():
                _report_layer(context, run, name, compress_layer(context, name, module))
        context.host.hook.compress_block_done(
            context=context, stage=run.stage, block_name=block_name, block_index=index, num_blocks=len(blocks)
        )
    compress_layers_after_blocks(context, run, compress_layer)


def compress_layers_after_blocks(
    context: Context, run: StageRun, compress_layer: Callable[[Context, str, nn.Module], dict[str, Any]]
) -> None:
    """Data-free stages: each targeted layer outside the blocks, through the device."""
    blocks_name, _blocks = find_blocks(context.model)
    for name, module in run.targets.items():
        if not within(name, blocks_name):
            with onloaded(module, context.device) if context.sequential else _nothing():
                _report_layer(context, run, name, compress_layer(context, name, module))


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def compress_blocks(
    context: Context,
    run: StageRun,
    compress_block: Callable[[Context, BlockWork], dict[str, dict[str, Any]]],
) -> None:
    """Calibration stages: each block sees the outputs of the already-compressed blocks
    before it; then each target outside the blocks (``lm_head``, a classifier), in module
    order, sees what the compressed model feeds it (:func:`capture_inputs_after_blocks`),
    as a :class:`BlockWork` of its own whose ``block`` is the target itself. Targets outside
    the blocks that the forward pass reaches before them (a ViT's patch embedding) come
    first, in that order (:func:`compress_before_blocks`), so the blocks see their output.

    The method's ``needs_original_inputs`` adds the stream the model as it was when the
    stage started produces (``BlockWork.original_inputs``), its ``needs_output_gradients``
    the gradients of its ``output_loss`` (``BlockWork.output_gradients``, from
    :func:`block_output_gradients` before any block changes).

    With the method's ``prefetches_blocks`` (sequential mode, CUDA) the next block's weights
    travel to the device while a block is compressed, and a block's weights travel back while
    the next one runs (:class:`BlockMover`): when ``compress_block_done`` fires, the block's
    parameters may still be on the device, with their final values; all are on the host
    before the targets outside the blocks are calibrated.
    """
    model = context.model
    method = run.method
    blocks_name, blocks = find_blocks(model)
    device = context.device
    samples = context.data("calibration")
    gradients = None
    if method.needs_output_gradients:
        gradients = block_output_gradients(model, samples, partial(method.output_loss, context), device)
    outside = {n: m for n, m in run.targets.items() if not within(n, blocks_name)}
    leading = reached_before_blocks(model, outside, samples[0], device) if outside and samples else {}
    original = None
    if leading:
        if method.needs_original_inputs:  # before the leading targets change
            original = capture_block_inputs(model, blocks, blocks_name, samples, device)
        compress_before_blocks(context, run, compress_block, leading)
    inputs = capture_block_inputs(model, blocks, blocks_name, samples, device)
    if method.needs_original_inputs and original is None:
        original = inputs
    returns_tuple = False
    with BlockMover(device, enabled=context.sequential and method.prefetches_blocks()) as mover:
        for index, block in enumerate(blocks):
            block_name = f"{blocks_name}.{index}"
            in_block = {n: m for n, m in run.targets.items() if within(n, block_name)}
            if index + 1 < len(blocks):
                mover.prefetch(blocks[index + 1])
            with mover.onloaded(block) if context.sequential else _nothing():
                # the original stream's next step runs before the block changes, into new buffers
                original_next = None if original is None else run_block(block, original, device, consume=False)[0]
                block_gradients = None if gradients is None else gradients[index]
                work = BlockWork(block_name, index, block, in_block, inputs, device, original, block_gradients)
                for name, details in compress_block(context, work).items():
                    _report_layer(context, run, name, details)
                inputs, returns_tuple = run_block(block, inputs, device)
            original = original_next
            if gradients is not None:
                gradients[index] = []
            context.host.hook.compress_block_done(
                context=context, stage=run.stage, block_name=block_name, block_index=index, num_blocks=len(blocks)
            )
    compress_after_blocks(context, run, compress_block, inputs, original, returns_tuple, done=leading)


def compress_before_blocks(
    context: Context,
    run: StageRun,
    compress_block: Callable[[Context, BlockWork], dict[str, dict[str, Any]]],
    leading: dict[str, nn.Module],
) -> None:
    """The calibration of the ``leading`` targets (outside the blocks, reached before them), in
    the order the forward pass reaches them, each a :class:`BlockWork` whose ``block`` is the
    target and whose ``index`` counts back from -1 (-2, -1 for two); its inputs are what the
    model, with the earlier ones compressed, feeds it (:func:`capture_inputs_before_blocks`)."""
    model, device = context.model, context.device
    samples = context.data("calibration")
    originals = {}
    if run.method.needs_original_inputs:  # the stage's starting model, before any of them changes
        originals = {name: capture_inputs_before_blocks(model, m, samples, device) for name, m in leading.items()}
    for position, (name, module) in enumerate(leading.items()):
        captured = capture_inputs_before_blocks(model, module, samples, device)
        with onloaded(module, device) if context.sequential else _nothing():
            work = BlockWork(
                name, position - len(leading), module, {name: module}, captured, device, originals.get(name)
            )
            for layer, details in compress_block(context, work).items():
                _report_layer(context, run, layer, details)


def compress_after_blocks(
    context: Context,
    run: StageRun,
    compress_block: Callable[[Context, BlockWork], dict[str, dict[str, Any]]],
    inputs: list[tuple[tuple, dict]],
    original: list[tuple[tuple, dict]] | None,
    returns_tuple: bool,
    done: Collection[str] = (),
) -> None:
    """The calibration of the targets outside the blocks, in module order, once every block is
    compressed: ``inputs`` (and ``original``, for ``needs_original_inputs``) are what the last
    block outputs, ``returns_tuple`` whether the blocks return tuples (:func:`run_block`);
    targets named in ``done`` (compressed before the blocks) are skipped."""
    model = context.model
    blocks_name, blocks = find_blocks(model)
    device = context.device
    samples = context.data("calibration")
    outside = {n: m for n, m in run.targets.items() if not within(n, blocks_name) and n not in done}
    if not outside:
        return
    finals = [hidden_states(args, kwargs) for args, kwargs in inputs]
    originals = {}
    if original is not None:  # before any target here changes: the stage's starting model
        original_finals = [hidden_states(args, kwargs) for args, kwargs in original]
        for name, module in outside.items():
            originals[name] = capture_inputs_after_blocks(
                model, module, samples, original_finals, returns_tuple, device
            )
    for position, (name, module) in enumerate(outside.items()):
        captured = capture_inputs_after_blocks(model, module, samples, finals, returns_tuple, device)
        if len(captured) < len(samples):
            raise UserError("the model's forward pass does not reach this layer; it cannot be calibrated", name)
        with onloaded(module, device) if context.sequential else _nothing():
            work = BlockWork(
                name, len(blocks) + position, module, {name: module}, captured, device, originals.get(name)
            )
            for layer, details in compress_block(context, work).items():
                _report_layer(context, run, layer, details)
