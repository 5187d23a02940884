"""The SparseGPT solve (Frantar & Alistarh, 2023, Algorithm 1), with joint quantization.

Follows the authors' reference code (IST-DASLab/sparsegpt, ``sparsegpt.py: fasterprune``):

* ``U``, the upper Cholesky factor of the dampened ``H⁻¹`` (dead inputs and dampening as
  GPTQ: the host's ``inverse_factor``), drives an OBS update column by column, in blocks of
  ``block_size`` columns with lazy updates of the columns after the block;
* unstructured: at each block's start the mask is chosen adaptively over the block, by the
  OBS saliency ``w² / U_jj²`` of the current (updated) weights;
* N:M: at every M-th column of a block, the ``M − N`` lowest saliencies of the next M
  columns of each row are pruned (the code's ``prunen``/``prunem``);
* each column is masked, then quantized on the grid when quantizing (``--wbits``), and its
  error ``(w − q) / U_jj`` is propagated to the columns not yet processed.

What differs from the reference code, by choice: the unstructured mask prunes exactly
``⌊count · sparsity⌋`` weights of a block (the code's ``tmp <= sort(tmp)[k]`` prunes k + 1,
more on ties); ``per_row`` compares the saliencies within each row of the block; the
grid is the host's (compressed-tensors conventions): per output channel computed once from
the dense weight as the reference code's quantizer, or per group computed when the loop
reaches the group's first column, from the updated weights (as GPTQ's reference code does
with groups). Zero is on every grid, so a pruned weight stays exactly zero. Rows of several
layers reading one input are solved together (rows are independent given ``H``); the
unstructured mask is chosen per layer (``segments``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from compress.api import GraphReplay, InverseFactor, QuantGrid, QuantScheme, check_group_width, compute_grid
from compress_nm.patterns import NMPattern, nm_keep_mask, unstructured_keep_mask


@dataclass(frozen=True)
class Mask:
    """Which weights a solve prunes: an N:M pattern, an unstructured fraction, or none."""

    pattern: NMPattern | None = None
    sparsity: float | None = None
    per_row: bool = False


@dataclass
class PruneResult:
    weight: torch.Tensor
    """Pruned (and quantized) weights, float32."""
    grid: QuantGrid | None
    row_errors: torch.Tensor
    """(rows,) Σ over columns of ``((w − q) / U_jj)²``: ``ΔW H_d ΔWᵀ`` per row, with ``H_d`` the
    dampened Hessian (ΔW = E·U and U H_d Uᵀ = I, as in GPTQ)."""


@torch.no_grad()
def prune_in_place(
    W: torch.Tensor,
    factor: InverseFactor,
    mask: Mask,
    scheme: QuantScheme | None = None,
    *,
    block_size: int = 128,
    segments: list[int] | None = None,
    name: str | None = None,
    loops: LoopCache | None = None,
) -> PruneResult:
    """SparseGPT on a float32 ``W`` (rows, columns) it overwrites, given its Hessian's inverse factor.

    ``segments``: row counts of the layers stacked in ``W`` (default: one layer), over each
    of which an unstructured block mask is chosen. ``scheme``: quantize jointly. ``loops``:
    column loops kept across solves (their buffers and CUDA graphs); default: a fresh one
    without graphs.
    """
    rows, columns = W.shape
    segments = segments or [rows]
    pattern = mask.pattern
    if pattern is not None:
        block_size = max(pattern.m, block_size - block_size % pattern.m)  # M-groups never straddle blocks
    grid, dynamic = None, False
    if scheme is not None:
        check_group_width(scheme, columns, name)
        if scheme.granularity == "group":
            dynamic = True
            shape = (rows, columns // scheme.group_size)
            zero_point = None if scheme.symmetric else torch.zeros(shape, dtype=torch.int8, device=W.device)
            grid = QuantGrid(scheme, torch.zeros(shape, dtype=torch.float32, device=W.device), zero_point)
        else:  # the reference code fits its quantizer once, on the dense weight
            grid = compute_grid(W, scheme, name)
    W[:, factor.dead.to(W.device)] = 0
    Hinv = factor.upper
    loop = (loops or LoopCache(cuda_graphs=False)).get(W.device, rows, block_size, pattern, scheme)
    row_errors = torch.zeros(rows, dtype=torch.float32, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        width = i2 - i1
        loop.load(W[:, i1:i2], Hinv[i1:i2, i1:i2])
        if mask.sparsity is not None:
            loop.set_pruned(~_block_keep(loop.saliency(width), mask, segments))
        if grid is not None and not dynamic:
            loop.set_grid(0, width, grid, i1)
        for start, stop in _cuts(i1, i2, scheme.group_size if dynamic else None):
            column = i1 + start
            if dynamic:
                if column % scheme.group_size == 0:
                    values = _current(loop, W, Hinv, i1, i2, start, column + scheme.group_size)
                    _fill_group(grid, column, values, name)
                loop.set_grid(start, stop, grid, column)
            loop.run(start, stop, width)
        errors = loop.errors(width)
        W[:, i1:i2] = loop.pruned_values(width)
        row_errors += errors.square().sum(1)
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
    return PruneResult(W, grid, row_errors)


def _cuts(i1: int, i2: int, group_size: int | None) -> list[tuple[int, int]]:
    """The block ``[i1, i2)`` cut where quantization groups start (offsets within the block)."""
    cuts = [c - i1 for c in range(i1 + 1, i2) if group_size is not None and c % group_size == 0]
    return list(itertools.pairwise([0, *cuts, i2 - i1]))


class LoopCache:
    """:class:`ColumnLoop` by shape, kept across the solves of a stage so that buffers and CUDA
    graphs are made once per shape (a Llama block has four: q/k/v, o, gate/up, down)."""

    def __init__(self, cuda_graphs: bool = True) -> None:
        self.cuda_graphs = cuda_graphs
        self._loops: dict[tuple, ColumnLoop] = {}

    def get(
        self, device: torch.device, rows: int, block_size: int, pattern: NMPattern | None, scheme: QuantScheme | None
    ) -> ColumnLoop:
        quant = None if scheme is None else (scheme.qmin, scheme.qmax, not scheme.symmetric)
        key = (device, rows, block_size, pattern, quant)
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = ColumnLoop(device, rows, block_size, pattern, quant, self.cuda_graphs)
        return loop

    def clear(self) -> None:
        self._loops.clear()


class ColumnLoop:
    """The column loop of one block (Algorithm 1's inner loop), on fixed buffers.

    The block is held transposed, one contiguous row per weight column (working weights,
    pruned-and-quantized values, scaled errors, pruning mask, per-column scales and zero
    points), with its part of ``U``; ``run(start, stop, width)`` processes columns
    ``[start, stop)``: at every M-th column the N:M mask of the next M columns, then per
    column mask, quantize, scaled error and the update of the block's later columns. The
    operations and their order are the reference loop's (products and quotients of the
    same operands), so the result is the same bit for bit; the transposed layout only makes
    each column's kernels read contiguous memory. On CUDA each distinct ``(start, stop,
    width)`` is captured once as a CUDA graph (:class:`compress.api.GraphReplay`) and
    replayed for the blocks after it.
    """

    def __init__(
        self,
        device: torch.device,
        rows: int,
        block_size: int,
        pattern: NMPattern | None,
        quant: tuple[int, int, bool] | None,
        cuda_graphs: bool,
    ) -> None:
        self.pattern = pattern
        self.quant = quant

        def buffer(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(block_size, rows, dtype=dtype, device=device)

        self.W, self.Q, self.E, self.P = buffer(), buffer(), buffer(), buffer(torch.bool)
        self.S = buffer() if quant is not None else None
        self.Z = buffer() if quant is not None and quant[2] else None
        self.U = torch.zeros(block_size, block_size, dtype=torch.float32, device=device)
        self.d = torch.zeros(block_size, dtype=torch.float32, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.graphs = GraphReplay(device, cuda_graphs, owner="sparsegpt column loop")

    def load(self, block: torch.Tensor, upper: torch.Tensor) -> None:
        width = block.shape[1]
        self.W[:width].copy_(block.T)
        self.U[:width, :width].copy_(upper)
        self.d[:width].copy_(upper.diagonal())
        self.E.zero_()
        self.P.zero_()

    def saliency(self, width: int) -> torch.Tensor:
        """``w² / U_jj²`` of the block's working weights as (rows, width), in row-major order."""
        return self.W[:width].T.contiguous().square() / self.d[:width].square()

    def set_pruned(self, pruned: torch.Tensor) -> None:
        self.P[: pruned.shape[1]].copy_(pruned.T)

    def set_grid(self, start: int, stop: int, grid: QuantGrid, column: int) -> None:
        """The scales (and zero points) of block columns ``[start, stop)``, weight column ``column`` on."""
        scale, zero_point = grid.scale, grid.zero_point  # per channel: (rows, 1), one for every column
        if grid.scheme.granularity == "group":
            groups = torch.arange(column, column + stop - start, device=scale.device) // grid.scheme.group_size
            scale, zero_point = scale[:, groups], None if zero_point is None else zero_point[:, groups]
        self.S[start:stop].copy_(scale.T)
        if self.Z is not None:
            self.Z[start:stop].copy_(zero_point.T)

    def run(self, start: int, stop: int, width: int) -> None:
        self.graphs.run((start, stop, width), lambda: self._columns(start, stop, width))

    def errors(self, width: int) -> torch.Tensor:
        """The block's scaled errors as (rows, width), laid out as the reference code's ``Err1``."""
        return self.E[:width].T.contiguous()

    def pruned_values(self, width: int) -> torch.Tensor:
        return self.Q[:width].T

    def _columns(self, start: int, stop: int, width: int) -> None:
        W, Q, E, P, S, Z, U, d = self.W, self.Q, self.E, self.P, self.S, self.Z, self.U, self.d
        pattern = self.pattern
        for i in range(start, stop):
            if pattern is not None and i % pattern.m == 0:
                group = W[i : i + pattern.m].T.contiguous()
                saliency = group.square() / d[i : i + pattern.m].square()
                P[i : i + pattern.m].copy_(~nm_keep_mask(saliency, pattern).T)
            w, q = W[i], Q[i]
            torch.where(P[i], self.zero, w, out=q)
            if S is not None:
                t = torch.div(q, S[i])
                if Z is not None:
                    t.add_(Z[i])
                t.round_().clamp_(self.quant[0], self.quant[1])
                if Z is not None:
                    t.sub_(Z[i])
                torch.mul(t, S[i], out=q)
            torch.sub(w, q, out=E[i]).div_(d[i])
            if i + 1 < width:
                W[i + 1 : width].sub_(U[i, i + 1 : width, None] * E[i])


