"""LSQ+ quantizers with one learnable step size (and offset) per elastic setting.

From EQ-Net's ``module/base_lsq.py``: every bit width 2..8 has its own slot, symmetric and
asymmetric grids have separate sets, and weights keep a per-channel ``[out, 7]`` and a
per-tensor ``[1, 7]`` set. Codes are signed ``[-2^(b-1), 2^(b-1)-1]``, or unsigned
``[0, 2^b-1]`` for activations that were never negative at initialization (after a ReLU).
The forward pass is ``clamp((x - β) / (s + 1e-6)) → round (straight-through) → · (s + 1e-6) + β``;
β is learnable for asymmetric grids and 0 for symmetric ones; the step-size gradient is
scaled by ``g`` (LSQ): ``1/√(Qp·numel)``, and ``2/√(Qp·numel/in)`` for per-channel weights,
as the code has it. Initialization searches 80 shrink factors of the range (5 for symmetric
per-channel weights, as the code) for the least L2.4 error, for every slot.

Differences from the code, on purpose: the code passes β through the same ``|·|`` as the step
size (``grad_scale`` returns an absolute value), which flips a negative offset; here β keeps
its sign. Quantization runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.api import QuantGrid, QuantScheme

BITS = tuple(range(2, 9))
"""The bit widths every quantizer holds a slot for (index ``bits - 2``)."""
SLOTS = len(BITS)
EPS = 1e-6


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward, its gradient times ``scale`` backward (LSQ's step-size gradient scale)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return (x.round() - x).detach() + x


def code_range(bits: int, unsigned: bool) -> tuple[int, int]:
    """Smallest and largest integer code of a ``bits``-wide grid."""
    if unsigned:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """LSQ+ quantize-dequantize of float32 ``x`` with step ``scale`` and offset ``beta`` (broadcast)."""
    step = scale + EPS
    return round_ste(torch.clamp((x - beta) / step, low, high)) * step + beta


@torch.no_grad()
def initial_range(
    x: torch.Tensor, bits: int, symmetric: bool, unsigned: bool, factors: int = 80, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and offset per row of 2-D ``x`` minimizing the mean L2.4 error over ``factors``
    shrinkings (1, 0.99, ...) of the row's range, as ``symmetric_init``/``asymmetric_init`` of the
    code (the first best on ties); ``chunk`` shrinkings are tried at once."""
    low, high = code_range(bits, unsigned)
    x = x.float()
    top, bottom, absmax = x.amax(1), x.amin(1), x.abs().amax(1)
    best = torch.full_like(top, float("inf"))
    scale, beta = torch.ones_like(top), torch.zeros_like(top)
    for first in range(0, factors, chunk):
        shrink = 1.0 - 0.01 * torch.arange(first, min(first + chunk, factors), device=x.device)[:, None]
        if symmetric:
            hi = absmax * shrink
            lo = torch.zeros_like(hi) if unsigned else -hi
            s, b = (hi - lo) / (high - low), torch.zeros_like(hi)
        else:
            hi, lo = top * shrink, bottom * shrink
            s = (hi - lo) / (high - low)
            b = torch.full_like(hi, -1e-9) if unsigned else lo - s * low
        s = s.clamp_min(1e-8)
        q = torch.clamp(((x - b[..., None]) / s[..., None]).round(), low, high) * s[..., None] + b[..., None]
        errors = (x - q).abs().pow(2.4).mean(-1)  # (shrinkings, rows)
        error, index = errors.min(0)
        better = error < best
        rows = torch.arange(x.shape[0], device=x.device)
        best = torch.where(better, error, best)
        scale = torch.where(better, s[index, rows], scale)
        beta = torch.where(better, b[index, rows], beta)
    return scale, beta


