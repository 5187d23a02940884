"""A layer's learned LSQ+ input quantizer at one setting as the host's activation point.

The dense writer lists ``Context.points`` in ``activation_points.json`` (scales in
``activation_points.safetensors``) and ``compress eval`` quantizes a checkpoint's inputs at
them, so an exported sub-network is evaluated with its inputs quantized as the supernet did.
The point is exactly :class:`compress_eqnet.quantizers.ActivationQuantizer` at that setting:
step ``s = |scale| + 1e-6``; a symmetric grid (offset 0) is the ``uniform`` grid with the
integer zero point ``-code_min`` (``2^(b-1)`` for signed codes, 0 for unsigned ones); an
asymmetric grid's real-valued offset ``β`` is the ``affine`` grid's zero point
``z = -β / s - code_min`` (equal up to float rounding of ``x / s + z`` against ``(x - β) / s``).
"""

from __future__ import annotations

import torch

from compress.api import ActivationPoint, PointScheme
from compress_eqnet.quantizers import EPS, code_range


def input_point(learned: dict[str, torch.Tensor], bits: int, symmetric: bool) -> ActivationPoint:
    """The input quantizer whose state is ``learned`` (``ActivationQuantizer.state_dict()``) at
    ``bits`` and ``symmetric``, frozen, as an activation point of per-tensor scale."""
    slot = bits - 2
    low, _ = code_range(bits, bool(learned["unsigned"]))
    scale = (learned["scale_sym" if symmetric else "scale_asym"][slot].detach().float().abs() + EPS).reshape(1)
    if symmetric:
        zero, grid = torch.full_like(scale, float(-low)), "uniform"
    else:
        zero, grid = -learned["beta_asym"][slot].detach().float().reshape(1) / scale - low, "affine"
    return ActivationPoint(PointScheme(bits=bits, grid=grid, granularity="tensor"), scale, zero)
