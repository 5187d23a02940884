"""Train one slice of a parameter and leave the rest of it untouched, bit for bit.

Mixture-of-experts layers in transformers store all experts of a layer in one fused
parameter (``gate_up_proj`` of shape ``[experts, 2·intermediate, hidden]``), so "train
expert 5" cannot be said with ``requires_grad``. :func:`trainable_slice` registers a
``torch.nn.utils.parametrize`` parametrization on the module: the fused parameter stays
frozen, and the module reads it with one index along dim 0 replaced by a new trainable
fp32 parameter (the slice's master copy). Only that parameter reaches the optimizer, so no
gradient, weight decay, optimizer moment or master copy exists for the other slices; on
exit the trained slice is written back into the fused parameter in its own dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["trainable_slice"]


class _Spliced(nn.Module):
    """The parametrization: the frozen tensor with slice ``index`` (all of it when None) from ``part``."""

    def __init__(self, part: nn.Parameter, index: int | None) -> None:
        super().__init__()
        self.part = part
        self.index = index

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        part = self.part.to(base.dtype)
        if self.index is None:
            return part
        where = torch.tensor([self.index], device=base.device)
        return base.index_copy(0, where, part.unsqueeze(0))


@contextmanager
def trainable_slice(module: nn.Module, name: str, index: int | None = None) -> Iterator[nn.Parameter]:
    """Within the block, ``module.<name>`` reads slice ``index`` (along dim 0) from the yielded
    fp32 parameter and every other slice from the frozen original; ``index=None`` stands the
    whole tensor in (a full-precision trainable copy of a small parameter, e.g. a router).

    Give the yielded parameter, not ``module.<name>``, to the optimizer. On exit the
    parameter ``module.<name>`` is the original object again, holding the trained slice
    cast to its dtype and the other slices unchanged.
    """
    base = getattr(module, name)
    if index is not None and not 0 <= index < base.shape[0]:
        raise IndexError(f"{name} has {base.shape[0]} slices along dim 0, not {index}")
    piece = base.detach() if index is None else base.detach()[index]
    part = nn.Parameter(piece.float().clone())
    parametrize.register_parametrization(module, name, _Spliced(part, index), unsafe=True)
    try:
        yield part
    finally:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
