"""Activation quantization at named points of a model, beyond what compressed-tensors stores.

:class:`compress.quant.activations.ActivationQuant` is the input quantization of a Linear
layer as compressed-tensors and vLLM store it. The low-bit PTQ methods for vision
transformers (FIMA-Q, RepQ-ViT, I&S-ViT) quantize more, on other grids: the operands of
the two attention matmuls (query, key, the post-softmax probabilities, value) as well as
the Linear inputs, at 2 to 8 bits, with static scales per tensor, per attention head or
per token position. This module holds those quantizers (:class:`ActivationPoint`), the
points' names, and :class:`PointQuantization`, which makes a model compute through them.

A point's name is ``<module>:<site>``: ``<linear or conv>:input`` for a layer's input,
``<attention>:query|key|value|probs`` for the attention modules of transformers models
(those dispatching through ``ALL_ATTENTION_FUNCTIONS``: ViT, Llama and most others). The
attention sites are reached through an attention function registered with transformers'
``AttentionInterface`` (``"compress_points"``): while points are active the model's
``config._attn_implementation`` names it; it computes eager attention with the point
quantizers applied to q and k after the rotary embedding and before key/value heads are
repeated, to v, and to the softmax output; attention modules without points keep the
model's own implementation. No runtime serves these points from a checkpoint: the dense
writer keeps the fake-quantized weights and lists the points (``activation_points.json``,
scales in ``activation_points.safetensors``) for a runtime that would quantize them.

Grids (FIMA-Q's ``quantizers/uniform.py`` and ``quantizers/logarithm.py``):

* ``uniform``, asymmetric: ``q = clamp(round(x / s) + round(z), 0, 2**bits - 1)``,
  ``x̂ = (q - round(z)) s``; rounding passes gradients straight through, so ``s`` (and
  ``z``) are learnable step sizes;
* ``affine``: as ``uniform`` with the zero point not rounded, ``q = clamp(round(x / s + z), 0,
  2**bits - 1)``, ``x̂ = (q - z) s`` (LSQ+'s real-valued offset ``β = -(z + code_min) s``, EQ-Net);
* ``log2`` (for the non-negative softmax output): ``q = clamp(round(-log2(x / s)), 0,
  2**bits - 1)``, ``x̂ = 2**-q s``, and values below the smallest level become 0.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from compress.errors import UserError

ATTENTION_SITES = ("query", "key", "value", "probs")
"""The sites of an attention module: the operands of ``q @ k^T`` and of ``probs @ v``."""
LAYER_SITES = ("input",)
"""The site of a Linear or convolution layer: its input."""
ACTIVATION_SITES = LAYER_SITES + ATTENTION_SITES
IMPLEMENTATION = "compress_points"
"""The name of the attention function in transformers' ``AttentionInterface``."""


