"""``magnitude``: data-free pruning by |w| (the baseline of the SparseGPT and Wanda papers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.api import Context, LayerMethod, UserError, weight_matrix
from compress_nm.candidates import MAGNITUDE_OFFER
from compress_nm.params import Pruning, SparsityParams, sparsity_report


class MagnitudeParams(SparsityParams):
    """Parameters of ``magnitude``: the pattern or fraction (compared over the whole layer by default)."""


class Magnitude(Pruning, LayerMethod):
    """Magnitude pruning: zero the weights of smallest |w|, no data.

    With ``pattern: N:M`` the N largest |w| of every M consecutive input weights of each row
    are kept; with ``sparsity`` the smallest ``sparsity`` fraction of the layer's weights is
    zeroed (``per_row``: of each output row). The layer-wide comparison is the magnitude
    baseline of Wanda's code (``lib/prune.py: prune_magnitude``) and of SparseGPT's paper.
    Ties keep the earlier weight (``torch.topk``'s order). Reports the fraction of zeros.
    """

    name = "magnitude"
    Params = MagnitudeParams
    offers = MAGNITUDE_OFFER
    params: MagnitudeParams

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        weight = weight_matrix(module.weight.data)
        if not torch.isfinite(weight).all():
            raise UserError("weights contain NaN or inf", name)
        keep = self.params.keep_mask(weight.abs().float())
        module.weight.data = weight.masked_fill(~keep, 0).view_as(module.weight)
        context.update_layer(name, method=self.name, sparsity=self.params.structure)
        return sparsity_report(module.weight.data)
