"""GPTQ's candidates for search methods: a per-layer database of GPTQ solves at several grids.

As EvoPress (``quant.py``) and RCO (``run_quantize.py``) build their databases: each layer is
quantized by GPTQ at every requested bit width from one Hessian of its inputs. Their code
propagates the calibration activations through an already-quantized model (3 or 4 bits);
here the search collects the Hessians on the original model's activations (the host's
``SearchMethod`` streams the blocks), so every bit width of a layer sees the same inputs.
Damping and block size are the reference defaults (1 %, 128 columns); the inverse factor of
the Hessian is computed once per layer and shared by every grid; on CUDA the column loop is
gptq's fused Triton kernel (the same operations, see ``compress_gptq.fused``).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.api import (
    Candidate,
    CandidateRequest,
    LayerState,
    QuantScheme,
    inverse_factor,
    quantizer_price,
    quantizer_settings,
    relative_output_error,
)
from compress_gptq.method import GPTQ
from compress_gptq.solve import KernelCache, quantize_in_place

PERCDAMP = 0.01
BLOCK_SIZE = 128


@torch.no_grad()
def gptq_candidates(name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """GPTQ variants of a Linear layer for each requested grid, given its input Hessian
    (none without ``request.inputs``). ``error`` is the relative output error through the Hessian,
    tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    settings = quantizer_settings(module, request, GPTQ.offers.defaults)
    if request.inputs is None or not settings:
        return []
    hessian = request.inputs.hessian.to(module.weight.device)
    factor = inverse_factor(hessian, PERCDAMP, False, name)
    kernels = KernelCache(fused=True)  # the fused Triton column loop on CUDA; eager elsewhere
    candidates = []
    for setting in settings:
        W = module.weight.detach().to(torch.float32, copy=True)
        scheme = QuantScheme(**setting)
        result = quantize_in_place(W, factor, scheme, block_size=BLOCK_SIZE, name=name, kernels=kernels)
        weight = result.weight.to(module.weight.dtype)
        error = relative_output_error(module.weight, weight, hessian)
        state = LayerState(method=GPTQ.name, quant=result.grid.to("cpu"))
        cost = quantizer_price(module, setting, request.cost)
        candidates.append(Candidate(GPTQ.name, setting, cost, error, weight, state))
    return candidates
