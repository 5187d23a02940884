"""Moving tensors and modules between the host and the compute device.

The engine streams blocks through the device with these, and methods use them for what
they move themselves (a teacher model, cached block inputs); plugins reach them through
:mod:`compress.api`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def move(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    return _map(value, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _map(value: Any, change: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(item, change) for item in value)
    if isinstance(value, dict):
        return {key: _map(item, change) for key, item in value.items()}
    return value


def pinned(device: torch.device) -> bool:
    """Whether host copies of activations are page-locked: only when computing on CUDA."""
    return device.type == "cuda"


def to_host(value: Any, pin: bool) -> Any:
    """``value`` with every tensor copied to the host; with ``pin``, into page-locked memory
    without waiting for the copy (call :func:`settle` before the host reads it)."""
    return _map(value, lambda tensor: host_copy(tensor, None) if pin else tensor.to("cpu"))


def host_copy(tensor: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """``tensor`` copied (asynchronously) into the page-locked ``buffer``, or a new one if it does not fit."""
    fits = buffer is not None and buffer.is_pinned() and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
    if not fits:
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return buffer.copy_(tensor, non_blocking=True)


def settle(device: torch.device) -> None:
    """Wait for ``device``'s queued work on every stream, so asynchronous copies to the host have landed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of ``device`` that :func:`on_device` copies on. One for the process:
    the caching allocator keeps freed memory per stream, and a new stream per pass (drawn in
    turn from a pool of 32) would hold a cache of its own, so the reserve would grow far past
    what is allocated."""
    return torch.cuda.Stream(device)


def on_device(inputs: list[tuple[tuple, dict]], device: torch.device) -> Iterator[tuple[tuple, dict]]:
    """Each cached block input moved to ``device``, in order.

    On CUDA (inputs in page-locked memory) the copy of the next input runs on a side stream
    while the caller computes with the current one; the compute stream waits on each copy's
    event, so no host synchronisation is needed.
    """
    if device.type != "cuda":
        for args, kwargs in inputs:
            yield move(args, device), move(kwargs, device)
        return
    compute = torch.cuda.current_stream(device)
    copier = copy_stream(indexed(device))
    copier.wait_stream(compute)  # the host buffers may still be written by queued copies

    def fetch(item: tuple[tuple, dict]) -> tuple[tuple[tuple, dict], torch.cuda.Event]:
        with torch.cuda.stream(copier):
            moved = move(item, device, non_blocking=True)
        return moved, copier.record_event()

    pending = fetch(inputs[0]) if inputs else None
    for index in range(len(inputs)):
        moved, copied = pending
        compute.wait_event(copied)
        _map(moved, lambda tensor: tensor.record_stream(compute))  # allocated on the copier, used here
        if index + 1 < len(inputs):
            pending = fetch(inputs[index + 1])
        yield moved


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives."""
    return next(itertools.chain(model.parameters(), model.buffers())).device


def indexed(device: torch.device) -> torch.device:
    """``device`` with an index, as tensors placed there report it: ``cuda`` is the current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the duration of the block, then back where it was.

    Parameters return into the host tensors they came from: copying into memory already
    mapped is about ten times faster than ``.to("cpu")``, which allocates afresh.
    """
    home = model_device(module)
    if home == indexed(device):
        yield module
        return
    host_tensors = [(parameter, parameter.data) for parameter in module.parameters()]
    module.to(device)
    try:
        yield module
    finally:
        for parameter, host in host_tensors:
            if parameter.data.shape == host.shape and parameter.data.dtype == host.dtype:
                host.copy_(parameter.data)
                parameter.data = host
        module.to(home)  # buffers, and parameters a method reshaped
