"""Safetensors shards written as tensors arrive, then the index: what the lazy engine's writer
uses instead of ``save_pretrained``, which needs the whole state dict at once.

Tensors are gathered on the host until a shard would pass ``max_shard_size``; the shard is
then written and its tensors dropped, so the host holds at most one shard's worth plus
what the caller hands over. Names and index follow transformers' layout
(``model-00001-of-00003.safetensors`` and ``model.safetensors.index.json``, or one
``model.safetensors`` without an index), so ``from_pretrained`` reads the result as its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def size_in_bytes(size: str) -> int:
    """``"2GB"``, ``"500MB"``... in bytes (decimal units, as transformers reads ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", size, re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {size!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardSink:
    """Collects a checkpoint's tensors into shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own) in ``directory``; :meth:`finish` names the
    shards and writes the index. ``peak_pending_bytes`` is the most it held at once."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take ``tensors`` (full names; on any device: copied to the host here)."""
        for key, tensor in tensors.items():
            size = tensor_bytes(tensor)
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[key] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size
            self.total_bytes += size
            self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[Path]:
        """Write what is pending, give the shards their final names, write the index (when
        there are several shards); returns the shard files."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.directory / SINGLE_FILE
            self._written[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for number, (path, keys) in enumerate(self._written, 1):
            final = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files
