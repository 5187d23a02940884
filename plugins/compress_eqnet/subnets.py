"""Measuring sub-networks of the supernet: batch-norm recalibration, then top-1 accuracy.

EQ-Net measures each sub-network after re-estimating the batch-norm statistics on training
images (``runner/utils.py``, ``Adaptive_BN``: forward passes in train mode, momentum 0.1,
up to 256 batches). Here the statistics are reset and re-estimated as the exact average
over ``bn_batches`` calibration batches (momentum None), our choice: fewer batches give the
same estimate without depending on the previous sub-network's statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.api import Context
from compress_eqnet.supernet import Subnet, Supernet


class Measurer:
    """Sets sub-networks on ``supernet`` and measures them on the stage's data."""

    def __init__(self, context: Context, supernet: Supernet, params: Any) -> None:
        self.model = context.model
        self.device = context.device
        self.supernet = supernet
        self.batch_size = params.batch_size
        self.calibration = self._batches(context.data(params.calibration))[: params.bn_batches]
        self.holdout_data = self._batches(context.data(params.holdout)) if params.searches else []
        self.test_data = self._batches(context.data(params.test_data)) if params.test_data else []
        self.norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _batches(self, samples: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.stack([s["pixel_values"] for s in samples[i : i + self.batch_size]]),
                torch.stack([s["labels"] for s in samples[i : i + self.batch_size]]),
            )
            for i in range(0, len(samples), self.batch_size)
        ]

    @torch.no_grad()
    def use(self, subnet: Subnet) -> None:
        """Make ``subnet`` active and re-estimate the batch-norm statistics for it."""
        self.supernet.set(subnet)
        if not self.norms:
            return
        self.model.eval()
        momenta = []
        for norm in self.norms:
            momenta.append(norm.momentum)
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        try:
            for images, _ in self.calibration:
                self.model(pixel_values=images.to(self.device))
        finally:
            for norm, momentum in zip(self.norms, momenta):
                norm.momentum = momentum
                norm.eval()

    @torch.no_grad()
    def accuracy(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Top-1 accuracy (fraction) of the active sub-network on ``batches``."""
        self.model.eval()
        correct = total = 0
        for images, labels in batches:
            logits = self.model(pixel_values=images.to(self.device)).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += labels.numel()
        return correct / max(total, 1)

    def holdout(self, subnet: Subnet) -> float:
        """``subnet``'s holdout accuracy (fraction), after recalibration."""
        self.use(subnet)
        return self.accuracy(self.holdout_data)

    def report(self, subnet: Subnet) -> dict[str, float]:
        """``subnet``'s accuracies on the holdout and test data that the stage has (fractions)."""
        self.use(subnet)
        measured = {}
        if self.holdout_data:
            measured["holdout"] = self.accuracy(self.holdout_data)
        if self.test_data:
            measured["test"] = self.accuracy(self.test_data)
        return measured
