"""The model's repeated blocks, and data run through them one block on the device at a time.

The engine's calibration loop (:mod:`compress.sequential`), the gradient pass
(:mod:`compress.gradients`) and the scorer (:mod:`compress.scoring`) share these: the
first block's inputs are captured once, each block then runs over the cached inputs
(kept on the host) and hands its outputs to the next, and the modules after the blocks
(final norm, head) run on the last block's outputs with the blocks skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from compress.data import Batch, Sample, collate, model_inputs
from compress.devices import host_copy, model_device, move, on_device, onloaded, pinned, settle, to_host


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the largest ModuleList whose children share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks")
    return best


def _offload(hidden: torch.Tensor, buffer: torch.Tensor | None, stream: torch.cuda.Stream) -> torch.Tensor:
    """``hidden`` copied into page-locked ``buffer`` (a new one when None) on ``stream``, after the compute stream made it."""
    stream.wait_stream(torch.cuda.current_stream(hidden.device))
    hidden.record_stream(stream)  # the compute stream may free it before the copy runs
    with torch.cuda.stream(stream):
        return host_copy(hidden, buffer)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def outside_blocks(model: nn.Module, blocks_name: str) -> list[nn.Module]:
    """The largest subtrees of ``model`` that hold parameters or buffers and no block."""

    def is_ancestor(name: str) -> bool:
        return name == "" or within(blocks_name, name)

    return [
        module
        for name, module in model.named_modules()
        if not is_ancestor(name)
        and not within(name, blocks_name)
        and is_ancestor(name.rpartition(".")[0])
        and any(True for _ in itertools.chain(module.parameters(), module.buffers()))
    ]


def with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's arguments with its hidden states (first argument) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden states (its first argument)."""
    return args[0] if args else kwargs["hidden_states"]


class _StopForward(Exception):
    pass


@contextmanager
def stopping_at(module: nn.Module, device: torch.device) -> Iterator[list[tuple[tuple, dict]]]:
    """Inside, a forward pass that reaches ``module`` stops there, raising ``_StopForward``,
    and the yielded list gains the arguments ``module`` was called with, on the host
    (page-locked when ``device`` is CUDA; settled when the block ends)."""
    captured: list[tuple[tuple, dict]] = []
    pin = pinned(device)

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((to_host(args, pin), to_host(kwargs, pin)))
        raise _StopForward

    handle = module.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
        settle(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, blocks_name: str, samples: list[Sample], device: torch.device
) -> list[tuple[tuple, dict]]:
    """The arguments the first block receives for each sample, kept on the host (page-locked
    when ``device`` is CUDA, see :func:`pinned`).

    Each sample runs alone (a batch of one: :func:`compress.data.model_inputs`, so token ids
    and pixel values both work). Everything outside the blocks (embeddings, rotary tables)
    runs on ``device``; the forward pass stops at the first block.
    """
    return _inputs_up_to(model, blocks[0], blocks_name, samples, device)


@torch.no_grad()
def capture_inputs_before_blocks(
    model: nn.Module, module: nn.Module, samples: list[Sample], device: torch.device
) -> list[tuple[tuple, dict]]:
    """The arguments ``module``, which the forward pass reaches before the first block (a ViT's
    patch embedding, see :func:`reached_before_blocks`), receives for each sample, on the host,
    as :func:`capture_block_inputs` captures the first block's."""
    return _inputs_up_to(model, module, find_blocks(model)[0], samples, device)


def _inputs_up_to(
    model: nn.Module, module: nn.Module, blocks_name: str, samples: list[Sample], device: torch.device
) -> list[tuple[tuple, dict]]:
    with stopping_at(module, device) as captured, onloaded_on_use(model, blocks_name, device):
        for sample in samples:
            with suppress(_StopForward):
                forward(model, device_batch(sample, device))
    return captured


@torch.no_grad()
def reached_before_blocks(
    model: nn.Module, modules: dict[str, nn.Module], sample: Sample, device: torch.device
) -> dict[str, nn.Module]:
    """Those of ``modules`` (outside the blocks) that ``sample``'s forward pass reaches before
    the first block, in the order it reaches them."""
    blocks_name, blocks = find_blocks(model)
    reached: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: reached.append(name)) for name, module in modules.items()
    ]
    try:
        _inputs_up_to(model, blocks[0], blocks_name, [sample], device)
    finally:
        for handle in handles:
            handle.remove()
    return {name: modules[name] for name in dict.fromkeys(reached)}


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: list[tuple[tuple, dict]], device: torch.device, consume: bool = True
) -> tuple[list[tuple[tuple, dict]], bool]:
    """Feed each cached input through ``block``; return the next block's inputs (on the host),
    and whether the block returns a tuple (hidden states first) rather than a tensor.

    On CUDA each output is copied to the host on a side stream, overlapping the next
    sample's compute. With ``consume`` it goes into its input's page-locked hidden-state
    buffer, which the next block reuses (``inputs`` are overwritten); else into a new one.
    """
    saver = torch.cuda.Stream(device) if pinned(device) else None
    next_inputs = []
    returns_tuple = False
    for (args, kwargs), (device_args, device_kwargs) in zip(inputs, on_device(inputs, device)):
        output = block(*device_args, **device_kwargs)
        returns_tuple = isinstance(output, tuple)
        hidden = output[0] if returns_tuple else output
        if saver is None:
            host = hidden.to("cpu")
        else:
            host = _offload(hidden, hidden_states(args, kwargs) if consume else None, saver)
        next_inputs.append(with_hidden_states(args, kwargs, host))
    settle(device)
    return next_inputs, returns_tuple


