"""Activation points of one block and their initial ranges, searched between percentiles.

From FIMA-Q's code (``quant_layers/matmul.py``, ``calculate_percentile_candidates`` and the
scale search): for each group (the whole tensor, or each attention head) the upper bound
is searched on a line from the 0.99 to the 0.99999 percentile and the lower bound on the
line from the 0.01 to the 0.00001 percentile, ``eq_n`` steps, both moving together; the
grid is asymmetric uniform, ``scale = (upper - lower) / (2**bits - 1)``. Then scales are
expanded to one per token position (and head) and learned during the reconstruction.
This search serves the attention points; the patch embedding's input takes the
code's conv search (``patch.py``), the inputs of Linear
layers take the code's own search (0.9-1.0 percentiles, zero-point grid, output error,
``inputs.py``), and the min-max ranges of ``range_search: false``.

Our choices where the code differs or is unavailable: a candidate is scored by the squared
error of the quantized point itself (FIMA-Q scores the matmul output, which needs the
other operand's quantizer); percentiles are taken over at most 2**20 randomly chosen
values per group; ranges are observed on the block's inputs from the quantized earlier
blocks, with this block's weights unquantized.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from compress.api import (
    ActivationPoint,
    PointQuantization,
    PointScheme,
    UserError,
    point_name,
    site_modules,
    uniform_range_params,
)

PERCENTILES = (0.99, 0.99999)
MAX_VALUES = 2**20


class Recorder(nn.Module):
    """Keeps what passes through a point (detached), passing it on unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.values.append(x.detach())
        return x


@dataclass
class Observed:
    """What :func:`observe` saw: the values at each point, the normalization (module name) whose
    output each layer input is, and the leaf modules that received each normalization's output."""

    values: dict[str, torch.Tensor]
    after_norm: dict[str, str]
    consumers: dict[str, set[str]]


def block_point_names(
    model: nn.Module, block_name: str, block: nn.Module, targets: dict[str, nn.Module], sites: list[str]
) -> list[str]:
    """The points of the block (model-wide names): each target's input, each attention site."""
    names = []
    if "input" in sites:
        names += [point_name(name, "input") for name in targets]
    prefix = "" if block in targets.values() else block_name + "."
    for site in sites:
        if site != "input":
            names += [point_name(prefix + name, site) for name in site_modules(block, site)]
    return names


def observe(model: nn.Module, names: list[str], run) -> Observed:
    """The activations reaching each point while ``run()`` computes the block, which layer
    inputs are a normalization's output as it is (not transformed in between), and which leaf
    modules receive each normalization's output."""
    recorders = {name: Recorder() for name in names}
    norm_outputs: list[tuple[str, torch.Tensor]] = []
    after_norm: dict[str, str | None] = {}
    consumers: dict[str, set[str]] = defaultdict(set)
    modules = dict(model.named_modules())

    def source(value) -> str | None:
        return next((norm for norm, output in norm_outputs if value is output), None)

    def remember(norm: str):
        def hook(_module, _args, output):
            norm_outputs.append((norm, output))

        return hook

    def check(name: str):
        def hook(_module, args):
            norm = source(args[0])
            after_norm[name] = norm if after_norm.get(name, norm) == norm else None

        return hook

    def consume(module_name: str):
        def hook(_module, args, kwargs):
            for value in (*args, *kwargs.values()):
                norm = source(value)
                if norm is not None:
                    consumers[norm].add(module_name)

        return hook

    handles = [m.register_forward_hook(remember(n)) for n, m in modules.items() if type(m).__name__.endswith("Norm")]
    handles += [
        m.register_forward_pre_hook(consume(n), with_kwargs=True)
        for n, m in modules.items()
        if not any(True for _ in m.children())
    ]
    for name in names:
        module, _, site = name.rpartition(":")
        if site == "input":
            handles.append(modules[module].register_forward_pre_hook(check(name)))
    quantization = PointQuantization(model)
    try:
        quantization.add(recorders)
        with torch.no_grad():
            run()
    finally:
        quantization.close()
        for handle in handles:
            handle.remove()
    missing = [name for name, recorder in recorders.items() if not recorder.values]
    if missing:
        raise UserError("the block's forward pass never reached this activation point", missing[0])
    values = {name: torch.cat(recorder.values) for name, recorder in recorders.items()}
    return Observed(values, {name: norm for name, norm in after_norm.items() if norm is not None}, dict(consumers))


def grouped(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """``x`` as ``(groups, values)``: one group, one per head (dim 1 of attention operands),
    or one per channel (the last dim of a layer input)."""
    if granularity == "head":
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if granularity == "channel":
        return x.reshape(-1, x.shape[-1]).T
    return x.reshape(1, -1)


def scale_shape(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "head":
        return (1, x.shape[1], 1, 1)
    if granularity == "channel":
        return (x.shape[-1],)
    return (1,) * x.ndim if x.ndim == 4 else (1,)


def search_range(
    groups: torch.Tensor, scheme: PointScheme, steps: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale and zero point of the percentile candidate with the least squared
    error; with ``steps`` None, the min-max range."""
    groups = groups.float()
    if groups.shape[1] > MAX_VALUES:
        keep = torch.randperm(groups.shape[1], generator=generator, device=groups.device)[:MAX_VALUES]
        groups = groups[:, keep]
    levels = torch.tensor(PERCENTILES if steps else (1.0, 1.0), device=groups.device)
    upper = torch.quantile(groups, levels, dim=1)  # (2, groups)
    lower = torch.quantile(groups, 1 - levels, dim=1)
    best_error = torch.full((groups.shape[0],), float("inf"), device=groups.device)
    best_scale = torch.ones_like(best_error)
    best_zero = torch.zeros_like(best_error)
    for step in torch.linspace(0, 1, (steps or 0) + 1).tolist():
        high = upper[0] + step * (upper[1] - upper[0])
        low = lower[0] + step * (lower[1] - lower[0])
        if scheme.grid == "log2":
            scale, zero = high.clamp(min=1e-8), torch.zeros_like(high)
        else:
            scale, zero = uniform_range_params(low.clamp(max=0), high.clamp(min=0), scheme.bits)
        point = ActivationPoint(scheme, scale[:, None], zero[:, None])
        with torch.no_grad():
            error = (point(groups) - groups).pow(2).sum(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def initial_point(
    x: torch.Tensor, scheme: PointScheme, steps: int | None, generator: torch.Generator
) -> ActivationPoint:
    """The point for activations ``x`` (all observed), its range searched per group (:func:`search_range`)."""
    scale, zero = search_range(grouped(x, scheme.granularity), scheme, steps, generator)
    shape = scale_shape(x, scheme.granularity)
    return ActivationPoint(scheme, scale.view(shape), zero.view(shape))


def per_token(point: ActivationPoint, x: torch.Tensor) -> ActivationPoint:
    """``point`` (per tensor or per head) with its scale and zero point repeated for each token
    position of ``x`` (``(batch, tokens, channels)`` or ``(batch, heads, tokens, dim)``), to be
    learned apart."""

    def spread(values: torch.Tensor) -> torch.Tensor:
        values = values.detach().reshape(1, -1, 1, 1) if x.ndim == 4 else values.detach().reshape(1, 1, 1)
        return values.expand(*values.shape[:-2], x.shape[-2], 1).clone()

    scheme = point.scheme.model_copy(update={"granularity": "token"})
    return ActivationPoint(scheme, spread(point.scale), spread(point.zero_point))
