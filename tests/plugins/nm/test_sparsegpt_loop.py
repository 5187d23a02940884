"""The SparseGPT column loop (transposed buffers, CUDA-graph ready) against the reference code's
arrangement of the same loop (IST-DASLab/sparsegpt ``fasterprune``: the block as (rows, columns),
one column at a time), written out here as the oracle: equal results for every mask kind,
with and without joint quantization."""

from __future__ import annotations

import pytest
import torch

from compress.hessian import inverse_factor
from compress.quant import QuantGrid, QuantScheme, compute_grid
from compress_nm.patterns import NMPattern, nm_keep_mask, unstructured_keep_mask
from compress_nm.sparsegpt_solve import LoopCache, Mask, prune_in_place
from tests.plugins.nm.test_oneshot import correlated


def reference_prune(W, factor, mask, scheme, block_size, segments):
    """The loop as the reference code arranges it (column slices of a (rows, block) working copy)."""
    rows, columns = W.shape
    pattern = mask.pattern
    if pattern is not None:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    grid = None
    if scheme is not None:
        if scheme.granularity == "group":
            shape = (rows, columns // scheme.group_size)
            zero_point = None if scheme.symmetric else torch.zeros(shape, dtype=torch.int8)
            grid = QuantGrid(scheme, torch.zeros(shape), zero_point)
        else:
            grid = compute_grid(W, scheme)
    W[:, factor.dead] = 0
    Hinv = factor.upper
    row_errors = torch.zeros(rows)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), torch.zeros(rows, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if mask.sparsity is not None:
            saliency = W1.square() / d.square()
            keep = [unstructured_keep_mask(part, mask.sparsity, mask.per_row) for part in saliency.split(segments)]
            pruned = ~torch.cat(keep)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                saliency = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                pruned[:, i : i + pattern.m] = ~nm_keep_mask(saliency, pattern)
            column = i1 + i
            if grid is not None and scheme.granularity == "group" and column % scheme.group_size == 0:
                stop = column + scheme.group_size
                inside = W1[:, i : min(stop, i2) - i1]
                if stop > i2:
                    inside = torch.cat([inside, W[:, i2:stop] - Err1 @ Hinv[i1:i2, i2:stop]], dim=1)
                group = compute_grid(inside, scheme)
                grid.scale[:, column // scheme.group_size] = group.scale[:, 0]
                if grid.zero_point is not None:
                    grid.zero_point[:, column // scheme.group_size] = group.zero_point[:, 0]
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
    return W, row_errors


CASES = {
    "2:4": (Mask(pattern=NMPattern(2, 4)), None),
    "4:8": (Mask(pattern=NMPattern(4, 8)), None),
    "50%": (Mask(sparsity=0.5), None),
    "37.5% per row": (Mask(sparsity=0.375, per_row=True), None),
    "2:4 + W4 g16": (Mask(pattern=NMPattern(2, 4)), QuantScheme(bits=4, granularity="group", group_size=16)),
    "2:4 + W3 g64 asym": (
        Mask(pattern=NMPattern(2, 4)),
        QuantScheme(bits=3, granularity="group", group_size=64, symmetric=False),
    ),
    "50% + W8 channel asym": (Mask(sparsity=0.5), QuantScheme(bits=8, granularity="channel", symmetric=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_column_loop_equals_the_reference_arrangement(case):
    mask, scheme = CASES[case]
    weight, H = correlated(20, 128, seed=3)
    H[5, :] = H[:, 5] = 0  # a dead input
    factor = inverse_factor(H, 0.01, act_order=False)
    segments = [8, 12]
    expected, expected_errors = reference_prune(weight.clone(), factor, mask, scheme, 32, segments)
    loops = LoopCache(cuda_graphs=True)  # graphs are CUDA-only: the same loop runs eagerly here
    for _ in range(2):  # the second solve reuses the cached loop and its buffers
        result = prune_in_place(weight.clone(), factor, mask, scheme, block_size=32, segments=segments, loops=loops)
        assert torch.equal(result.weight, expected)
        assert torch.equal(result.row_errors, expected_errors)
