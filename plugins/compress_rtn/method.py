from __future__ import annotations

from typing import Any, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.api import (
    ActivationQuant,
    ActivationScheme,
    Candidate,
    CandidateOffer,
    CandidateRequest,
    Context,
    LayerMethod,
    LayerState,
    Produces,
    QuantParams,
    QuantScheme,
    UserError,
    compute_grid,
    grid_storage_bits,
    quantizer_price,
    quantizer_settings,
    weight_matrix,
)


class RTNParams(QuantParams):
    """Parameters of ``rtn``: the weight grid (every granularity) and, optionally, dynamic input quantization."""

    activations: ActivationScheme | None = Field(
        None,
        description="Quantize the layers' inputs at inference too (W8A8 with bits: 8, "
        "granularity: channel), e.g. {bits: 8, dynamic: true, strategy: token}. Dynamic only: "
        "static scales need calibration data (an activation_scales stage).",
    )

    @model_validator(mode="after")
    def _dynamic_activations(self) -> Self:
        if self.activations is not None and not self.activations.dynamic:
            raise ValueError("rtn uses no data: static activation scales need an activation_scales stage")
        return self


class RoundToNearest(LayerMethod):
    """Round-to-nearest (RTN) weight quantization.

    Each weight is mapped to the nearest point of a uniform integer grid whose scale
    (and, when asymmetric, zero point) comes from the range of its tensor, output
    channel or group of input columns, following compressed-tensors' conventions:
    symmetric scale = 2·max|w| / (2^bits − 1) with codes in [−2^(bits−1), 2^(bits−1) − 1];
    asymmetric scale = (max − min) / (2^bits − 1) over a range that always contains zero.
    Ties round half to even. No data is used. The weights are replaced by their
    dequantized values and the grid is kept for the checkpoint writer. With
    ``activations`` the layers' inputs are also quantized at inference, per token or per
    tensor from each input's own range (dynamic), which is recorded for the writer.
    """

    name = "rtn"
    Params = RTNParams
    supported_modules = (nn.Linear, nn.Conv2d)
    keeps_zeros = True  # every grid holds 0 (its range always contains it)
    offers = CandidateOffer({"group_size": [128], "symmetric": [True]}, price=quantizer_price)

    def __init__(self, params: QuantScheme) -> None:
        # a plain QuantScheme (rtn built in code, e.g. by tests) quantizes the weights only
        super().__init__(params if isinstance(params, RTNParams) else RTNParams(**params.model_dump()))
        self.scheme = self.params.scheme()

    def produces(self) -> Produces:
        activations = self.params.activations
        return Produces(quant=self.scheme, activation_bits=activations.bits if activations else None)

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        state, error = quantize_layer(name, module, self.scheme)
        activations = self.params.activations
        inputs = {"activations": ActivationQuant(activations)} if activations else {}
        context.update_layer(name, method=state.method, quant=state.quant, **inputs)
        return {"bits": self.scheme.bits, "relative_error": error**0.5}


def quantize_layer(name: str, module: nn.Module, scheme: QuantScheme) -> tuple[LayerState, float]:
    """Round ``module``'s weights to ``scheme`` in place; the state and ‖W − Ŵ‖² / ‖W‖²."""
    weight = module.weight.data
    if not torch.isfinite(weight).all():
        raise UserError("weights contain NaN or inf", name)
    grid = compute_grid(weight_matrix(weight), scheme, name)
    quantized = grid.fake_quantize(weight_matrix(weight)).view_as(weight)
    error = (quantized.float() - weight.float()).pow(2).sum() / weight.float().pow(2).sum().clamp_min(1e-24)
    module.weight.data = quantized
    return LayerState(method=RoundToNearest.name, quant=grid.to("cpu")), error.item()


def storage_bits(weight: torch.Tensor, scheme: QuantScheme) -> int:
    """Bits to store a layer on ``scheme``: the codes plus a 16-bit scale (and an 8-bit zero point) each."""
    return grid_storage_bits(tuple(weight.shape), scheme)


def rtn_candidates(name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """rtn variants of a Linear layer for each requested bit width (and group size, symmetry)."""
    candidates = []
    for setting in quantizer_settings(module, request, RoundToNearest.offers.defaults):
        trial = nn.Linear(module.in_features, module.out_features, bias=False, device=module.weight.device)
        trial.weight.data = module.weight.data.clone()
        state, error = quantize_layer(name, trial, QuantScheme(**setting))
        cost = quantizer_price(module, setting, request.cost)
        candidates.append(Candidate(RoundToNearest.name, setting, cost, error, trial.weight.data, state))
    return candidates
