"""GPTQ (Frantar et al., 2022) as a sequential calibration method: parameters, the
block-by-block driver and the per-layer report. The Hessians come from the host
(``compress.api.collect_hessians``), the solve is in ``solve.py``."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from compress.api import (
    BlockMethod,
    BlockWork,
    CandidateOffer,
    Context,
    Hessian,
    InverseFactor,
    Method,
    OutlierSplit,
    Produces,
    QuantGrid,
    QuantParams,
    QuantScheme,
    StageRun,
    UserError,
    collect_hessians,
    compute_grid,
    h_norms,
    inverse_factor,
    quantizer_price,
    weight_matrix,
)
from compress_gptq.solve import GPTQResult, KernelCache, output_error, quantize_in_place


class GPTQParams(QuantParams):
    """Parameters of ``gptq``: the weight grid (per output channel or per group) and the solve's.

    Per-channel grids (``group_size: null``) are computed once from the whole weight before
    the solve, as the reference code does for ``groupsize -1``; group grids from the updated
    weights, group by group (or all up front with ``act_order``).
    """

    granularities = ("channel", "group")

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
        "outliers keep their values and absorb no compensation. After a stage that holds outliers "
        "apart (kl_ptq), 'compute' is refused: it would put them back on the one grid.",
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
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture the column loop of a block as a CUDA graph and replay it "
        "(same kernels, same result; far fewer launches). false: launch each kernel eagerly.",
    )
    fused_column_loop: bool = Field(
        True,
        description="On CUDA with Triton, run a block's column loop as one fused Triton kernel "
        "(same operations, same result). Falls back to cuda_graphs / eager launches when Triton "
        "is missing or the kernel fails. No effect on CPU.",
    )
    rtn_reference: bool = Field(
        True,
        description="Report round-to-nearest's output error on the same grid source beside GPTQ's "
        "(rtn_objective), for comparison: one more quantization and H-product per layer. false: "
        "skip it (rtn_objective null), as speed benchmarks do; the result is the same.",
    )
    overlap: bool = Field(
        True,
        description="On CUDA, overlap work the data allow to run side by side (bit-identical weights; "
        "1.11 -> 0.98 s per Llama-3-8B-shaped layer on an H200): the "
        "solves of one Hessian pass run on two streams at once, and in sequential mode the next "
        "block's weights are copied to the GPU while a block is quantized and each block is written "
        "back while the next runs (one to two blocks more GPU memory: 3.49 against 2.62 GiB allocated "
        "at that shape). On CPU the same solves run one after another. false: everything in turn, "
        "for the smallest GPU memory.",
    )
    low_precision_products: bool = Field(
        True,
        description="On CUDA with bf16/fp16 activations, multiply them directly into the float32 "
        "Hessian (products are exact in float32) instead of through a float32 copy and TF32. "
        "Falls back to the float32 copy when the mixed-dtype matmul is unavailable. No effect on CPU.",
    )

    def target_kind(self) -> Literal["current", "original"]:
        """The weights GPTQ approximates: ``target``, or its default for ``grid``."""
        return self.target or ("original" if self.grid == "inherit" else "current")


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

    Layers reading the same input (q/k/v, gate/up) share one Hessian and are solved as one
    weight with their rows stacked: rows are independent given H, so each layer gets
    exactly its own solve's result with one column loop instead of one per layer. On CUDA the
    column loop of a block runs as one fused Triton kernel (``fused_column_loop``), else is
    replayed from a CUDA graph (``cuda_graphs``); bf16/fp16 activations are multiplied into
    the float32 Hessians without float32 copies (``low_precision_products``). The solves of
    one Hessian pass are independent, and with ``overlap`` run on two CUDA streams at once
    (:meth:`quantize_groups`), while the engine copies the next block in and the last one out
    (``prefetches_blocks``). The chain itself is sequential: every solve needs the Hessian of
    all calibration samples, and the next block's inputs need every solve of this one.
    """

    name = "gptq"
    Params = GPTQParams
    supported_modules = (nn.Linear, nn.Conv2d)
    offers = CandidateOffer({"group_size": [128], "symmetric": [True]}, needs_inputs=True, price=quantizer_price)

    def check_layer(self, name: str, module: nn.Module) -> None:
        """Convolutions are solved on their unfolded input patches: plain ones only."""
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            raise UserError("gptq handles Conv2d layers with groups 1 and numeric zero padding only", name)

    def produces(self) -> Produces:
        return Produces(quant=self.params.scheme())

    def reads_original_model(self) -> str | None:
        """``target: original`` (given, or the default of ``grid: inherit``) reads the original weights."""
        if self.params.target_kind() == "current":
            return None
        return "target: original" if self.params.target else "grid: inherit, whose default is target: original"

    def check_previous_stages(self, previous: list[Method]) -> None:
        """Raise UserError when ``grid: inherit`` has no earlier stage leaving a compatible grid, or
        when ``grid: compute`` follows a stage that holds outliers apart (they would be requantized
        onto the one grid GPTQ computes, silently)."""
        leaving = [(index, method) for index, method in enumerate(previous) if method.produces().quant is not None]
        if self.params.grid == "compute":
            if leaving and leaving[-1][1].produces().outliers:
                index, method = leaving[-1]
                raise UserError(
                    f"stage {len(previous) + 1} (gptq, grid: compute) would put the outliers stage {index + 1} "
                    f"({method.name}) holds apart back on one grid: set grid: inherit"
                )
            return
        scheme = self.params.scheme()
        if not leaving:
            raise UserError("gptq with grid: inherit needs an earlier stage that leaves a quantization grid")
        inherited = leaving[-1][1].produces().quant
        if inherited != scheme:
            raise UserError(
                f"gptq with grid: inherit has {_describe(scheme)}, but the earlier stage leaves {_describe(inherited)}"
            )

    def __init__(self, params: GPTQParams) -> None:
        super().__init__(params)
        self._kernels = KernelCache(cuda_graphs=params.cuda_graphs, fused=params.fused_column_loop)
        side_lane = KernelCache(cuda_graphs=params.cuda_graphs, fused=params.fused_column_loop)
        self._lane_kernels = (side_lane, self._kernels)  # a lane's buffers are its own

    @contextmanager
    def around_stage(self, context: Context, run: StageRun) -> Iterator[None]:
        if self.params.grid == "inherit":  # fail before any calibration pass
            for name in run.targets:
                inherited_grid(context, name, self.params.scheme(), weight_matrix(run.targets[name].weight).shape)
        try:
            yield
        finally:
            for kernels in self._lane_kernels:
                kernels.clear()

    def prefetches_blocks(self) -> bool:
        """``overlap``: GPTQ changes only the current block's weights."""
        return self.params.overlap

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
            hessians, groups = collect_hessians(
                work.block, subset, work.inputs, work.device, low_precision=params.low_precision_products
            )
            _wait(work.device)
            collect_seconds = time.perf_counter() - started
            if order is None:
                order = groups
                for name in pending:
                    if name not in hessians:
                        raise UserError(
                            "the block's forward pass never reached this layer; it cannot be calibrated", name
                        )
            solves = [order.pop(0)] if params.true_sequential else [order.pop(0) for _ in range(len(order))]
            groups = []
            for names in solves:
                hessian = hessians[names[0]]
                for name in names:  # the solve frees the matrix once nothing else holds it
                    del hessians[name]
                groups.append(({name: pending.pop(name) for name in names}, hessian))
            for name, details in self.quantize_groups(context, groups).items():
                reports[name] = {**details, "hessian_seconds": round(collect_seconds, 4)}
        return reports

    def quantize_groups(
        self, context: Context, groups: list[tuple[dict[str, nn.Module], Hessian]]
    ) -> dict[str, dict[str, Any]]:
        """:meth:`quantize_group` for each group of layers sharing an input; with ``overlap``, the
        groups' solves run side by side (:func:`_solve_lanes`).

        The solves of one Hessian pass are independent of each other, so they may run in any
        order: with ``overlap`` the largest (by input width, the factor's n³) runs on one lane
        while the others follow each other on the second, each lane a host thread with a CUDA
        stream (a side stream, and the compute stream), so one solve's host synchronisations
        (the factor's checks, the dampening read back) do not stall the other's launches. The
        report-only baselines run first, one after another, and the reports after, in order.
        ``seconds`` of a layer is then its share (by rows) of the lanes' wall time.
        """
        if not self.params.overlap or len(groups) < 2:
            reports = {}
            for modules, hessian in groups:
                reports.update(self.quantize_group(context, modules, hessian))
            return reports
        prepared = [self._prepare(context, modules, hessian) for modules, hessian in groups]
        device = prepared[0].layers[0].device
        started = time.perf_counter()
        results = _solve_lanes(prepared, device, self._lane_kernels)
        _wait(device)
        seconds = time.perf_counter() - started
        rows = sum(group.rows for group in prepared)
        reports = {}
        for group, (factor, result) in zip(prepared, results):
            reports.update(self._report(context, group, factor, result, seconds * group.rows / rows))
        return reports

    def quantize_group(
        self, context: Context, modules: dict[str, nn.Module], hessian: Hessian
    ) -> dict[str, dict[str, Any]]:
        """Quantize the layers reading one input as one solve: their rows stacked, one Hessian.

        GPTQ treats rows independently given H (the grids are per row, the updates are row
        by row), so the result is each layer's own solve; only the launches are shared.
        ``seconds`` of a layer is its share (by rows) of the joint solve.
        """
        group = self._prepare(context, modules, hessian)
        started = time.perf_counter()
        factor, result = group.solve(self._kernels)
        _wait(result.weight.device)
        return self._report(context, group, factor, result, time.perf_counter() - started)

    def _prepare(self, context: Context, modules: dict[str, nn.Module], hessian: Hessian) -> _Group:
        """The layers of one joint solve and their report-only baselines (before the solve consumes H)."""
        params = self.params
        inherit = params.grid == "inherit"
        layers = [
            _Layer(context, name, module, params.target_kind(), inherit, params.scheme())
            for name, module in modules.items()
        ]
        baselines = [layer.baselines(hessian.matrix, params.rtn_reference) for layer in layers]
        return _Group(params, layers, hessian, baselines)

    def _report(
        self, context: Context, group: _Group, factor: InverseFactor, result: GPTQResult, seconds: float
    ) -> dict[str, dict[str, Any]]:
        """Install each layer's quantized weights and grid, and report it."""
        params = self.params
        scheme = params.scheme()
        names = [layer.name for layer in group.layers]
        inherit = params.grid == "inherit"
        reports = {}
        total_rows = result.weight.shape[0]
        offset = 0
        for layer, (reference, rtn_error, rtn_seconds) in zip(group.layers, group.baselines):
            rows = slice(offset, offset + layer.rows)
            offset += layer.rows
            weight = result.weight[rows]
            error = output_error(result, factor, layer.target(), rows)
            layer.module.weight.data = weight.to(layer.module.weight.dtype).reshape(layer.module.weight.shape)
            zero_point = None if result.grid.zero_point is None else result.grid.zero_point[rows]
            context.update_layer(
                layer.name,
                method=self.name,
                quant=QuantGrid(scheme, result.grid.scale[rows], zero_point).to("cpu"),
                outliers=None if layer.frozen is None else OutlierSplit(layer.outliers.mask, layer.outliers.grid),
            )
            reports[layer.name] = {
                "bits": params.bits,
                "group_size": params.group_size,
                "grid": "inherited" if inherit else result.grid_source,
                "target": group.target_kind,
                "act_order": params.act_order,
                "percdamp": params.percdamp,
                "damp": result.damp,
                "dead_inputs": result.dead,
                "calibration_samples": group.samples,
                "calibration_tokens": group.tokens,
                "objective": error / max(reference, 1e-30),
                "rtn_objective": None if rtn_error is None else rtn_error / max(reference, 1e-30),
                "seconds": round(seconds * layer.rows / total_rows, 4),
                "solved_with": [name for name in names if name != layer.name],
                "rtn_seconds": round(rtn_seconds, 4),
                "column_loop": result.column_loop,
            }
        return reports


