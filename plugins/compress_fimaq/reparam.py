"""RepQ-ViT's reparameterization of post-LayerNorm activations, as FIMA-Q's code applies it.

From FIMA-Q's code (``quant_layers/linear.py``, ``AsymmetricallyChannelWiseBatchingQuantLinear
.reparam_step1`` and ``reparam``; RepQ-ViT, Li et al., ICCV 2023): the input of a Linear
that reads a LayerNorm's output is first calibrated with one scale ``s_c`` and zero point
``z_c`` per channel; the layer-wise target is their mean, ``s = mean(s_c)`` and
``z = round(mean(z_c))``; with ``r = s_c / s`` and ``b = (-z_c s_c) / r - (-z s)`` the
LayerNorm's affine becomes ``γ / r`` and ``β / r - b`` (its output ``x / r - b``), and the
Linear compensates, ``W ← W diag(r)`` then ``bias ← bias + W b``, so the float model is
unchanged. The input is then quantized per tensor, its range searched again on the new
activations (the code reruns its per-tensor search from scratch), then spread per token.

Where this differs: the code folds a LayerNorm into the one Linear reading it (timm's fused
``qkv``, ``fc1``, Swin's ``reduction``); here every Linear reading the same LayerNorm output
(transformers' separate ``query``, ``key``, ``value``) is compensated, with the ranges of
that shared input. The code folds only when the activation bits equal the weight bits and
never for the classifier; here every post-LayerNorm input inside a block is folded when the
option is on, whatever the bits. A LayerNorm is folded only when it has a bias, each Linear
reading it has a bias (adding one would change the checkpoint's layout), and nothing but
those targeted Linears receives its output (leaf modules are checked; a functional use of
the output inside a module's ``forward`` cannot be seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Fold:
    """The per-channel factor ``r`` and shift ``b`` of one folded LayerNorm, and the per-tensor
    scale and zero point its output was moved onto."""

    ratio: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The activations ``x`` (channels last) as the folded LayerNorm now produces them."""
        return (x.float() / self.ratio - self.shift).to(x.dtype)


def layer_target(scale: torch.Tensor, zero_point: torch.Tensor) -> Fold:
    """The fold that moves per-channel ranges (``scale``, ``zero_point``: one per channel) onto
    their mean scale and rounded mean zero point (FIMA-Q's ``reparam_step1``)."""
    scale, zero_point = scale.float(), zero_point.float()
    target_scale = scale.mean().view(1)
    target_zero = zero_point.mean().round().view(1)
    ratio = scale / target_scale
    shift = -zero_point * scale / ratio + target_zero * target_scale
    return Fold(ratio, shift, target_scale, target_zero)


def foldable(norm: nn.Module, linears: list[nn.Module]) -> bool:
    """Whether ``norm`` is a LayerNorm whose affine can absorb the fold into ``linears``."""
    affine = isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
    return affine and bool(linears) and all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)


@torch.no_grad()
def fold(norm: nn.LayerNorm, linears: list[nn.Linear], scale: torch.Tensor, zero_point: torch.Tensor) -> Fold:
    """Fold the per-channel ranges (``scale``, ``zero_point``) of ``norm``'s output into its affine
    and compensate in ``linears`` (every Linear reading that output); returns the fold."""
    result = layer_target(scale.to(norm.weight.device), zero_point.to(norm.weight.device))
    ratio, shift = result.ratio, result.shift
    norm.weight.copy_((norm.weight.float() / ratio).to(norm.weight.dtype))
    norm.bias.copy_((norm.bias.float() / ratio - shift).to(norm.bias.dtype))
    for linear in linears:
        weight = linear.weight.float() * ratio
        linear.bias.copy_((linear.bias.float() + weight @ shift).to(linear.bias.dtype))
        linear.weight.copy_(weight.to(linear.weight.dtype))
    return result