def block_outputs(
    model: nn.Module, samples: list[Sample], device: torch.device, every: bool = False
) -> tuple[list[list[tuple[tuple, dict]]], bool]:
    """Run ``samples`` through ``model``'s blocks, each block on ``device`` only while it runs.

    Returns the blocks' outputs, as the next block's arguments on the host (every block's
    with ``every``, else only the last block's, in a list of one), and whether the blocks
    return tuples (see :func:`run_block`).
    """
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, blocks_name, samples, device)
    kept: list[list[tuple[tuple, dict]]] = []
    returns_tuple = False
    for index, block in enumerate(blocks):
        with onloaded(block, device):
            inputs, returns_tuple = run_block(block, inputs, device, consume=not every or index == 0)
        if every or index == len(blocks) - 1:
            kept.append(inputs)
    return kept, returns_tuple


@contextmanager
def onloaded_on_use(model: nn.Module, blocks_name: str, device: torch.device) -> Iterator[None]:
    """Inside, each module outside the blocks goes to ``device`` when a forward pass first
    reaches it, and all of them go back where they were at the end: a pass that stops early
    (at the first block) never moves the modules after it (final norm, lm_head)."""
    homes: list[tuple[nn.Module, torch.device]] = []

    def onload(module: nn.Module, _args: tuple) -> None:
        if not any(module is seen for seen, _ in homes):
            homes.append((module, model_device(module)))
            module.to(device)

    handles = [module.register_forward_pre_hook(onload) for module in outside_blocks(model, blocks_name)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, home in homes:
            module.to(home)


def forward(model: nn.Module, batch: Batch) -> Any:
    """``model``'s forward pass on ``batch`` (its :func:`compress.data.model_inputs`), with no key-value cache."""
    no_cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else {}
    return model(**model_inputs(batch), **no_cache)


def device_batch(sample: Sample, device: torch.device) -> Batch:
    """``sample`` as a batch of one on ``device`` (one sample: nothing is padded)."""
    return move(collate([sample], 0), device)


@contextmanager
def skipping_blocks(
    model: nn.Module, device: torch.device, returns_tuple: bool, count: int | None = None
) -> Iterator[Callable[[Batch, torch.Tensor], Any]]:
    """The model's forward pass with its blocks skipped: inside, ``run(batch, hidden)`` runs
    ``model`` on ``batch`` with every block returning ``hidden`` (on ``device``), as if the
    last block had output it, and returns the model's output.

    So only the modules outside the blocks compute: those before them (embeddings, whose
    result the blocks ignore) and those after (final norm, lm_head or classifier), on
    ``device``, onloaded as :func:`onloaded_on_use` does. Grad mode is the caller's: under
    ``torch.enable_grad()`` the output is differentiable with respect to ``hidden``.
    ``returns_tuple`` is what :func:`run_block` said of the real blocks.

    With ``count``, only the first ``count`` blocks are skipped: ``hidden`` is the output of
    block ``count - 1`` and the blocks after it compute (they must be on ``device``).
    """
    blocks_name, blocks = find_blocks(model)
    blocks = blocks[:count]
    current: list[torch.Tensor] = []

    def replay(*_args: Any, **_kwargs: Any) -> Any:
        return (current[0],) if returns_tuple else current[0]

    def run(batch: Batch, hidden: torch.Tensor) -> Any:
        current[:] = [hidden]
        return forward(model, batch)

    own_forwards = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = replay
    try:
        with onloaded_on_use(model, blocks_name, device):
            yield run
    finally:
        current.clear()
        for block, own in zip(blocks, own_forwards):
            if own is None:
                del block.forward
            else:
                block.forward = own


def stack_inputs(entries: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """One batch from cached block inputs (each of one sample): their hidden states concatenated
    along the batch; every other argument must be the same in all of them (a ViT block has
    none; a Llama block's position embeddings are the same for inputs of one length).

    Raises ValueError when they differ (inputs of different lengths, per-sample masks).
    """
    first_args, first_kwargs = entries[0]
    for args, kwargs in entries[1:]:
        rest = with_hidden_states(args, kwargs, hidden_states(first_args, first_kwargs))
        if not _same(rest, (first_args, first_kwargs)):
            raise ValueError("these block inputs differ in more than their hidden states: they cannot form one batch")
    hidden = torch.cat([hidden_states(args, kwargs) for args, kwargs in entries])
    return with_hidden_states(first_args, first_kwargs, hidden)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and (a is b or torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@torch.no_grad()
def capture_inputs_after_blocks(
    model: nn.Module,
    module: nn.Module,
    samples: list[Sample],
    finals: list[torch.Tensor],
    returns_tuple: bool,
    device: torch.device,
) -> list[tuple[tuple, dict]]:
    """The arguments ``module``, outside the blocks, receives for each sample when the last
    block outputs ``finals`` (one hidden-state tensor per sample), on the host; the forward
    pass stops there. Samples whose forward pass never reaches ``module`` add nothing."""
    with stopping_at(module, device) as captured, skipping_blocks(model, device, returns_tuple) as run:
        for sample, final in zip(samples, finals):
            with suppress(_StopForward):
                run(device_batch(sample, device), final.to(device))
    return captured