class _Group:
    """The layers reading one input, solved as one weight (their rows stacked) against one Hessian."""

    def __init__(self, params: GPTQParams, layers: list[_Layer], hessian: Hessian, baselines: list[tuple]) -> None:
        self.params, self.layers, self.hessian, self.baselines = params, layers, hessian, baselines
        self.target_kind = params.target_kind()
        self.samples, self.tokens = hessian.samples, hessian.tokens
        self.rows = sum(layer.rows for layer in layers)
        self.width = hessian.matrix.shape[0]

    def solve(self, kernels: KernelCache) -> tuple[InverseFactor, GPTQResult]:
        """The inverse factor (consuming the Hessian) and the column loop on the stacked weights."""
        params, layers = self.params, self.layers
        where = ", ".join(layer.name for layer in layers)
        factor = inverse_factor(self.hessian.release(), params.percdamp, params.act_order, where, consume=True)
        grid = _stack_grids([layer.grid for layer in layers]) if params.grid == "inherit" else None
        frozen = fixed = None
        if any(layer.frozen is not None for layer in layers):
            frozen = torch.cat([layer.frozen_mask() for layer in layers])
            fixed = torch.cat([layer.current for layer in layers]).float()
        result = quantize_in_place(
            torch.cat([layer.target() for layer in layers]).float(),
            factor,
            params.scheme(),
            block_size=params.block_size,
            grid=grid,
            frozen=frozen,
            frozen_values=fixed,
            name=where,
            kernels=kernels,
        )
        return factor, result


