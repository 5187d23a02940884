"""Replaying a fixed sequence of small kernels from a CUDA graph.

Column loops (GPTQ's, SparseGPT's) launch about ten tiny kernels per weight column; on a
GPU the launches, not the arithmetic, set their speed. Run on buffers whose addresses do
not change, such a loop can be captured once as a CUDA graph and replayed for every block
of the same shape: the same kernels on the same memory, so the same result, at a fraction
of the launch cost.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch


class GraphReplay:
    """Runs ``function`` for a ``key``: eagerly the first time, then, on CUDA with ``enabled``,
    from a CUDA graph captured right after that first run (capturing records the kernels
    without running them, so the first run does the work). ``function`` must read and write
    only tensors that live as long as this object, at fixed addresses, and must not
    synchronise with the host. A capture that fails turns graphs off for good, with a
    warning naming ``owner``; the eager launches go on.
    """

    def __init__(self, device: torch.device, enabled: bool = True, owner: str = "column loop") -> None:
        self.enabled = enabled and device.type == "cuda"
        self.owner = owner
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    @property
    def captured(self) -> int:
        """How many graphs are held."""
        return len(self._graphs)

    def run(self, key: Hashable, function: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        function()
        if self.enabled:
            self._capture(key, function)

    def _capture(self, key: Hashable, function: Callable[[], None]) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: host-device copies another thread makes meanwhile do not void the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                function()
        except RuntimeError as error:
            self.enabled = False
            warnings.warn(f"{self.owner}: capturing a CUDA graph failed ({error}); launching eagerly", stacklevel=3)
            return
        self._graphs[key] = graph

    def clear(self) -> None:
        """Drop every graph (and the memory their captures hold)."""
        self._graphs.clear()