class WeightQuantizer(nn.Module):
    """The elastic quantizer of one layer's weight: per-channel and per-tensor sets, symmetric and
    asymmetric, one slot per bit width. Used as a ``torch.nn.utils.parametrize`` parametrization;
    :attr:`bits`, :attr:`channel` and :attr:`symmetric` select the active setting."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.scale_channel_sym = nn.Parameter(torch.ones(out_channels, SLOTS))
        self.scale_channel_asym = nn.Parameter(torch.ones(out_channels, SLOTS))
        self.beta_channel_asym = nn.Parameter(torch.zeros(out_channels, SLOTS))
        self.scale_tensor_sym = nn.Parameter(torch.ones(1, SLOTS))
        self.scale_tensor_asym = nn.Parameter(torch.ones(1, SLOTS))
        self.beta_tensor_asym = nn.Parameter(torch.zeros(1, SLOTS))
        self.bits, self.channel, self.symmetric = 8, True, True
        self.enabled = True

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Every slot's step size (and offset) from ``weight`` (the code's ``init_quantization_param``)."""
        rows = weight.detach().flatten(1).float()
        whole = rows.reshape(1, -1)
        for slot, bits in enumerate(BITS):
            self.scale_channel_sym[:, slot], _ = initial_range(rows, bits, True, False, factors=5)
            self.scale_channel_asym[:, slot], self.beta_channel_asym[:, slot] = initial_range(rows, bits, False, False)
            self.scale_tensor_sym[:, slot], _ = initial_range(whole, bits, True, False)
            self.scale_tensor_asym[:, slot], self.beta_tensor_asym[:, slot] = initial_range(whole, bits, False, False)

    def step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The active setting's step size ``(out, 1)`` or ``(1, 1)`` and offset (None when symmetric)."""
        slot = self.bits - 2
        kind = "channel" if self.channel else "tensor"
        scale = getattr(self, f"scale_{kind}_{'sym' if self.symmetric else 'asym'}")[:, slot : slot + 1]
        beta = None if self.symmetric else getattr(self, f"beta_{kind}_asym")[:, slot : slot + 1]
        return scale, beta

    def grid(self) -> QuantGrid | None:
        """The active setting as the layer's recorded grid (scale = the learned step), when symmetric;
        None for an asymmetric one, whose real-valued offset no integer zero-point grid holds."""
        if not self.symmetric:
            return None
        scheme = QuantScheme(bits=self.bits, granularity="channel" if self.channel else "tensor", symmetric=True)
        scale = self.step()[0].detach().abs().float().cpu() + EPS
        return QuantGrid(scheme, scale if self.channel else scale.reshape(1), None)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        low, high = code_range(self.bits, False)
        rows = weight.flatten(1).float()
        count = rows.numel() / weight.shape[1] if self.channel else rows.numel()
        factor = (2.0 if self.channel else 1.0) / (high * count) ** 0.5
        scale, beta = self.step()
        scale = grad_scale(scale.abs(), factor)
        beta = torch.zeros((), device=weight.device) if beta is None else grad_scale(beta, factor)
        return fake_quantize(rows, scale, beta, low, high).view_as(weight).to(weight.dtype)


class ActivationQuantizer(nn.Module):
    """The elastic quantizer of one layer's input: per tensor, symmetric and asymmetric sets, one
    slot per bit width; unsigned codes when the calibration inputs were never negative."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_sym = nn.Parameter(torch.ones(SLOTS))
        self.scale_asym = nn.Parameter(torch.ones(SLOTS))
        self.beta_asym = nn.Parameter(torch.zeros(SLOTS))
        self.register_buffer("unsigned", torch.tensor(False))
        self.bits, self.symmetric = 8, True
        self.enabled = True

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Every slot from the calibration inputs ``x`` (the code's ``init_quantization_param``)."""
        whole = x.detach().float().reshape(1, -1)
        self.unsigned.fill_(bool(whole.min() >= -1e-9))
        unsigned = bool(self.unsigned)
        for slot, bits in enumerate(BITS):
            self.scale_sym[slot] = initial_range(whole, bits, True, unsigned)[0][0]
            scale, beta = initial_range(whole, bits, False, unsigned)
            self.scale_asym[slot], self.beta_asym[slot] = scale[0], beta[0]

    def grid(self) -> dict[str, float | bool]:
        """The active setting as numbers a runtime needs: ``x̂ = clamp(round((x - offset) / step)) · step + offset``."""
        slot = self.bits - 2
        scale = (self.scale_sym if self.symmetric else self.scale_asym)[slot].item()
        offset = 0.0 if self.symmetric else self.beta_asym[slot].item()
        return {"step": abs(scale) + EPS, "offset": offset, "unsigned": bool(self.unsigned)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        slot = self.bits - 2
        low, high = code_range(self.bits, bool(self.unsigned))
        factor = 1.0 / (high * x.numel()) ** 0.5
        if self.symmetric:
            scale, beta = grad_scale(self.scale_sym[slot].abs(), factor), torch.zeros((), device=x.device)
        else:
            scale = grad_scale(self.scale_asym[slot].abs(), factor)
            beta = grad_scale(self.beta_asym[slot], factor)
        return fake_quantize(x.float(), scale, beta, low, high).to(x.dtype)
