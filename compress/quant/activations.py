"""Integer quantization of the inputs of Linear layers (the "A8" of W8A8).

Numerics follow compressed-tensors (``calculate_qparams`` and ``forward_quantize``), the
fake quantization transformers applies when it loads an ``int-quantized`` checkpoint:

* the range always contains 0: ``min = min(min(x), 0)``, ``max = max(max(x), 0)``;
* symmetric: ``scale = max(|min|, max) / ((qmax - qmin) / 2)`` (127.5 for 8 bits), no zero point;
* asymmetric: ``scale = (max - min) / (qmax - qmin)``,
  ``zero_point = round(clamp(qmin - min / scale, qmin, qmax))``;
* ``q = clamp(round(x / scale + zero_point), qmin, qmax)``, ``x̂ = (q - zero_point) * scale``.

Dynamic quantization computes the range of each token (``strategy: token``) or of the
whole input (``tensor``) on every forward pass; the checkpoint stores no scale. Static
quantization uses one scale (and zero point) per layer chosen from calibration data.
Runtimes differ in the dynamic grid by a hair (vLLM's int8 kernels divide by 127, not
127.5); static scales are used as stored by every runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compress.quant.grid import SignedCodes

if TYPE_CHECKING:
    from compress.context import LayerState


class ActivationScheme(SignedCodes, BaseModel):
    """How the inputs of a Linear layer are mapped to integer codes at inference."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(8, ge=4, le=8, description="Bits per activation; vLLM's int kernels take 8.")
    symmetric: bool = Field(
        True, description="Symmetric grid with no zero point; false adds a zero point (vLLM: azp kernels)."
    )
    strategy: Literal["token", "tensor"] = Field(
        "token", description="One scale per token (dynamic only) or one for the whole input."
    )
    dynamic: bool = Field(
        True,
        description="Scales computed from each input at inference (no data needed); false: static "
        "scales calibrated once (the activation_scales method).",
    )

    @model_validator(mode="after")
    def _static_is_per_tensor(self) -> Self:
        if not self.dynamic and self.strategy != "tensor":
            raise ValueError("static activation scales are per tensor: set strategy: tensor")
        return self


def activation_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, scheme: ActivationScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) of the range ``[min_val, max_val]``."""
    min_val = min_val.clamp(max=0)
    max_val = max_val.clamp(min=0)
    levels = torch.tensor(float(scheme.qmax - scheme.qmin), dtype=min_val.dtype, device=min_val.device)
    if scheme.symmetric:
        scale = torch.maximum(-min_val, max_val) / (levels / 2)
        zero_point = None
    else:
        scale = (max_val - min_val) / levels
        zero_point = (scheme.qmin - min_val / scale).clamp(scheme.qmin, scheme.qmax).round()
    # an all-zero input: compressed-tensors replaces a zero scale by the dtype's eps
    scale = scale.masked_fill(scale == 0, torch.finfo(scale.dtype).eps)
    if zero_point is not None:
        zero_point = zero_point.nan_to_num(0.0)
    return scale, zero_point


@dataclass
class ActivationQuant:
    """A layer's input quantization: the scheme and, when static, its scale and zero point.

    ``scale`` is float32 of shape ``(1,)`` and ``zero_point`` int8 ``(1,)`` (asymmetric
    only); both are None for dynamic schemes.
    """

    scheme: ActivationScheme
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized on this grid, in ``x.dtype``."""
        scheme = self.scheme
        if scheme.dynamic:
            if scheme.strategy == "token":
                min_val, max_val = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            else:
                min_val, max_val = x.amin(), x.amax()
            scale, zero_point = activation_qparams(min_val, max_val, scheme)
        else:
            scale = self.scale.to(x.device, x.dtype)
            zero_point = None if self.zero_point is None else self.zero_point.to(x.device, x.dtype)
        scaled = x / scale
        if zero_point is not None:
            scaled = scaled + zero_point
        codes = scaled.round().clamp(scheme.qmin, scheme.qmax)
        if zero_point is not None:
            codes = codes - zero_point
        return codes * scale


def input_quantizer(quant: ActivationQuant) -> Callable[[nn.Module, tuple], tuple]:
    """A forward pre-hook that fake-quantizes a layer's input on ``quant``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (quant.fake_quantize(args[0]), *args[1:])

    return hook


@contextmanager
def quantized_inputs(model: nn.Module, layers: Mapping[str, LayerState]) -> Iterator[None]:
    """Within the block, every layer with ``LayerState.activations`` sees fake-quantized inputs.

    This is the in-memory model a runtime serves from the checkpoint: weights on their
    grids (already in the model) and activations quantized as recorded.
    """
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(input_quantizer(state.activations))
        for name, state in layers.items()
        if state.activations is not None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
