"""GPTQ (Frantar et al., 2022) as a sequential calibration method.

Definitions follow the paper and the authors' reference implementation
(IST-DASLab/gptq, ``gptq.py``/``llama.py``):

* Hessian ``H = 2/N Σ_n X_n X_nᵀ`` (float32 running average over the N calibration
  sequences, ``X_n`` the layer's input of sequence n, tokens as columns);
* dead inputs (``H_jj = 0``): ``H_jj := 1`` and weight column j := 0;
* dampening ``H += percdamp · mean(diag H) · I``;
* the upper Cholesky factor of ``H⁻¹`` drives the column-by-column quantization, with
  lazy batch updates in column blocks of ``block_size``;
* group grids are computed when the quantizer reaches the group's first column.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.context import Context, OutlierSplit, StageRun
from compress.errors import UserError
from compress.method import BlockMethod, BlockWork, Method, MethodParams, Produces
from compress.quant import QuantGrid, QuantScheme, compute_grid
from compress.sequential import move


class GPTQParams(MethodParams):
    """Parameters of ``gptq``."""

    bits: int = Field(
        ge=2,
        le=8,
        description="Bits per weight (2-8); signed codes in [-2**(bits-1), 2**(bits-1)-1] "
        "(compressed-tensors conventions, the same grid as the reference code's).",
    )
    group_size: int | None = Field(
        128,
        gt=0,
        description="Input columns per group (each group of a row has its own scale); must divide "
        "the layer's input width. null: one scale per output channel (the reference code's "
        "groupsize -1), computed from the whole weight before quantization.",
    )
    symmetric: bool = Field(
        True,
        description="Symmetric grids centred on 0 with no zero point; false adds an int8 zero point.",
    )
    block_size: int = Field(
        128,
        gt=0,
        description="Columns per lazy-batch block: updates inside a block are applied column by "
        "column, to the rest of the weight once per block (same result, fewer memory passes).",
    )
    percdamp: float = Field(
        0.01,
        ge=0.0,
        description="Dampening: percdamp x mean(diag H) is added to the Hessian's diagonal before "
        "the Cholesky factorisation. Raise it (0.1) if a layer's Hessian is not positive definite.",
    )
    act_order: bool = Field(
        False,
        description="Activation ordering: quantize columns by descending diag(H) (the inputs with the "
        "largest second moment first). Combined with groups it uses static groups: every group's "
        "grid is computed up front from the (not yet updated) weight in the original column order, "
        "so the grid keeps the compressed-tensors layout (out, in/group_size) with no g_idx.",
    )
    grid: Literal["compute", "inherit"] = Field(
        "compute",
        description="'compute': GPTQ computes its grids (from the updated weights, group by group). "
        "'inherit': use the grid an earlier stage (e.g. kl_ptq) left in the layer's state; its "
        "scheme must match bits/symmetric/group_size. Weights an earlier stage held apart as "
        "outliers keep their values and absorb no compensation.",
    )
    target: Literal["current", "original"] | None = Field(
        None,
        description="The weights GPTQ approximates (W in ||WX - ŴX||²): 'current' = as the earlier "
        "stages left them; 'original' = the uncompressed model's (context.reference_model()). "
        "Default: 'current' with grid compute, 'original' with grid inherit (the earlier stage "
        "already rounded the weights onto the inherited grid; GPTQ re-chooses the codes against "
        "the original layer output).",
    )
    true_sequential: bool = Field(
        False,
        description="Quantize the block's layers in groups sharing one input (attention q/k/v, then "
        "o, then gate/up, then down), re-collecting each group's Hessian after the earlier groups "
        "are quantized (the reference code's --true-sequential). Off: one Hessian pass per block.",
    )

    @model_validator(mode="after")
    def _scheme_is_valid(self) -> Self:
        self.scheme()
        return self

    def scheme(self) -> QuantScheme:
        if self.group_size is None:
            return QuantScheme(bits=self.bits, symmetric=self.symmetric, granularity="channel")
        return QuantScheme(bits=self.bits, symmetric=self.symmetric, granularity="group", group_size=self.group_size)


class GPTQ(BlockMethod):
    """GPTQ: post-training weight quantization with second-order error compensation.

    Frantar, Ashkboos, Hoefler, Alistarh (2022). Block by block, each targeted Linear layer's
    Hessian H = 2/N Σ X Xᵀ is collected from the block's calibration inputs (the outputs of
    the already-quantized earlier blocks). Columns are then quantized one at a time; each
    column's rounding error, divided by the diagonal of the upper Cholesky factor of the
    dampened H⁻¹, is propagated to the columns not yet quantized (OBS update), so the layer
    output error ||WX − ŴX||² stays small. Column blocks with lazy batch updates, optional
    activation ordering (static groups when combined with groups), dead-input handling as
    in the reference code. The grid is computed group by group from the updated weights,
    or inherited from an earlier stage (grid: inherit, e.g. after kl_ptq: pre-calibration,
    then calibration). Reports per layer the relative output error estimated through H,
    tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), and the same for round-to-nearest on the same grid source.
    """

    name = "gptq"
    Params = GPTQParams

    def check_layer(self, name: str, module: nn.Module) -> None:
        group_size = self.params.group_size
        if group_size is not None and module.in_features % group_size:
            raise UserError(
                f"group_size {group_size} does not divide the input width {module.in_features}", name
            )

    def produces(self) -> Produces:
        return Produces(quant=self.params.scheme())

    def check_previous_stages(self, previous: list[Method]) -> None:
        """Raise UserError when ``grid: inherit`` has no earlier stage leaving a compatible grid."""
        if self.params.grid != "inherit":
            return
        scheme = self.params.scheme()
        schemes = [method.produces().quant for method in previous]
        schemes = [s for s in schemes if s is not None]
        if not schemes:
            raise UserError("gptq with grid: inherit needs an earlier stage that leaves a quantization grid")
        if schemes[-1] != scheme:
            raise UserError(
                f"gptq with grid: inherit has {_describe(scheme)}, but the earlier stage leaves {_describe(schemes[-1])}"
            )

    def apply(self, context: Context, run: StageRun) -> None:
        if self.params.grid == "inherit":  # fail before any calibration pass
            for name in run.targets:
                inherited_grid(context, name, self.params.scheme(), run.targets[name].weight.shape)
        super().apply(context, run)

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        params = self.params
        for name, module in work.targets.items():
            if not torch.isfinite(module.weight.data).all():
                raise UserError("weights contain NaN or inf", name)
        reports: dict[str, dict[str, Any]] = {}
        pending = dict(work.targets)
        order: list[list[str]] | None = None  # layers grouped by shared input, in forward order
        while pending:
            subset = pending if order is None or not params.true_sequential else {n: pending[n] for n in order[0]}
            started = time.perf_counter()
            hessians, groups = collect_hessians(work.block, subset, work.inputs, work.device)
            collect_seconds = time.perf_counter() - started
            if order is None:
                order = groups
                for name in pending:
                    if name not in hessians:
                        raise UserError("the block's forward pass never reached this layer; it cannot be calibrated", name)
            names = order.pop(0) if params.true_sequential else [n for group in order for n in group]
            for name in names:
                module = pending.pop(name)
                reports[name] = self.quantize_module(context, name, module, hessians.pop(name))
                reports[name]["hessian_seconds"] = round(collect_seconds, 4)
        return reports

    def quantize_module(self, context: Context, name: str, module: nn.Module, hessian: Hessian) -> dict[str, Any]:
        params = self.params
        scheme = params.scheme()
        device = module.weight.device
        H = hessian.matrix
        if not torch.isfinite(H).all():
            raise UserError("the calibration activations reaching this layer contain NaN or inf", name)
        target_kind = params.target or ("original" if params.grid == "inherit" else "current")
        current = module.weight.data.float()
        if target_kind == "original":
            target = dict(context.reference_model().named_modules())[name].weight.data.to(device).float()
            if not torch.isfinite(target).all():
                raise UserError("the original weights contain NaN or inf", name)
        else:
            target = current

        grid = frozen = None
        outliers = None
        if params.grid == "inherit":
            grid = inherited_grid(context, name, scheme, module.weight.shape).to(device)
            outliers = context.layers[name].outliers
            if outliers is not None:
                frozen = outliers.mask.to(device)

        started = time.perf_counter()
        result = gptq_quantize(
            target,
            H,
            scheme,
            block_size=params.block_size,
            percdamp=params.percdamp,
            act_order=params.act_order,
            grid=grid,
            frozen=frozen,
            frozen_values=current if frozen is not None else None,
            name=name,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started

        started = time.perf_counter()
        rtn_grid = grid if grid is not None else compute_grid(target, scheme, name)
        rtn = rtn_grid.fake_quantize(target)
        if frozen is not None:
            rtn = torch.where(frozen, current, rtn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rtn_seconds = time.perf_counter() - started

        module.weight.data = result.weight.to(module.weight.dtype)
        context.update_layer(
            name,
            method=self.name,
            quant=result.grid.to("cpu"),
            outliers=None if outliers is None else OutlierSplit(outliers.mask, outliers.grid),
        )
        return {
            "bits": params.bits,
            "group_size": params.group_size,
            "grid": "inherited" if params.grid == "inherit" else result.grid_source,
            "target": target_kind,
            "act_order": params.act_order,
            "percdamp": params.percdamp,
            "damp": result.damp,
            "dead_inputs": result.dead,
            "calibration_samples": hessian.samples,
            "calibration_tokens": hessian.tokens,
            "objective": relative_output_error(target, result.weight, H),
            "rtn_objective": relative_output_error(target, rtn, H),
            "seconds": round(seconds, 4),
            "rtn_seconds": round(rtn_seconds, 4),
        }


def _describe(scheme: QuantScheme) -> str:
    kind = "symmetric" if scheme.symmetric else "asymmetric"
    size = f" group_size {scheme.group_size}" if scheme.granularity == "group" else f" per {scheme.granularity}"
    return f"{scheme.bits}-bit {kind}{size}"


def inherited_grid(context: Context, name: str, scheme: QuantScheme, shape: torch.Size) -> QuantGrid:
    """The grid an earlier stage left on layer ``name``; UserError when absent or incompatible."""
    state = context.layers.get(name)
    if state is None or state.quant is None:
        raise UserError(
            "gptq with grid: inherit needs the grid of an earlier stage (e.g. kl_ptq or rtn), "
            "but no earlier stage left one on this layer",
            name,
        )
    grid = state.quant
    rows, columns = shape
    if scheme.granularity == "group":
        expected = (rows, columns // scheme.group_size)
    else:
        expected = (rows, 1)
    if grid.scheme != scheme or tuple(grid.scale.shape) != expected:
        raise UserError(
            f"gptq with grid: inherit has {_describe(scheme)}, but the grid left by {state.method!r} "
            f"is {_describe(grid.scheme)} with scales of shape {tuple(grid.scale.shape)}",
            name,
        )
    return grid


# ---------------------------------------------------------------------------------------
# Hessians


@dataclass
class Hessian:
    matrix: torch.Tensor
    """``2/N Σ X Xᵀ`` in float32, (in, in)."""
    samples: int = 0
    tokens: int = 0


@torch.no_grad()
def collect_hessians(
    block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple[tuple, dict]], device: torch.device
) -> tuple[dict[str, Hessian], list[list[str]]]:
    """Run ``block`` over ``inputs`` (one sample at a time) and average each layer's Hessian.

    Returns the Hessians and the layers grouped by shared input, in the order the forward
    pass reaches them (for a Llama block: [q, k, v], [o], [gate, up], [down]). Layers that
    read the very same input tensor share one ``X Xᵀ`` product per sample.
    """
    hessians: dict[str, Hessian] = {}
    groups: list[list[str]] = []
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(_module: nn.Module, args: tuple, _output: Any) -> None:
            seen[name] = args[0]

        return capture

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            block(*move(args, device), **move(kwargs, device))
            shared: dict[tuple, list[str]] = {}
            for name, x in seen.items():
                shared.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(name)
            if not groups:
                groups = list(shared.values())
            for names in shared.values():
                x = seen[names[0]]
                batch = x.shape[0] if x.dim() > 2 else 1
                flat = x.reshape(-1, x.shape[-1]).float()
                product = flat.T @ flat
                for name in names:
                    state = hessians.get(name)
                    if state is None:
                        state = hessians[name] = Hessian(torch.zeros_like(product))
                    total = state.samples + batch
                    state.matrix.mul_(state.samples / total).add_(product, alpha=2.0 / total)
                    state.samples = total
                    state.tokens += flat.shape[0]
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return hessians, groups


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """``‖WX − ŴX‖² / ‖WX‖²`` estimated through ``H ∝ X Xᵀ``: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    w = weight.float()
    delta = w - quantized.float()
    error = ((delta @ H) * delta).sum()
    reference = ((w @ H) * w).sum()
    return (error / reference.clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------
# the algorithm


@dataclass
class GPTQResult:
    weight: torch.Tensor
    """Dequantized weights, float32, original column order."""
    grid: QuantGrid
    grid_source: str
    damp: float
    dead: int
    loss: float
    """Σ (w − q)² / (2 d²), the reference code's error estimate (in units of H)."""


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    grid: QuantGrid | None = None,
    frozen: torch.Tensor | None = None,
    frozen_values: torch.Tensor | None = None,
    name: str | None = None,
) -> GPTQResult:
    """Quantize ``weight`` (out, in) with GPTQ given ``hessian`` (in, in); inputs are not changed.

    ``grid``: a fixed grid (inherited); otherwise group grids are computed when the
    quantizer reaches each group's first column, from the weights as updated by the
    columns before it (static groups, from the initial weights, when ``act_order``).
    ``frozen``: bool mask of weights that keep ``frozen_values`` (outliers of an earlier
    stage); they are never re-quantized and absorb no compensation: when reached, the
    difference between their updated value and their kept value is propagated like a
    rounding error.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, columns = W.shape
    device = W.device
    if not torch.isfinite(W).all():
        raise UserError("weights contain NaN or inf", name)
    if not torch.isfinite(H).all():
        raise UserError("the calibration activations reaching this layer contain NaN or inf", name)
    group_size = scheme.group_size if scheme.granularity == "group" else None
    if group_size is not None and columns % group_size:
        raise UserError(f"group_size {group_size} does not divide the input width {columns}", name)

    source = "inherited"
    if grid is None and scheme.granularity != "group":
        # the reference code finds per-channel parameters once, from the weight as given
        grid, source = compute_grid(W, scheme, name), scheme.granularity

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    dynamic = grid is None and not act_order
    if grid is None and act_order:
        grid, source = compute_grid(W, scheme, name), "static-groups"
    if dynamic:
        source = "groups"
        n_groups = columns // group_size
        scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=device)
        zero_point = None if scheme.symmetric else torch.zeros(rows, n_groups, dtype=torch.int8, device=device)
        grid = QuantGrid(scheme, scale, zero_point)
    grid = grid.to(device)

    if frozen is not None:
        frozen = frozen.to(device)
        fixed = frozen_values.detach().float().to(device)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if frozen is not None:
            frozen, fixed = frozen[:, perm], fixed[:, perm]
    order = perm.tolist() if perm is not None else range(columns)

    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise UserError(
            f"the dampened Hessian is not positive definite (percdamp {percdamp}); raise percdamp", name
        ) from None
    if not torch.isfinite(Hinv).all():
        raise UserError(f"the dampened Hessian is singular (percdamp {percdamp}); raise percdamp", name)

    Q = torch.zeros_like(W)
    losses = torch.zeros((), device=device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if dynamic and column % group_size == 0:
                _fill_group(grid, _current(W, W1, Err1, Hinv, i1, i2, i, column + group_size), column, name)
            original_column = order[column]
            w = W1[:, i : i + 1]
            q = grid.dequantize_columns(grid.quantize_columns(w, original_column), original_column)
            if frozen is not None:
                keep = frozen[:, column : column + 1]
                q = torch.where(keep, fixed[:, column : column + 1], q)
            d = Hinv1[i, i]
            Q1[:, i : i + 1] = q
            err = (w - q) / d
            losses += (err.square().sum()) / 2
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q, grid, source, damp.item(), int(dead.sum()), losses.item())


def _current(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int, i: int, stop: int
) -> torch.Tensor:
    """Columns ``[i1 + i, stop)`` with every update of the columns quantized so far applied.

    Inside the block ``W1`` is up to date; columns past the block still miss the block's
    pending (lazy) update, which is applied here for them.
    """
    start = i1 + i
    inside = W1[:, i : min(stop, i2) - i1]
    if stop <= i2:
        return inside
    outside = W[:, i2:stop] - Err1[:, :i] @ Hinv[i1:start, i2:stop]
    return torch.cat([inside, outside], dim=1)


def _fill_group(grid: QuantGrid, columns: torch.Tensor, start: int, name: str | None) -> None:
    """Compute the grid of the group starting at column ``start`` from ``columns`` (out, group_size)."""
    scheme = grid.scheme
    group = compute_grid(columns, scheme, name)
    index = start // scheme.group_size
    grid.scale[:, index] = group.scale[:, 0]
    if grid.zero_point is not None:
        grid.zero_point[:, index] = group.zero_point[:, 0]
