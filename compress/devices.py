"""Moving tensors and modules between the host and the compute device.

The engine streams blocks through the device with these, and methods use them for what
they move themselves (a teacher model, cached block inputs); plugins reach them through
:mod:`compress.api`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


Slot = tuple[nn.Module, str, bool]
"""Where a module's tensor is held: the submodule owning it, its key, and whether it is a parameter."""


def _slots(module: nn.Module) -> list[tuple[Slot, torch.Tensor]]:
    """Every parameter and buffer of ``module`` (shared ones once), with where it is held."""
    found, seen = [], set()
    for owner in module.modules():
        for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for key, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.append(((owner, key, is_parameter), tensor))
    return found


def _hold(slot: Slot, tensor: torch.Tensor) -> None:
    owner, key, is_parameter = slot
    if is_parameter:
        owner._parameters[key].data = tensor
    else:
        owner._buffers[key] = tensor


class _Prefetch:
    """A module's tensors as :meth:`BlockMover.prefetch` found them, and their copies under way."""

    def __init__(self, module: nn.Module) -> None:
        self.slots = _slots(module)
        self.marks = [(tensor.data_ptr(), tensor._version) for _, tensor in self.slots]
        self.copies: Future[tuple[list[torch.Tensor], torch.cuda.Event]] | None = None

    def still_valid(self, module: nn.Module) -> bool:
        """Whether ``module`` holds the very tensors copied, on the same storage, not changed in
        place since (their version counters; a change made in place through ``.data`` does not
        count there, so methods that edit blocks other than the current one keep prefetching off)."""
        now = _slots(module)
        return len(now) == len(self.slots) and all(
            slot == old_slot and tensor is old and (tensor.data_ptr(), tensor._version) == mark
            for (slot, tensor), (old_slot, old), mark in zip(now, self.slots, self.marks)
        )


