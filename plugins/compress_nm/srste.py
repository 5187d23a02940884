"""SR-STE: the sparse-refined straight-through estimator for training N:M sparse weights.

Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
ICLR 2021; official code github.com/NM-sparsity/NM-sparsity, ``devkit/sparse_ops/sparse_ops.py``
(``Sparse``, ``Sparse_NHWC``), consulted for every detail below.

The network keeps dense weights ``W``. At every forward pass the mask ``E`` is recomputed
from them: in each group of ``M`` consecutive weights along the input dimension the ``N``
of largest magnitude are kept (for a convolution, groups run along the input channels in
NHWC order, as ``Sparse_NHWC``). The forward pass sees ``W ⊙ E``. The backward pass hands
the gradient of the sparse weights to the dense ones unchanged (straight-through) and adds
the sparse-refined term ``λ_w (1 − E) ⊙ W``: only pruned weights are pulled towards zero,
so a weight that the mask dropped has to earn its place back, which stabilises the mask.
``λ_w = 2e-4`` is the code's default.

Sparse architecture divergence (SAD) measures how much the mask moves: the Hamming distance
between the masks at two times. We divide it by the number of weights (the fraction of
mask entries that differ), as Google's praxis sparsity library does when it tracks this
metric; the paper's exact normalization could not be checked here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_nm.patterns import NMPattern, nm_keep_mask


def nm_mask(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest |w| of every ``m`` consecutive input weights.

    A 2-D weight (Linear, ``out x in``) is grouped along each row; a 4-D one (Conv2d,
    ``out x in x kh x kw``) along the input channels at each output channel and kernel
    position (NHWC order, as the official ``Sparse_NHWC``).
    """
    scores = weight.detach().abs()
    if weight.dim() == 2:
        return nm_keep_mask(scores, pattern)
    if weight.dim() == 4:
        nhwc = scores.permute(0, 2, 3, 1)
        mask = nm_keep_mask(nhwc.reshape(-1, nhwc.shape[-1]), pattern)
        return mask.reshape(nhwc.shape).permute(0, 3, 1, 2)
    raise ValueError(f"N:M masks are defined for 2-D and 4-D weights, not shape {tuple(weight.shape)}")


class _SparseRefined(torch.autograd.Function):
    """``W ⊙ E`` forward; ``grad + λ_w (1 − E) ⊙ W`` to the dense ``W`` backward."""

    @staticmethod
    def forward(weight: torch.Tensor, pattern: NMPattern, decay: float) -> torch.Tensor:
        return weight * nm_mask(weight, pattern)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        weight, _, decay = inputs
        # the forward output is W ⊙ E, so the pruned weights (1 − E) ⊙ W are W minus it
        ctx.save_for_backward(weight, output)
        ctx.decay = decay

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, kept = ctx.saved_tensors
        return grad + ctx.decay * (weight - kept), None, None


class SparseRefinedWeight(nn.Module):
    """The parametrization: ``module.weight`` becomes ``W ⊙ E(W)`` with SR-STE gradients.

    ``decay`` 0 is plain STE (the mask still moves with the weights; no refined term).
    """

    def __init__(self, pattern: NMPattern, decay: float) -> None:
        super().__init__()
        self.pattern, self.decay = pattern, decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SparseRefined.apply(weight, self.pattern, self.decay)


def attach(module: nn.Module, pattern: NMPattern, decay: float) -> None:
    """Train ``module.weight`` through SR-STE; the Parameter object stays the one optimizers hold."""
    parametrize.register_parametrization(module, "weight", SparseRefinedWeight(pattern, decay))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense (latent) weight behind an attached module, else the module's weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def bake(module: nn.Module) -> None:
    """Remove the parametrization, leaving ``W ⊙ E(W)`` in the same Parameter object."""
    if parametrize.is_parametrized(module, "weight"):
        with torch.no_grad():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def hamming(first: torch.Tensor, second: torch.Tensor) -> int:
    """How many entries of two boolean masks differ."""
    return int(torch.count_nonzero(first ^ second))


def sparse_architecture_divergence(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """SAD between two sets of masks (by layer name): the Hamming distance over all layers
    divided by the number of mask entries, in [0, 1]."""
    changed = sum(hamming(first[name], second[name].to(first[name].device)) for name in first)
    total = sum(mask.numel() for mask in first.values())
    return changed / total if total else 0.0
