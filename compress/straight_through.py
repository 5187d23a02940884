"""Training through compressed weights: the straight-through estimator.

A layer that an earlier stage quantized or pruned must stay on its grid and keep its
zeros while a training stage updates it. Each such weight is reparametrized as
``project(w)`` with the identity as its gradient: the forward pass sees the projected
weight, the gradient flows to the latent full-precision ``w`` unchanged (Bengio et al.,
2013). When
training ends the projection is applied once more and the reparametrization removed, so
the layer holds exactly representable weights and its ``LayerState`` stays true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.context import LayerState


class StraightThrough(nn.Module):
    """The parametrization: the weight moved onto what ``state`` says the layer holds (its
    grid(s) and its zeros) forward, the identity backward.

    :param keep: bool mask of the weights allowed to be nonzero (a pruned layer's
        pattern), or None.
    """

    def __init__(self, state: LayerState, keep: torch.Tensor | None) -> None:
        super().__init__()
        self.state = state
        self.keep = keep
        # laid out once: the projection runs for every layer at every step (and is launch-bound there)
        self._quantize = None if state.quant is None else state.quant.fake_quantizer()
        outliers = state.outliers
        self._outliers = None if outliers is None else (outliers.mask, outliers.grid.fake_quantizer())

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` on the layer's grid(s), with its pruned weights zero (no gradient)."""
        projected = weight if self._quantize is None else self._quantize(weight)
        if self._outliers is not None:
            mask, quantize = self._outliers
            projected = torch.where(mask, quantize(weight), projected)
        if self.keep is not None:
            projected = projected * self.keep
        return projected

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Projected.apply(weight, self.project)


class _Projected(torch.autograd.Function):
    """Exactly the projected weight forward (``w + (p - w).detach()`` is off by rounding),
    the incoming gradient unchanged backward."""

    @staticmethod
    def forward(weight: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return project(weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _on_device(state: LayerState, device: torch.device) -> LayerState:
    quant = None if state.quant is None else state.quant.to(device)
    outliers = state.outliers
    if outliers is not None:
        outliers = replace(outliers, mask=outliers.mask.to(device), grid=outliers.grid.to(device))
    return replace(state, quant=quant, outliers=outliers)


def constrained_layers(
    modules: dict[str, nn.Module], layers: dict[str, LayerState]
) -> dict[str, tuple[nn.Module, LayerState]]:
    """The modules among ``modules`` whose weights a stage constrained (quantized or pruned)."""
    return {
        name: (module, layers[name])
        for name, module in modules.items()
        if name in layers
        and (layers[name].quant is not None or layers[name].outliers is not None or layers[name].sparsity)
    }


@contextmanager
def straight_through(
    modules: dict[str, nn.Module], layers: dict[str, LayerState], latent: dict[str, torch.Tensor] | None = None
) -> Iterator[int]:
    """Reparametrize the constrained modules for training; yields how many there are.

    :param latent: full-precision starting values of the latent weights by layer name
        (e.g. the original model's, whose sub-grid detail the compressed weights lost);
        layers not in it start from their compressed weights.

    On exit the weights are projected for good and each module's ``weight`` is a plain
    parameter again (the same Parameter object, so the engine's copy-back still finds it).
    """
    constrained = constrained_layers(modules, layers)
    for module, state in constrained.values():
        weight = module.weight
        keep = (weight.detach() != 0) if state.sparsity else None
        parametrize.register_parametrization(module, "weight", StraightThrough(_on_device(state, weight.device), keep))
    for name, (module, _) in constrained.items():
        if latent is not None and name in latent:
            with torch.no_grad():
                module.parametrizations.weight.original.copy_(latent[name])
    try:
        yield len(constrained)
    finally:
        for module, _ in constrained.values():
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
