from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.context import Context, LayerState
from compress.errors import UserError
from compress.method import LayerMethod
from compress.quant import QuantScheme, compute_grid


class RoundToNearest(LayerMethod):
    """Round-to-nearest (RTN) weight quantization.

    Each weight is mapped to the nearest point of a uniform integer grid whose scale
    (and, when asymmetric, zero point) comes from the range of its tensor, output
    channel or group of input columns, following compressed-tensors' conventions:
    symmetric scale = 2·max|w| / (2^bits − 1) with codes in [−2^(bits−1), 2^(bits−1) − 1];
    asymmetric scale = (max − min) / (2^bits − 1) over a range that always contains zero.
    Ties round half to even. No data is used. The weights are replaced by their
    dequantized values and the grid is kept for the checkpoint writer.
    """

    name = "rtn"
    Params = QuantScheme

    def check_layer(self, name: str, module: nn.Module) -> None:
        scheme = self.params
        if scheme.granularity == "group" and module.in_features % scheme.group_size:
            raise UserError(
                f"group_size {scheme.group_size} does not divide the input width {module.in_features}", name
            )

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        weight = module.weight.data
        if not torch.isfinite(weight).all():
            raise UserError("weights contain NaN or inf", name)
        grid = compute_grid(weight, self.params, name)
        quantized = grid.fake_quantize(weight)
        error = (quantized.float() - weight.float()).norm() / weight.float().norm().clamp_min(1e-12)
        module.weight.data = quantized
        context.layers[name] = LayerState(method=self.name, quant=grid.to("cpu"))
        return {"bits": self.params.bits, "relative_error": error.item()}
