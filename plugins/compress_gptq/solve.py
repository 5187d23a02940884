"""The GPTQ solve (Frantar, Ashkboos, Hoefler, Alistarh 2022, Algorithm 1).

Definitions follow the paper and the authors' reference implementation
(IST-DASLab/gptq, ``gptq.py``):

* dead inputs (``H_jj = 0``): ``H_jj := 1`` and weight column j := 0;
* dampening ``H += percdamp · mean(diag H) · I`` (both in the host's ``inverse_factor``);
* the upper Cholesky factor ``U`` of ``H⁻¹`` drives the column-by-column quantization, with
  lazy batch updates in column blocks of ``block_size``;
* group grids are computed when the quantizer reaches the group's first column.

The arithmetic is the reference code's, operation for operation; only its arrangement
differs, to launch few kernels per column: a block's columns are held transposed (one
contiguous row per column), the scale (and zero point) of every column of a block is laid
out before its column loop, so a column is quantized, its error scaled and propagated
in about ten elementwise kernels with no host synchronisation; on CUDA that loop is
captured once as a CUDA graph and replayed for every block of the same shape, or, with
``fused``, a block's columns run as one Triton kernel (:mod:`compress_gptq.fused`). Rows are
independent given ``H``, so the rows of several layers reading the same input can be
solved as one weight.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch

from compress.api import (
    InverseFactor,
    QuantGrid,
    QuantScheme,
    UserError,
    check_group_width,
    compute_grid,
    inverse_factor,
)
from compress_gptq import fused as fused_loop


@dataclass
class GPTQResult:
    weight: torch.Tensor
    """Dequantized weights, float32, original column order."""
    grid: QuantGrid
    grid_source: str
    damp: float
    dead: int
    column_loop: str
    """``"triton"``, ``"cuda graph"`` or ``"eager"``: how the column loop was launched."""
    row_errors: torch.Tensor
    """(out,) Σ over columns of ``((w − q) / U_jj)²``: per row, ``ΔW H_d ΔWᵀ`` with ``H_d`` the
    dampened Hessian (as ΔW = E·U and U H_d Uᵀ = I); twice the reference code's ``Losses``."""


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
    kernels: KernelCache | None = None,
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
    W = weight.detach().to(torch.float32, copy=True)
    _check(W, scheme, name)
    factor = inverse_factor(hessian, percdamp, act_order, name)
    return quantize_in_place(
        W,
        factor,
        scheme,
        block_size=block_size,
        grid=grid,
        frozen=frozen,
        frozen_values=frozen_values,
        name=name,
        kernels=kernels,
    )


def output_error(result: GPTQResult, factor: InverseFactor, target: torch.Tensor, rows: slice = slice(None)) -> float:
    """``tr(ΔW H ΔWᵀ)`` of ``rows`` of the solve (``target``: those rows' weights), with no H
    (:meth:`compress.api.InverseFactor.output_error`)."""
    return factor.output_error(result.row_errors[rows], target.float() - result.weight[rows])


def _check(W: torch.Tensor, scheme: QuantScheme, name: str | None) -> None:
    if not torch.isfinite(W).all():
        raise UserError("weights contain NaN or inf", name)
    check_group_width(scheme, W.shape[1], name)