def _block_keep(saliency: torch.Tensor, mask: Mask, segments: list[int]) -> torch.Tensor:
    """The unstructured keep mask of one block, chosen within each layer's rows."""
    parts = saliency.split(segments)
    return torch.cat([unstructured_keep_mask(part, mask.sparsity, mask.per_row) for part in parts])


def _current(
    loop: ColumnLoop, W: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int, i: int, stop: int
) -> torch.Tensor:
    """Columns ``[i1 + i, stop)`` with every update of the columns processed so far applied: the
    loop's working copy inside the block, the pending (lazy) block update applied past it."""
    inside = loop.W[i : min(stop, i2) - i1].T
    if stop <= i2:
        return inside
    outside = W[:, i2:stop] - loop.errors(i2 - i1) @ Hinv[i1:i2, i2:stop]  # E is zero from column i on
    return torch.cat([inside, outside], dim=1)


def _fill_group(grid: QuantGrid, column: int, values: torch.Tensor, name: str | None) -> None:
    """Compute the grid of the group starting at ``column`` from its current ``values`` (rows, group_size)."""
    group = compute_grid(values, grid.scheme, name)
    index = column // grid.scheme.group_size
    grid.scale[:, index] = group.scale[:, 0]
    if grid.zero_point is not None:
        grid.zero_point[:, index] = group.zero_point[:, 0]