class BlockMover:
    """Blocks onloaded to the device ahead of use and written back behind it, overlapped with
    the device's compute: what :func:`onloaded` does one block at a time, off the host's clock.

    :meth:`prefetch` starts copying a module's parameters and buffers to the device;
    :meth:`onloaded` then installs those copies (the compute stream waits on the copies'
    event: no host synchronisation) and, on exit, queues the write-back: once the compute
    stream's work queued so far is done, each parameter that kept its shape and dtype is
    copied back into the host tensor it came from and held there again; buffers and anything
    else left on the device move back at once, as :func:`onloaded` moves them. Copies run on a
    worker thread, through one page-locked staging buffer (:class:`StagingBuffer`, a block's
    size; the worker copies between it and the block's pageable host tensors, torch releasing
    the GIL), on a side stream of their own (:func:`weights_stream`), so the activation copies
    of :func:`on_device` do not queue behind them. Until its write-back has run, a block's
    parameters stay on the device, with their final values; :meth:`settle_back` (and leaving
    the ``with``) waits for every write-back.

    A prefetch whose module changed since (a tensor added, replaced or changed in place) is
    dropped, and :meth:`onloaded` moves the module as :func:`onloaded` does. Without
    ``enabled``, or when the device is not CUDA, both do exactly what :func:`onloaded` does:
    the mover changes when copies happen, never what is computed.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = indexed(device)
        self.enabled = enabled and self.device.type == "cuda"
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress-mover") if self.enabled else None
        self._pending: dict[int, _Prefetch] = {}
        self._writes: list[Future[None]] = []
        self._staging = StagingBuffer(pinned_bytes) if self.enabled else None
        self._staged: torch.cuda.Event | None = None  # the last copy to or from the staging buffer

    def __enter__(self) -> BlockMover:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.settle_back()
        finally:
            self._pending.clear()
            if self._worker is not None:
                self._worker.shutdown(wait=True)

    def prefetch(self, module: nn.Module) -> None:
        """Start copying ``module``'s tensors to the device (nothing when the mover is off, or
        when ``module`` is there already)."""
        if not self.enabled or model_device(module) == self.device:
            return
        job = _Prefetch(module)
        job.copies = self._worker.submit(self._copy_in, [tensor.data for _, tensor in job.slots])
        self._pending[id(module)] = job

    def _copy_in(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        stream = weights_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            staged = self._stage(tensors)
            for view, tensor in zip(staged, tensors):
                view.copy_(tensor)  # host to host, no CUDA call
            copies = [view.to(self.device, non_blocking=True) for view in staged]
            self._staged = stream.record_event()
            return copies, self._staged

    @contextmanager
    def onloaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """:func:`onloaded`, with the copies :meth:`prefetch` started and a queued write-back."""
        job = self._pending.pop(id(module), None)
        home = model_device(module)
        if job is None or home == self.device or not job.still_valid(module):
            with onloaded(module, self.device):
                yield module
            return
        copies, copied = job.copies.result()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        hosts = []
        for (slot, held), copy in zip(job.slots, copies):
            copy.record_stream(compute)  # allocated on the weights stream, used here
            hosts.append((slot, held.data))
            _hold(slot, copy)
        del copies, job
        try:
            yield module
        finally:
            self._write_back(module, hosts, home, compute.record_event())

    def _write_back(
        self, module: nn.Module, hosts: list[tuple[Slot, torch.Tensor]], home: torch.device, done: torch.cuda.Event
    ) -> None:
        later, queued = [], set()
        for slot, host in hosts:
            owner, key, is_parameter = slot
            current = owner._parameters.get(key) if is_parameter else None
            if current is not None and current.shape == host.shape and current.dtype == host.dtype:
                later.append((slot, host, current.data))
                queued.add(id(current))
        for slot, tensor in _slots(module):
            if id(tensor) not in queued and tensor.device != home:
                _hold(slot, tensor.data.to(home))
        if later:
            self._writes.append(self._worker.submit(self._copy_out, later, done))

    def _copy_out(self, tensors: list[tuple[Slot, torch.Tensor, torch.Tensor]], done: torch.cuda.Event) -> None:
        stream = weights_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            stream.wait_event(done)
            staged = self._stage([host for _, host, _ in tensors])
            for view, (_, _, current) in zip(staged, tensors):
                view.copy_(current, non_blocking=True)
            self._staged = stream.record_event()
            self._staged.synchronize()
            for view, (slot, host, _) in zip(staged, tensors):
                host.copy_(view)  # the host tensor is complete when held again
                _hold(slot, host)

    def _stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the page-locked staging buffer shaped as ``tensors``, once the copies that last
        used it have run. A copy between the device and pageable memory holds the driver while it
        runs, stalling the compute thread's launches (50 ms a Llama-3-8B block on an H200, in a
        profile); through page-locked memory it is DMA, and the worker does the host side."""
        if self._staged is not None:
            self._staged.synchronize()
        return self._staging.views(tensors)

    def settle_back(self) -> None:
        """Wait until every queued write-back has run: every parameter is on the host again."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()


def pinned_bytes(size: int) -> torch.Tensor:
    """``size`` bytes of page-locked host memory."""
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


class StagingBuffer:
    """One host buffer that a list of tensors is laid out in, each at an offset aligned to
    ``ALIGNMENT`` bytes; made by ``allocate(bytes)``, made anew (larger) when a list does not
    fit, reused while lists fit: block after block of one model."""

    ALIGNMENT = 64

    def __init__(self, allocate: Callable[[int], torch.Tensor]) -> None:
        self.allocate = allocate
        self.buffer: torch.Tensor | None = None

    def views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Contiguous views of the buffer with ``tensors``' shapes and dtypes, not overlapping."""
        offsets, end = [], 0
        for tensor in tensors:
            offsets.append(end)
            end += -(-tensor.numel() * tensor.element_size() // self.ALIGNMENT) * self.ALIGNMENT
        if self.buffer is None or self.buffer.numel() < end:
            self.buffer = None  # the old one goes before the new one is made
            self.buffer = self.allocate(end)
        return [
            self.buffer[offset : offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            for offset, tensor in zip(offsets, tensors)
        ]


@functools.cache
def weights_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` that :class:`BlockMover` copies weights on (one for the
    process, as :func:`copy_stream`, for the same reason)."""
    return torch.cuda.Stream(device)