@torch.no_grad()
def quantize_in_place(
    W: torch.Tensor,
    factor: InverseFactor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    grid: QuantGrid | None = None,
    frozen: torch.Tensor | None = None,
    frozen_values: torch.Tensor | None = None,
    name: str | None = None,
    kernels: KernelCache | None = None,
) -> GPTQResult:
    """``gptq_quantize`` on a float32 ``W`` it overwrites, given the inverse factor of its Hessian."""
    _check(W, scheme, name)
    rows, columns = W.shape
    device = W.device
    source = "inherited"
    if grid is None and scheme.granularity != "group":
        # the reference code finds per-channel parameters once, from the weight as given
        grid, source = compute_grid(W, scheme, name), scheme.granularity
    W[:, factor.dead.to(device)] = 0
    perm = factor.perm
    dynamic = grid is None and perm is None
    if grid is None and perm is not None:
        grid, source = compute_grid(W, scheme, name), "static-groups"
    if dynamic:
        source = "groups"
        shape = (rows, columns // scheme.group_size)
        zero_point = None if scheme.symmetric else torch.zeros(shape, dtype=torch.int8, device=device)
        grid = QuantGrid(scheme, torch.zeros(shape, dtype=torch.float32, device=device), zero_point)
    grid = grid.to(device)

    fixed = None
    if frozen is not None:
        frozen = frozen.to(device)
        fixed = frozen_values.detach().float().to(device)
    if perm is not None:
        W = W[:, perm]
        if frozen is not None:
            frozen, fixed = frozen[:, perm], fixed[:, perm]
    order = perm if perm is not None else torch.arange(columns, device=device)

    kernels = (kernels or KernelCache()).get(device, rows, block_size, grid, frozen is not None)
    Hinv = factor.upper
    row_errors = torch.zeros(rows, dtype=torch.float32, device=device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        width = i2 - i1
        kernels.load(W[:, i1:i2], Hinv[i1:i2, i1:i2])
        if not dynamic:
            kernels.set_grid(0, width, *_column_params(grid, order[i1:i2]))
        if frozen is not None:
            kernels.set_frozen(frozen[:, i1:i2], fixed[:, i1:i2])
        for start, stop in _segments(i1, i2, scheme.group_size if dynamic else None):
            column = i1 + start
            if dynamic:
                group = column // scheme.group_size
                if column % scheme.group_size == 0:
                    end = column + scheme.group_size
                    _fill_group(grid, group, _current(kernels, W, Hinv, i1, i2, start, end), name)
                kernels.set_grid(start, stop, *_column_params(grid, order[column : column + 1]))
            kernels.run(start, stop, width)
        W[:, i1:i2] = kernels.quantized(width).T
        errors = kernels.errors(width)
        row_errors += errors.square().sum(1)
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]

    if perm is not None:
        W = W[:, torch.argsort(perm)]
    loop = "triton" if kernels.fused else "cuda graph" if kernels.cuda_graphs else "eager"
    return GPTQResult(W, grid, source, factor.damp, int(factor.dead.sum()), loop, row_errors)


def _segments(i1: int, i2: int, group_size: int | None) -> list[tuple[int, int]]:
    """The block ``[i1, i2)`` cut where groups start (offsets within the block)."""
    if group_size is None:
        return [(0, i2 - i1)]
    cuts = [c - i1 for c in range(i1, i2) if c % group_size == 0 and c > i1]
    bounds = [0, *cuts, i2 - i1]
    return list(itertools.pairwise(bounds))


def _column_params(grid: QuantGrid, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``columns`` (original indices), as (k, out) or (1, out) rows."""
    scale, zero_point = grid.scale, grid.zero_point
    if grid.scheme.granularity == "group":
        index = columns // grid.scheme.group_size
        return scale[:, index].T, None if zero_point is None else zero_point[:, index].T
    if scale.dim() == 1:  # one scale for the tensor
        return scale.view(1, 1), None if zero_point is None else zero_point.view(1, 1)
    return scale.T, None if zero_point is None else zero_point.T


def _current(
    kernels: ColumnKernels, W: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int, i: int, stop: int
) -> torch.Tensor:
    """Columns ``[i1 + i, stop)`` with every update of the columns quantized so far applied.

    Inside the block the kernels' working copy is up to date; columns past the block still
    miss the block's pending (lazy) update, which is applied here for them.
    """
    start = i1 + i
    inside = kernels.working(i, min(stop, i2) - i1).T
    if stop <= i2:
        return inside
    outside = W[:, i2:stop] - kernels.errors(i2 - i1)[:, :i] @ Hinv[i1:start, i2:stop]
    return torch.cat([inside, outside], dim=1)


def _fill_group(grid: QuantGrid, index: int, columns: torch.Tensor, name: str | None) -> None:
    """Compute the grid of group ``index`` from its ``columns`` (out, group_size)."""
    group = compute_grid(columns, grid.scheme, name)
    grid.scale[:, index] = group.scale[:, 0]
    if grid.zero_point is not None:
        grid.zero_point[:, index] = group.zero_point[:, 0]


class KernelCache:
    """``ColumnKernels`` by shape, kept across the solves of a stage so their buffers and
    CUDA graphs are made once per shape (a Llama block has three: q/k/v, o and down, gate/up).
    ``fused``: run each block's columns as one fused kernel where :func:`fused.launcher`
    has one for the device (the Triton kernel on CUDA), else as ``cuda_graphs`` says."""

    def __init__(self, cuda_graphs: bool = False, fused: bool = False) -> None:
        self.cuda_graphs, self.fused = cuda_graphs, fused
        self._kernels: dict[tuple, ColumnKernels] = {}

    def get(self, device: torch.device, rows: int, block_size: int, grid: QuantGrid, frozen: bool) -> ColumnKernels:
        key = (device, rows, block_size, grid.scheme.qmin, grid.scheme.qmax, grid.zero_point is not None, frozen)
        kernels = self._kernels.get(key)
        if kernels is None:
            launch = fused_loop.launcher(device) if self.fused else None
            kernels = self._kernels[key] = ColumnKernels(*key, cuda_graphs=self.cuda_graphs, fused=launch)
        return kernels

    def clear(self) -> None:
        self._kernels.clear()


class ColumnKernels:
    """The column loop of one block of ``block_size`` columns, on fixed buffers.

    Buffers hold a block transposed, one contiguous row per column: working weights,
    quantized values, scaled errors, per-column scales (and zero points, frozen masks and
    values), the block's part of ``U``. ``run`` quantizes columns ``[start, stop)``; on CUDA
    with ``cuda_graphs`` each distinct ``(start, stop, width)`` is captured once as a CUDA
    graph and replayed afterwards, so a block costs a few launches instead of about ten per
    column (capturing records the kernels without running them). With ``fused`` (a launcher
    from :mod:`compress_gptq.fused`) ``run`` is one launch; if it raises, the loop falls back
    to the graphs or eager launches for good.
    """

    def __init__(
        self,
        device: torch.device,
        rows: int,
        block_size: int,
        qmin: int,
        qmax: int,
        asymmetric: bool,
        frozen: bool,
        *,
        cuda_graphs: bool,
        fused: fused_loop.Launcher | None = None,
    ) -> None:
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.fused = fused
        self.qmin, self.qmax = qmin, qmax

        def buffer(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(block_size, rows, dtype=dtype, device=device)

        self.W, self.Q, self.E, self.S = buffer(), buffer(), buffer(), buffer()
        self.Z = buffer() if asymmetric else None
        self.F = buffer(torch.bool) if frozen else None
        self.V = buffer() if frozen else None
        self.U = torch.zeros(block_size, block_size, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def load(self, block: torch.Tensor, upper: torch.Tensor) -> None:
        width = block.shape[1]
        self.W[:width].copy_(block.T)
        self.U[:width, :width].copy_(upper)
        self.E.zero_()

    def set_grid(self, start: int, stop: int, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        self.S[start:stop].copy_(scale)
        if self.Z is not None:
            self.Z[start:stop].copy_(zero_point)

    def set_frozen(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        width = mask.shape[1]
        self.F[:width].copy_(mask.T)
        self.V[:width].copy_(values.T)

    def working(self, start: int, stop: int) -> torch.Tensor:
        return self.W[start:stop]

    def quantized(self, width: int) -> torch.Tensor:
        return self.Q[:width]

    def errors(self, width: int) -> torch.Tensor:
        """The block's scaled errors as (out, width), laid out as the reference code's ``Err1``."""
        return self.E[:width].T.contiguous()

    def run(self, start: int, stop: int, width: int) -> None:
        if self.fused is not None:
            try:
                self.fused(self, start, stop, width)
                return
            except Exception as error:
                self.fused = None
                warnings.warn(f"gptq: the fused column loop failed ({error}); using the unfused loop", stacklevel=2)
        graph = self._graphs.get((start, stop, width))
        if graph is not None:
            graph.replay()
            return
        # eagerly the first time: the block's work, and every kernel loaded before a capture
        self._columns(start, stop, width)
        if self.cuda_graphs:
            self._capture(start, stop, width)

    def _capture(self, start: int, stop: int, width: int) -> None:
        """Record (not run) the loop as a CUDA graph; fall back to eager launches if that fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            # solves may run on two threads at once (gptq's overlap): errors of this thread only,
            # and a capture stream no other work is queued on (torch draws streams round-robin
            # from a pool per priority; the other side streams are all of the default priority)
            stream = torch.cuda.Stream(self.device, priority=-1)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._columns(start, stop, width)
        except RuntimeError as error:
            self.cuda_graphs = False
            warnings.warn(
                f"gptq: capturing the column loop as a CUDA graph failed ({error}); launching eagerly", stacklevel=2
            )
            return
        self._graphs[(start, stop, width)] = graph

    def _columns(self, start: int, stop: int, width: int) -> None:
        """Quantize columns ``[start, stop)`` of the block and propagate their errors inside it."""
        W, Q, E, S, Z, U = self.W, self.Q, self.E, self.S, self.Z, self.U
        for i in range(start, stop):
            w, q, e = W[i], Q[i], E[i]
            t = torch.div(w, S[i])
            if Z is not None:
                t.add_(Z[i])
            t.round_().clamp_(self.qmin, self.qmax)
            if Z is not None:
                t.sub_(Z[i])
            torch.mul(t, S[i], out=q)
            if self.F is not None:
                torch.where(self.F[i], self.V[i], q, out=q)
            torch.sub(w, q, out=e)
            e.div_(U[i, i])
            if i + 1 < width:
                W[i + 1 : width].sub_(U[i, i + 1 : width, None] * e)