class PointScheme(BaseModel):
    """How the activations at one point are mapped to integer codes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(ge=2, le=8, description="Bits per activation (2-8).")
    grid: Literal["uniform", "affine", "log2"] = Field(
        "uniform",
        description="Asymmetric uniform grid; the same with a real-valued zero point (affine: LSQ+'s learned "
        "offset, levels not through 0); or powers of two (non-negative values such as probabilities).",
    )
    granularity: Literal["tensor", "channel", "head", "token"] = Field(
        "tensor",
        description="One scale for the point, one per input channel (layer inputs), one per attention "
        "head, or one per token position (and head, at attention sites); 'token' needs inputs of one length.",
    )


class ActivationPoint(nn.Module):
    """A static fake quantizer at one point: ``scale`` and ``zero_point`` broadcast against the
    activations (shape ``(1,)``, ``(channels,)``, ``(1, heads, 1, 1)``, ``(1, tokens, 1)`` or
    ``(1, heads, tokens, 1)``).

    Both are parameters so that a calibration method can learn them (they do not require
    gradients until it asks). ``drop`` is the fraction of elements passed through
    unquantized on each call (QDrop, during calibration only; 0 at inference).
    """

    def __init__(self, scheme: PointScheme, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.scale = nn.Parameter(scale.detach().float().clone(), requires_grad=False)
        zero = torch.zeros_like(self.scale) if zero_point is None else zero_point.detach().float().clone()
        self.zero_point = nn.Parameter(zero, requires_grad=False)
        self.drop = 0.0

    @property
    def levels(self) -> int:
        return 2**self.scheme.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized (in ``x.dtype``), differentiable in ``x``, ``scale`` and ``zero_point``."""
        scale = self.scale.to(x.device)
        if self.scheme.granularity == "token" and scale.shape[-2] != x.shape[-2]:
            raise UserError(
                f"per-token activation scales were calibrated for {scale.shape[-2]} tokens; "
                f"this input has {x.shape[-2]} (use granularity tensor or head for inputs of varying length)"
            )
        values = x.float()
        if self.scheme.grid == "log2":
            codes = _round_ste(-(values / scale).clamp(1e-15, 1.0).log2())
            quantized = torch.exp2(-codes.clamp(0, self.levels)) * scale * (codes <= self.levels)
        elif self.scheme.grid == "affine":
            zero = self.zero_point.to(x.device)
            quantized = (_round_ste(values / scale + zero).clamp(0, self.levels) - zero) * scale
        else:
            zero = _round_ste(self.zero_point.to(x.device))
            codes = (_round_ste(values / scale) + zero).clamp(0, self.levels)
            quantized = (codes - zero) * scale
        quantized = quantized.to(x.dtype)
        if self.drop > 0:
            return torch.where(torch.rand_like(x, dtype=torch.float32) < self.drop, x, quantized)
        return quantized

    def describe(self) -> dict:
        """The point as ``activation_points.json`` lists it."""
        return {**self.scheme.model_dump(mode="json"), "scale_shape": list(self.scale.shape)}


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def uniform_range_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the asymmetric ``bits``-wide grid spanning ``[low, high]``
    (FIMA-Q's ``(upper - lower) / (2**bits - 1)`` and ``-lower / scale``)."""
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    return scale, (-low / scale).round()


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` computes attention through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    return _dispatches_attention(type(module))


@cache
def _dispatches_attention(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    if forward is None:
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def site_modules(model: nn.Module, site: str) -> dict[str, nn.Module]:
    """The modules of ``model`` that have ``site``: attention modules for the attention sites,
    Linear and convolution layers for ``input``."""
    if site in ATTENTION_SITES:
        return {name: module for name, module in model.named_modules() if is_attention(module)}
    if site in LAYER_SITES:
        return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    raise UserError(f"{site!r} is not an activation point (points: {', '.join(ACTIVATION_SITES)})")


def point_name(module: str, site: str) -> str:
    return f"{module}:{site}"


def split_point(name: str) -> tuple[str, str]:
    module, _, site = name.rpartition(":")
    if site not in ACTIVATION_SITES:
        raise UserError(f"{site!r} is not an activation point (points: {', '.join(ACTIVATION_SITES)})", name)
    return module, site


class PointQuantization:
    """Makes ``model`` compute through activation points; points can be added while it is open.

    Layer inputs are quantized by forward pre-hooks; attention sites by the
    ``compress_points`` attention function, which the model's config names while this is
    open (its former implementation is restored on :meth:`close`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.handles: list[RemovableHandle] = []
        self.sites: list[tuple[nn.Module, str]] = []
        self.switched: list[tuple[object, str | None]] = []

    def add(self, points: Mapping[str, nn.Module]) -> None:
        """Quantize at ``points`` (by point name) from now on: any module that maps a tensor to
        one of its shape (an :class:`ActivationPoint`, or an observer that returns its input)."""
        for name, point in points.items():
            module_name, site = split_point(name)
            if module_name not in self.modules:
                raise UserError("the model has no such module for an activation point", name)
            module = self.modules[module_name]
            if site == "input":
                self.handles.append(module.register_forward_pre_hook(_input_hook(point)))
                continue
            if not is_attention(module):
                raise UserError("not an attention module: attention points need one", name)
            sites = module.__dict__.setdefault("_compress_points", {})
            sites[site] = point
            self.sites.append((module, site))
            self._switch(module)

    def _switch(self, module: nn.Module) -> None:
        config = getattr(module, "config", None)
        if config is None:
            raise UserError("the attention module has no config to dispatch through", type(module).__name__)
        if any(seen is config for seen, _ in self.switched):
            return
        current = config._attn_implementation
        if current == IMPLEMENTATION:
            return
        _register()
        self.switched.append((config, current))
        _FALLBACK[id(config)] = current or "eager"
        config._attn_implementation = IMPLEMENTATION

    def close(self) -> None:
        """Stop quantizing: hooks removed, attention implementations restored."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, site in self.sites:
            module.__dict__.get("_compress_points", {}).pop(site, None)
        self.sites.clear()
        for config, previous in reversed(self.switched):
            config._attn_implementation = previous
            _FALLBACK.pop(id(config), None)
        self.switched.clear()


@contextmanager
def quantized_points(model: nn.Module, points: Mapping[str, ActivationPoint]) -> Iterator[None]:
    """Inside, ``model`` computes with its activations quantized at ``points``."""
    quantization = PointQuantization(model)
    try:
        if points:
            quantization.add(points)
        yield
    finally:
        quantization.close()


def _input_hook(point: ActivationPoint):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (point(args[0]), *args[1:])

    return hook


_FALLBACK: dict[int, str] = {}
"""Per switched config (by id): the implementation that attention modules without points use."""


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, _attention)
        # the masks of sdpa: boolean, or None where a causal flag suffices (handled below)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    points: dict[str, ActivationPoint] = module.__dict__.get("_compress_points", {})
    if not points:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fallback = _FALLBACK.get(id(module.config), "eager")
        if fallback == "eager":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as fallback_function
        else:
            fallback_function = ALL_ATTENTION_FUNCTIONS[fallback]
        return fallback_function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def at(site: str, x: torch.Tensor) -> torch.Tensor:
        return points[site](x) if site in points else x

    query, key, value = at("query", query), at("key", key), at("value", value)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    # sdpa's rule: no mask and a causal module (with more than one query) means a causal mask
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(
            key.shape[2] - query.shape[2]
        )
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = at("probs", probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def points_files(points: Mapping[str, ActivationPoint]) -> dict[str, bytes]:
    """``activation_points.json`` (each point's grid and scale shape, the points a runtime
    must quantize) and ``activation_points.safetensors`` (``<point>.scale`` and
    ``<point>.zero_point``), the files the dense writer adds."""
    from safetensors.torch import save

    listing = {"points": {name: point.describe() for name, point in points.items()}}
    tensors = {}
    for name, point in points.items():
        tensors[f"{name}.scale"] = point.scale.detach().float().cpu().contiguous()
        tensors[f"{name}.zero_point"] = point.zero_point.detach().float().cpu().contiguous()
    return {
        "activation_points.json": (json.dumps(listing, indent=2) + "\n").encode(),
        "activation_points.safetensors": save(tensors),
    }


def read_points(listing: dict, tensors: Mapping[str, torch.Tensor]) -> dict[str, ActivationPoint]:
    """The points :func:`points_files` wrote, from its JSON (parsed) and safetensors (loaded)."""
    points = {}
    for name, entry in listing["points"].items():
        scheme = PointScheme(**{key: entry[key] for key in PointScheme.model_fields})
        points[name] = ActivationPoint(scheme, tensors[f"{name}.scale"], tensors[f"{name}.zero_point"])
    return points


def checkpoint_points(directory: str | Path) -> dict[str, ActivationPoint]:
    """The points a dense checkpoint lists (:func:`points_files`), or none when it lists none
    (or ``directory`` is not a directory: a model name)."""
    listing = Path(directory) / "activation_points.json"
    if not listing.is_file():
        return {}
    from safetensors.torch import load_file

    tensors = load_file(Path(directory) / "activation_points.safetensors")
    return read_points(json.loads(listing.read_text()), tensors)
