"""The GPTQ column loop of one block fused into one kernel (Frantar et al., 2022, Algorithm 1,
the inner loop over the columns of a lazy-update block).

Each program owns a slab of ``ROWS_PER_PROGRAM`` weight rows of the block (held transposed,
one contiguous row per column, as :class:`~compress_gptq.solve.ColumnKernels` keeps it) and
runs the block's columns sequentially on that slab in registers: quantize, scaled error,
rank-1 update of the block's later columns. It writes quantized values, scaled errors and
the updated working block, the buffers the eager loop writes, with the same operations in
the same order: IEEE division (``div.rn``), round-half-even (``cvt.rni``), and products
rounded before the subtraction (``mul.rn``, which the compiler may not contract into an
FMA), so the result is the eager loop's bit for bit.

:func:`emulate` is the kernel written with torch tensor operations, slab by slab, line for
line; tests run it on CPU against the eager loop (Triton does not run there). The kernel
itself is in :mod:`compress_gptq.fused_triton`, imported only on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from compress_gptq.solve import ColumnKernels

ROWS_PER_PROGRAM = 32
Launcher = Callable[["ColumnKernels", int, int, int], None]


def launcher(device: torch.device) -> Launcher | None:
    """The fused column loop for ``device``: the Triton kernel on CUDA when Triton imports, else None."""
    if device.type != "cuda":
        return None
    try:
        from compress_gptq.fused_triton import columns as kernel
    except Exception:
        return None

    def launch(kernels: ColumnKernels, start: int, stop: int, width: int) -> None:
        block, rows = kernels.W.shape
        if block & (block - 1):
            raise ValueError(f"block_size {block} is not a power of two")
        asymmetric, frozen = kernels.Z is not None, kernels.F is not None
        W = kernels.W
        kernel[(-(-rows // ROWS_PER_PROGRAM),)](
            W,
            kernels.Q,
            kernels.E,
            kernels.S,
            kernels.Z if asymmetric else W,
            kernels.F.view(torch.uint8) if frozen else W,
            kernels.V if frozen else W,
            kernels.U,
            rows,
            start,
            stop,
            width,
            float(kernels.qmin),
            float(kernels.qmax),
            ASYMMETRIC=asymmetric,
            FROZEN=frozen,
            BLOCK=block,
            ROWS=ROWS_PER_PROGRAM,
            num_warps=4,
        )

    return launch


def emulate(kernels: ColumnKernels, start: int, stop: int, width: int) -> None:
    """The Triton kernel's algorithm in torch: the same slabs, masks and operation order."""
    W, Q, E, S, Z, F, V, U = kernels.W, kernels.Q, kernels.E, kernels.S, kernels.Z, kernels.F, kernels.V, kernels.U
    block, rows = W.shape
    c = torch.arange(block, device=W.device)
    inside = c < width
    for r0 in range(0, rows, ROWS_PER_PROGRAM):
        r = slice(r0, r0 + ROWS_PER_PROGRAM)
        slab = torch.where(inside[:, None], W[:, r], 0.0)
        for i in range(start, stop):
            w = torch.where(c[:, None] == i, slab, 0.0).sum(0)
            s = S[i, r]
            t = w / s
            if Z is not None:
                t = t + Z[i, r]
            t = t.round().clamp(kernels.qmin, kernels.qmax)  # = minimum(maximum(t, qmin), qmax)
            if Z is not None:
                t = t - Z[i, r]
            q = t * s
            if F is not None:
                q = torch.where(F[i, r], V[i, r], q)
            e = (w - q) / U[i, i]
            Q[i, r] = q
            E[i, r] = e
            u = torch.where(inside, U[i], 0.0)
            slab = torch.where((c[:, None] > i) & inside[:, None], slab - u[:, None] * e[None, :], slab)
        W[:width, r] = slab[:width]
