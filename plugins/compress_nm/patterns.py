"""Sparsity patterns: parsing ``"N:M"`` and keeping the best-scored weights under one."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along a row's input dimension."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """``"2:4"`` as a pattern; ValueError (one sentence) for anything else or N >= M."""
        match = _PATTERN.match(text)
        if match is None:
            raise ValueError(f"pattern {text!r} is not of the form N:M (e.g. 2:4)")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r} needs 0 < N < M")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


def nm_keep_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Boolean mask keeping the ``n`` highest scores of every ``m`` consecutive columns.

    ``scores`` is (rows, columns) with columns divisible by ``m``; ties keep the earlier column.
    """
    rows, columns = scores.shape
    groups = scores.reshape(rows, columns // pattern.m, pattern.m)
    kept = torch.topk(groups, pattern.n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return mask.reshape(rows, columns)


def unstructured_keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean mask dropping the lowest-scored ``sparsity`` fraction, per output row or over the tensor."""
    if per_row:
        dropped = int(scores.shape[1] * sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if dropped:
            lowest = torch.topk(scores, dropped, dim=1, largest=False, sorted=False).indices
            mask.scatter_(1, lowest, False)
        return mask
    dropped = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if dropped:
        mask[torch.topk(scores.flatten(), dropped, largest=False, sorted=False).indices] = False
    return mask.reshape(scores.shape)


def is_nm_sparse(weight: torch.Tensor, pattern: NMPattern) -> bool:
    """Whether every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    rows, columns = weight.shape
    if columns % pattern.m:
        return False
    nonzeros = (weight.reshape(rows, columns // pattern.m, pattern.m) != 0).sum(-1)
    return bool((nonzeros <= pattern.n).all())
