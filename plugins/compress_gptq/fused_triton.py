"""The Triton kernel of :mod:`compress_gptq.fused` (GPTQ's column loop of one block, fused);
:func:`compress_gptq.fused.emulate` is its torch mirror. Importing this module needs Triton."""

import triton
import triton.language as tl


@triton.jit
def mul_rn(a, b):
    """``a * b`` rounded to float32 on its own: never contracted with a later add into an FMA."""
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rint(a):
    """Round half to even, as ``torch.round``."""
    return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [a], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def columns(
    W,
    Q,
    E,
    S,
    Z,
    F,
    V,
    U,
    rows,
    start,
    stop,
    width,
    qmin,
    qmax,
    ASYMMETRIC: tl.constexpr,
    FROZEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Columns ``[start, stop)`` of a block of ``width`` columns, on ``ROWS`` rows per program.

    ``W, Q, E, S, Z, F, V``: (BLOCK, rows) float32 buffers (``F`` uint8), one row per column;
    ``U``: (BLOCK, BLOCK). ``Z`` (``F``, ``V``) are ignored unless ``ASYMMETRIC`` (``FROZEN``).
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    rmask = r < rows
    inside = c < width
    offsets = c[:, None] * rows + r[None, :]
    mask = inside[:, None] & rmask[None, :]
    slab = tl.load(W + offsets, mask=mask, other=0.0)
    for i in range(start, stop):
        w = tl.sum(tl.where(c[:, None] == i, slab, 0.0), axis=0)
        s = tl.load(S + i * rows + r, mask=rmask, other=1.0)
        t = tl.div_rn(w, s)
        if ASYMMETRIC:
            z = tl.load(Z + i * rows + r, mask=rmask, other=0.0)
            t = t + z
        t = rint(t)
        t = tl.minimum(tl.maximum(t, qmin, tl.PropagateNan.ALL), qmax, tl.PropagateNan.ALL)  # torch.clamp's NaN
        if ASYMMETRIC:
            t = t - z
        q = mul_rn(t, s)
        if FROZEN:
            f = tl.load(F + i * rows + r, mask=rmask, other=0)
            v = tl.load(V + i * rows + r, mask=rmask, other=0.0)
            q = tl.where(f != 0, v, q)
        e = tl.div_rn(w - q, tl.load(U + i * BLOCK + i))
        tl.store(Q + i * rows + r, q, mask=rmask)
        tl.store(E + i * rows + r, e, mask=rmask)
        u = tl.load(U + i * BLOCK + c, mask=inside, other=0.0)
        uu, ee = tl.broadcast(u[:, None], e[None, :])
        slab = tl.where((c[:, None] > i) & inside[:, None], slab - mul_rn(uu, ee), slab)
    tl.store(W + offsets, slab, mask=mask)