def _solve_lanes(
    groups: list[_Group], device: torch.device, kernels: tuple[KernelCache, KernelCache]
) -> list[tuple[InverseFactor, GPTQResult]]:
    """Each group's :meth:`_Group.solve`, on two lanes: the widest group alone on the first, the
    others in order on the second. On CUDA the first lane is a worker thread on a side stream
    (:func:`solve_stream`, waiting for the compute stream's work first; the compute stream waits
    for it at the end), the second the calling thread on the compute stream; elsewhere both
    run one after the other in the calling thread. Returns the results in ``groups``' order;
    an exception (a singular Hessian) is raised once both lanes have stopped, the first lane's
    if both failed (so CUDA and the CPU report the same layer)."""
    widest = max(range(len(groups)), key=lambda index: groups[index].width)
    lanes = [[widest], [index for index in range(len(groups)) if index != widest]]
    results: dict[int, tuple[InverseFactor, GPTQResult]] = {}

    def run(lane: int) -> None:
        for index in lanes[lane]:
            results[index] = groups[index].solve(kernels[lane])

    if device.type != "cuda":
        run(0)
        run(1)
        return [results[index] for index in range(len(groups))]
    compute = torch.cuda.current_stream(device)
    side = solve_stream(device)
    side.wait_stream(compute)  # the Hessians and weights, before the second lane's work is queued
    # the first lane frees its Hessian (made on the compute stream) while the second lane allocates
    # there: the block must not be reused before the side stream has read it
    groups[widest].hessian.matrix.record_stream(side)

    def on_side() -> None:
        with torch.no_grad(), torch.cuda.device(device), torch.cuda.stream(side):
            run(0)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptq-lane") as pool:
        first = pool.submit(on_side)
        try:
            run(1)
        finally:  # the first lane's error comes first, as off CUDA, where that lane runs first
            failed = first.exception()
            if failed is not None:
                raise failed
    compute.wait_stream(side)
    factor, result = results[widest]  # made on the side stream, read on the compute stream from now on
    for tensor in (result.weight, result.row_errors, result.grid.scale, result.grid.zero_point, factor.dead):
        if tensor is not None:
            tensor.record_stream(compute)
    return [results[index] for index in range(len(groups))]


