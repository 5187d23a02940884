"""Peak host and device memory over a stretch of work."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import psutil
import torch


@dataclass
class Usage:
    seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0


class measure:
    """``with measure(device) as usage:`` records wall time and peak memory of the block.

    Host memory is the process's resident set, sampled every 20 ms; device memory is
    torch's peak allocation on a CUDA device. Measurements nest: an inner one resets
    torch's peak counter, so it hands the peaks it sees to the outer ones.
    """

    _active: ClassVar[list[measure]] = []

    def _share_device_peak(self, peak: int) -> None:
        for outer in measure._active:
            outer.usage.peak_device_bytes = max(outer.usage.peak_device_bytes, peak)

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.usage = Usage()
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.usage.peak_host_bytes = max(self.usage.peak_host_bytes, self._process.memory_info().rss)

    def __enter__(self) -> Usage:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._share_device_peak(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        measure._active.append(self)
        self.usage.peak_host_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self.usage

    def __exit__(self, *exc: object) -> None:
        measure._active.remove(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.usage.peak_device_bytes = max(
                self.usage.peak_device_bytes, torch.cuda.max_memory_allocated(self.device)
            )
            self._share_device_peak(self.usage.peak_device_bytes)
        self.usage.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.usage.peak_host_bytes = max(self.usage.peak_host_bytes, self._process.memory_info().rss)
