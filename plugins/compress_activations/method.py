"""Static activation ranges for integer inference, calibrated from data.

Per-tensor ranges observed on calibration inputs as in Jacob et al., 2018 ("Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"): the
min/max over all inputs, or averaged over calibration batches (their averaged ranges),
mapped to scales and zero points with compressed-tensors' conventions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from compress.api import (
    ActivationQuant,
    ActivationScheme,
    BlockMethod,
    BlockWork,
    Context,
    Method,
    MethodParams,
    Produces,
    StageRun,
    UserError,
    activation_qparams,
    input_quantizer,
    move,
)


class ActivationScalesParams(MethodParams):
    """Parameters of ``activation_scales``."""

    bits: int = Field(8, ge=4, le=8, description="Bits per activation; vLLM's int kernels take 8.")
    symmetric: bool = Field(
        True, description="Symmetric grid with no zero point; false adds a zero point (vLLM: azp kernels)."
    )
    observer: Literal["minmax", "mean-minmax"] = Field(
        "minmax",
        description="'minmax': the range of every input seen over all calibration tokens (no "
        "input is clipped). 'mean-minmax': the mean over calibration sequences of each "
        "sequence's min and max (rare outliers are clipped, the rest gets a finer grid).",
    )

    def scheme(self) -> ActivationScheme:
        return ActivationScheme(bits=self.bits, symmetric=self.symmetric, strategy="tensor", dynamic=False)


class ActivationScales(BlockMethod):
    """Static per-tensor input scales for the Linear layers (W8A8 int, static activations).

    Each block's calibration inputs (produced by the already-quantized earlier blocks,
    with their inputs fake-quantized on the scales chosen for them) run through the block
    while the targeted layers' inputs are observed; one range per layer gives the scale
    (and zero point) with compressed-tensors' conventions, as in llm-compressor's static
    W8A8 schemes and vLLM's static int8 kernels (``input_scale``). The weights are not
    changed: the stage follows a weight-quantizing stage (rtn, gptq) and records the
    scales next to the grids it left.
    """

    name = "activation_scales"
    Params = ActivationScalesParams
    keeps_zeros = True  # the weights are not changed

    def __init__(self, params: ActivationScalesParams) -> None:
        super().__init__(params)
        self._quantizing: list[RemovableHandle] = []

    def check_previous_stages(self, previous: list[Method]) -> None:
        if not any(method.produces().quant is not None for method in previous):
            raise UserError(
                "activation_scales calibrates the inputs of the weight-quantized model: "
                "put it after a weight-quantizing stage (rtn, gptq)"
            )

    def produces(self) -> Produces:
        return Produces(activation_bits=self.params.bits)

    @contextmanager
    def around_stage(self, context: Context, run: StageRun) -> Iterator[None]:
        try:
            yield
        finally:
            self._stop_quantizing()

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        self._stop_quantizing()
        for name in work.targets:
            if name not in context.layers or context.layers[name].quant is None:
                raise UserError("activation_scales needs a layer an earlier stage quantized", name)
        ranges = observe_input_ranges(work)
        scheme = self.params.scheme()
        reports = {}
        for name, module in work.targets.items():
            if name not in ranges:
                raise UserError("the block's forward pass never reached this layer; it cannot be calibrated", name)
            min_val, max_val = reduce_ranges(*ranges[name], self.params.observer)
            scale, zero_point = activation_qparams(min_val, max_val, scheme)
            quant = ActivationQuant(scheme, scale, None if zero_point is None else zero_point.to(torch.int8))
            context.update_layer(name, activations=quant)
            # the next blocks are calibrated on what the deployed model feeds them
            self._quantizing.append(module.register_forward_pre_hook(input_quantizer(quant)))
            reports[name] = {"input_min": min_val.item(), "input_max": max_val.item(), "scale": scale.item()}
        return reports

    def _stop_quantizing(self) -> None:
        for handle in self._quantizing:
            handle.remove()
        self._quantizing.clear()


@torch.no_grad()
def observe_input_ranges(work: BlockWork) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per targeted layer, the min and max of its input in each calibration sequence (float32)."""
    mins: dict[str, list[torch.Tensor]] = defaultdict(list)
    maxs: dict[str, list[torch.Tensor]] = defaultdict(list)

    def observer(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise UserError("the calibration activations reaching this layer contain NaN or inf", name)
            mins[name].append(x.amin().float())
            maxs[name].append(x.amax().float())

        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in work.targets.items()]
    try:
        for args, kwargs in work.inputs:
            work.block(*move(args, work.device), **move(kwargs, work.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (torch.stack(mins[name]), torch.stack(maxs[name])) for name in mins}


def reduce_ranges(mins: torch.Tensor, maxs: torch.Tensor, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(1,)`` range from the per-sequence ranges."""
    if observer == "minmax":
        return mins.amin().reshape(1), maxs.amax().reshape(1)
    return mins.mean().reshape(1), maxs.mean().reshape(1)
