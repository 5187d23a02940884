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

from dataclasses import dataclass

import torch

from compress.api import InverseFactor, QuantGrid, QuantScheme, check_group_width, compute_grid
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
) -> PruneResult:
    """SparseGPT on a float32 ``W`` (rows, columns) it overwrites, given its Hessian's inverse factor.

    ``segments``: row counts of the layers stacked in ``W`` (default: one layer), over each
    of which an unstructured block mask is chosen. ``scheme``: quantize jointly.
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
    row_errors = torch.zeros(rows, dtype=torch.float32, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if mask.sparsity is not None:
            pruned = ~_block_keep(W1.square() / d.square(), mask, segments)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                saliency = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                pruned[:, i : i + pattern.m] = ~nm_keep_mask(saliency, pattern)
            column = i1 + i
            if dynamic and column % scheme.group_size == 0:
                _fill_group(grid, column, _current(W, W1, Err1, Hinv, i1, i2, i, column + scheme.group_size), name)
            w = W1[:, i]
            q = w.masked_fill(pruned[:, i], 0)
            if grid is not None:
                q = grid.dequantize_columns(grid.quantize_columns(q.unsqueeze(1), column), column).squeeze(1)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        row_errors += Err1.square().sum(1)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return PruneResult(W, grid, row_errors)


def _block_keep(saliency: torch.Tensor, mask: Mask, segments: list[int]) -> torch.Tensor:
    """The unstructured keep mask of one block, chosen within each layer's rows."""
    parts = saliency.split(segments)
    return torch.cat([unstructured_keep_mask(part, mask.sparsity, mask.per_row) for part in parts])


def _current(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i2: int, i: int, stop: int
) -> torch.Tensor:
    """Columns ``[i1 + i, stop)`` with every update of the columns processed so far applied: the
    block's working copy inside the block, the pending (lazy) block update applied past it."""
    inside = W1[:, i : min(stop, i2) - i1]
    if stop <= i2:
        return inside
    outside = W[:, i2:stop] - Err1 @ Hinv[i1:i2, i2:stop]  # Err1 is zero from column i on
    return torch.cat([inside, outside], dim=1)


def _fill_group(grid: QuantGrid, column: int, values: torch.Tensor, name: str | None) -> None:
    """Compute the grid of the group starting at ``column`` from its current ``values`` (rows, group_size)."""
    group = compute_grid(values, grid.scheme, name)
    index = column // grid.scheme.group_size
    grid.scale[:, index] = group.scale[:, 0]
    if grid.zero_point is not None:
        grid.zero_point[:, index] = group.zero_point[:, 0]
