"""Round-to-nearest integer quantization grids shared by every quantizer.

Numerics follow compressed-tensors (``calculate_qparams`` and its fake-quantize), so
scales and zero points can be written unchanged as ``pack-quantized``:

* codes are signed: ``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1``;
* the quantized range always contains 0: ``min_val = min(min(w), 0)``,
  ``max_val = max(max(w), 0)``;
* symmetric: ``scale = max(|min_val|, max_val) / ((qmax - qmin) / 2)``, no zero point;
* asymmetric: ``scale = (max_val - min_val) / (qmax - qmin)``,
  ``zero_point = clamp(round(qmin - min_val / scale), qmin, qmax)`` (int8);
* ``q = clamp(round(w / scale + zero_point), qmin, qmax)`` and
  ``dequant = (q - zero_point) * scale``.

``round`` is ``torch.round``: halves go to the nearest even integer. The zero point is
added before rounding, as compressed-tensors does; this only matters for exact ties.
Where a range is empty (an all-zero group) the scale would be 0; it is set to 1
instead, so those weights get code ``zero_point`` and dequantize to exactly 0.
Scales are computed in float32 whatever the weight dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import UserError


class SignedCodes:
    """The signed integer codes of a ``bits``-wide grid (a mixin for schemes with ``bits``)."""

    bits: int

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1


class QuantScheme(SignedCodes, BaseModel):
    """How weights are mapped to integer codes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(
        ge=2,
        le=8,
        description="Bits per weight (2-8). Codes are signed integers in [-2**(bits-1), 2**(bits-1)-1].",
    )
    symmetric: bool = Field(
        True,
        description="Symmetric grid centred on 0 with no zero point; "
        "false adds an int8 zero point so the grid spans the weights' range (always including 0).",
    )
    granularity: Literal["tensor", "channel", "group"] = Field(
        "group",
        description="Which weights share a scale: the whole tensor, each output "
        "channel (row), or each group of group_size consecutive input columns of a row.",
    )
    group_size: int | None = Field(
        128,
        gt=0,
        description="Input columns per group when granularity is 'group'; must divide the input width "
        "of every targeted layer (checked at `compress recipe check`). null: one scale per output "
        "channel, the same as granularity: channel.",
    )

    @model_validator(mode="before")
    @classmethod
    def _group_size_follows_granularity(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "granularity" not in data and "group_size" in data and data["group_size"] is None:
            return {**data, "granularity": "channel"}
        # the default group_size only applies to group granularity
        if data.get("granularity", "group") != "group" and "group_size" not in data:
            return {**data, "group_size": None}
        return data

    @model_validator(mode="after")
    def _check_group_size(self) -> Self:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError(
                "group_size is required when granularity is 'group' (group_size: null means granularity: channel)"
            )
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only allowed when granularity is 'group', not {self.granularity!r}")
        return self


@dataclass
class QuantGrid:
    """Scales and zero points of one 2-D weight ``(out, in)``.

    ``scale`` is float32 with shape ``(1,)`` (tensor), ``(out, 1)`` (channel) or
    ``(out, in // group_size)`` (group); ``zero_point`` is int8 of the same shape,
    or None for symmetric schemes.
    """

    scheme: QuantScheme
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Int8 codes of ``weight``, same shape."""
        scale, zero_point = self._grouped_params()
        return self._ungroup(self._codes(self._group(weight), scale, zero_point))

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights represented by ``codes`` (the full ``(out, in)`` tensor), in ``dtype``."""
        scale, zero_point = self._grouped_params()
        values = self._values(self._group(codes), scale, zero_point)
        return self._ungroup(values).to(dtype)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(weight))`` in ``weight.dtype`` (detached)."""
        return self.fake_quantizer()(weight)

    def fake_quantizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`fake_quantize` with the scale and zero point laid out once, for a weight
        projected at every training step (:mod:`compress.straight_through`)."""
        scale, zero_point = self._grouped_params()
        qmin, qmax = self.scheme.qmin, self.scheme.qmax
        groups = self.scale.shape[-1] if self.scheme.granularity == "group" else None

        def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
            x = weight.detach()
            if groups is None:
                return grid_values(x, scale, zero_point, qmin, qmax).to(weight.dtype)
            return (
                grid_values(x.unflatten(-1, (groups, -1)), scale, zero_point, qmin, qmax).flatten(-2).to(weight.dtype)
            )

        return fake_quantize

    def quantize_columns(self, columns: torch.Tensor, start: int) -> torch.Tensor:
        """Int8 codes of ``columns``, the input columns ``[start, start + k)`` of the weight.

        ``columns`` has shape ``(out, k)``; each column uses the scale of its group.
        """
        scale, zero_point = self._column_params(columns, start)
        return self._codes(columns, scale, zero_point)

    def dequantize_columns(self, codes: torch.Tensor, start: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights represented by ``codes`` of input columns ``[start, start + k)``."""
        scale, zero_point = self._column_params(codes, start)
        return self._values(codes, scale, zero_point).to(dtype)

    def to(self, device: torch.device | str) -> QuantGrid:
        """This grid with its tensors on ``device``."""
        zero_point = None if self.zero_point is None else self.zero_point.to(device)
        return QuantGrid(self.scheme, self.scale.to(device), zero_point)

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        scaled = x.detach().float() / scale
        if zero_point is not None:
            scaled = scaled + zero_point
        return scaled.round_().clamp_(self.scheme.qmin, self.scheme.qmax).to(torch.int8)

    @staticmethod
    def _values(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        values = codes.float()
        if zero_point is not None:
            values = values - zero_point
        return values * scale

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        """``(out, in)`` -> ``(out, n_groups, group_size)`` for group granularity."""
        if self.scheme.granularity != "group":
            return x
        return x.unflatten(-1, (self.scale.shape[-1], -1))

    def _ungroup(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2) if self.scheme.granularity == "group" else x

    def _grouped_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point broadcastable against ``_group(weight)``."""
        if self.scheme.granularity != "group":
            return self.scale, self.zero_point
        zero_point = None if self.zero_point is None else self.zero_point.unsqueeze(-1)
        return self.scale.unsqueeze(-1), zero_point

    def _column_params(self, columns: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point broadcastable against ``columns`` starting at ``start``."""
        # A 1-D column would broadcast silently against (out, 1) scales.
        if columns.ndim != 2:
            raise ValueError(f"expected (out, k) columns, got shape {tuple(columns.shape)}")
        if self.scheme.granularity != "group":
            return self.scale, self.zero_point
        groups = torch.arange(start, start + columns.shape[1], device=self.scale.device)
        groups = groups // self.scheme.group_size
        zero_point = None if self.zero_point is None else self.zero_point[:, groups]
        return self.scale[:, groups], zero_point


def grid_values(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale`` in float32.

    The arithmetic of :meth:`QuantGrid.quantize` then :meth:`QuantGrid.dequantize`, so the
    same values bit for bit (their int8 codes hold these integers exactly), in four
    element-wise passes over one new tensor (six with a zero point) instead of a round trip
    through int8 codes: the fake quantization a training step repeats for every layer.
    ``scale`` (float32) and ``zero_point`` (int8) broadcast against ``x``.
    """
    values = torch.div(x, scale)  # float32: the scale is, and lower-precision x is promoted exactly
    if zero_point is None:
        return values.round_().clamp_(qmin, qmax).mul_(scale)
    return values.add_(zero_point).round_().clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as the 2-D ``(out, in)`` matrix that grids and solvers work on (a view).

    A Linear's weight as it is; a convolution's ``(out, in, *kernel)`` as ``(out, in * kernel
    size)``, each row one output channel's filter in the order ``nn.Unfold`` lays out an
    input patch (channel-major), so the weight matrix times the unfolded input is the
    convolution. Write results back with ``.view_as(weight)``.
    """
    return weight.flatten(1)


def check_group_width(scheme: QuantScheme, width: int, name: str | None = None) -> None:
    """Raise UserError (naming layer ``name``) when ``scheme``'s groups do not tile ``width`` input columns.

    The one width check of every quantizer: ``compress recipe check`` applies it to each
    targeted layer of a stage whose ``Produces.quant`` is ``scheme``, and the grid
    computations apply it to the weights they are given.
    """
    if scheme.granularity == "group" and width % scheme.group_size:
        raise UserError(f"group_size {scheme.group_size} does not divide the input width {width}", name)


def compute_grid(weight: torch.Tensor, scheme: QuantScheme, name: str | None = None) -> QuantGrid:
    """Round-to-nearest grid of a 2-D ``(out, in)`` weight; ``name`` is used in errors."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if scheme.granularity == "tensor":
        min_val, max_val = w.amin().reshape(1), w.amax().reshape(1)
    elif scheme.granularity == "channel":
        min_val, max_val = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        check_group_width(scheme, w.shape[1], name)
        groups = w.unflatten(1, (w.shape[1] // scheme.group_size, scheme.group_size))
        min_val, max_val = groups.amin(-1), groups.amax(-1)
    min_val, max_val = min_val.clamp(max=0), max_val.clamp(min=0)

    qmin, qmax = scheme.qmin, scheme.qmax
    # a tensor divisor: CUDA turns division by a Python scalar into multiplication by its
    # reciprocal, which rounds differently from the CPU and moves codes on exact ties; filled
    # on the device (torch.tensor would copy from the host and wait for the device's queue)
    levels = torch.full((), float(qmax - qmin), dtype=torch.float32, device=w.device)
    if scheme.symmetric:
        scale = torch.maximum(-min_val, max_val) / (levels / 2)
        return QuantGrid(scheme, _nonzero(scale), None)
    scale = _nonzero((max_val - min_val) / levels)
    zero_point = (qmin - min_val / scale).round().clamp(qmin, qmax).to(torch.int8)
    return QuantGrid(scheme, scale, zero_point)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Scale 1 for empty ranges, so their weights dequantize to exactly 0."""
    return scale.masked_fill(scale == 0, 1.0)