@functools.cache
def solve_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of :func:`_solve_lanes`' first lane (one for the process, so its allocator
    cache is kept from block to block: one pool more than the compute stream's)."""
    return torch.cuda.Stream(device)


class _Layer:
    """One layer of a joint solve: its target weights, inherited grid and outliers."""

    def __init__(
        self, context: Context, name: str, module: nn.Module, target_kind: str, inherit: bool, scheme: QuantScheme
    ) -> None:
        self.context, self.name, self.module, self.target_kind = context, name, module, target_kind
        self.rows = module.weight.shape[0]
        self.device = module.weight.device
        self.current = weight_matrix(module.weight.data)
        self.grid = self.outliers = self.frozen = None
        self._target: torch.Tensor | None = None
        if inherit:
            self.grid = inherited_grid(context, name, scheme, self.current.shape).to(self.device)
            self.outliers = context.layers[name].outliers
            if self.outliers is not None:
                self.frozen = self.outliers.mask.to(self.device)
        self.scheme = scheme

    def target(self) -> torch.Tensor:
        """The weights GPTQ approximates, in their own dtype, on the device (fetched once)."""
        if self.target_kind == "current":
            return self.current
        if self._target is None:
            original = dict(self.context.reference_model().named_modules())[self.name].weight.data
            target = weight_matrix(original).to(self.device)
            if not torch.isfinite(target).all():
                raise UserError("the original weights contain NaN or inf", self.name)
            self._target = target
        return self._target

    def frozen_mask(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        return torch.zeros(self.current.shape, dtype=torch.bool, device=self.device)

    def baselines(self, H: torch.Tensor, rtn: bool = True) -> tuple[float, float | None, float]:
        """``tr(W H Wᵀ)`` and (with ``rtn``, else None) round-to-nearest's ``tr(ΔW H ΔWᵀ)`` (same
        grid source), and the seconds both took (the report's cost, not GPTQ's). Report-only
        figures: on CUDA their products run in TF32 (``h_norms``), about 1e-4 relative."""
        started = time.perf_counter()
        target = self.target().float()
        if not rtn:
            (reference,) = h_norms(H, target, tf32=True)
            return reference, None, time.perf_counter() - started
        grid = self.grid if self.grid is not None else compute_grid(target, self.scheme, self.name)
        rtn = grid.fake_quantize(target)
        if self.frozen is not None:
            rtn = torch.where(self.frozen, self.current.float(), rtn)
        reference, rtn_error = h_norms(H, target, target - rtn, tf32=True)  # synchronises
        return reference, rtn_error, time.perf_counter() - started


def _wait(device: torch.device) -> None:
    """Wait for queued CUDA work, so host clocks measure it (one synchronisation per phase)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stack_grids(grids: list[QuantGrid]) -> QuantGrid:
    """The grids of layers stacked by rows (all share one scheme)."""
    zero_points = [grid.zero_point for grid in grids]
    zero_point = None if zero_points[0] is None else torch.cat(zero_points)
    return QuantGrid(grids[0].scheme, torch.cat([grid.scale for grid in grids]), zero_point)


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
    expected = (rows, columns // scheme.group_size) if scheme.granularity == "group" else (rows, 1)
    if grid.scheme != scheme or tuple(grid.scale.shape) != expected:
        raise UserError(
            f"gptq with grid: inherit has {_describe(scheme)}, but the grid left by {state.method!r} "
            f"is {_describe(grid.scheme)} with scales of shape {tuple(grid.scale.shape)}",
            name,
        )
    return grid
