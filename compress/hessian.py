"""Second-order statistics of a layer's inputs, collected from a block's calibration inputs.

* ``H = 2/N Σ_n X_n X_nᵀ`` (GPTQ, Frantar et al., 2022, section 3; SparseGPT, Frantar &
  Alistarh, 2023, uses the same matrix): :func:`collect_hessians`;
* the per-input norms ``‖X_j‖₂`` that Wanda (Sun et al., 2023) scores weights with, without
  the (in, in) matrix: :func:`collect_input_norms` (a running sum of squares, as the
  reference code's ``WrappedGPT.add_batch``), or :meth:`Hessian.input_norms` (its diagonal);
* the upper Cholesky factor of the dampened ``H⁻¹`` that GPTQ's and SparseGPT's column
  loops use: :func:`inverse_factor`;
* output errors measured through ``H``: :func:`h_norms`, :func:`relative_output_error`.

Layers that read the very same input tensor (q/k/v, gate/up) share one statistic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.devices import on_device
from compress.errors import UserError

ROWS_PER_CHUNK = 1024
"""Rows of a weight handled at once when measuring errors through H (bounds temporaries)."""

BAND_BYTES = 64 * 2**20
"""Largest float32 temporary of :func:`_add_in_bands`."""

CUDA_PRODUCT_BYTES = 128 * 2**20
"""On CUDA, float32 bytes of activations gathered per input before one ``X Xᵀ`` product:
8192 rows (4 samples of 2048 tokens) of a 4096-wide input, one sample of a 14336-wide one."""


@dataclass
class Hessian:
    """One Hessian, shared by every layer that reads the same input tensor."""

    matrix: torch.Tensor | None
    """``2/N Σ X Xᵀ`` in float32, (in, in); None once a solve has consumed it."""
    samples: int = 0
    tokens: int = 0

    def release(self) -> torch.Tensor:
        """The matrix, dropping this object's reference (the caller may overwrite it)."""
        matrix, self.matrix = self.matrix, None
        return matrix

    def input_norms(self) -> torch.Tensor:
        """``√(Σ_n ‖X_n,j‖² / N)`` per input j, from the diagonal (what :class:`InputNorms` gives)."""
        return (self.matrix.diagonal() / 2).sqrt()


@dataclass
class InputNorms:
    """Per-input sums of squares, shared by every layer that reads the same input tensor."""

    squares: torch.Tensor
    """``Σ_n Σ_tokens x_j²`` in float32, (in,)."""
    samples: int = 0
    tokens: int = 0

    def norms(self) -> torch.Tensor:
        """``√(Σ_n ‖X_n,j‖² / N)``: the reference code's ``sqrt(scaler_row)`` (a mean over samples)."""
        return (self.squares / max(self.samples, 1)).sqrt()


@contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """Inside, CUDA float32 matmuls may run in TF32 when ``allowed`` (else as the caller had it)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed or previous
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _exact_tf32(dtype: torch.dtype, device: torch.device) -> AbstractContextManager[None]:
    """Allow TF32 matmuls when the activations are bf16 or fp16 on CUDA.

    TF32 keeps 10 mantissa bits, so bf16 (7) and fp16 (10) values converted to float32 are
    represented exactly and so are their products; accumulation stays float32 (on the
    tensor cores, whose summation order and rounding differ slightly from the CUDA cores').
    Float32 activations keep full float32 matmuls.
    """
    return _tf32(device.type == "cuda" and dtype in (torch.bfloat16, torch.float16))


def _low_precision(flat: torch.Tensor) -> bool:
    return flat.device.type == "cuda" and flat.dtype in (torch.bfloat16, torch.float16)


def _add_in_place(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += aᵀb`` in one cuBLAS call, no temporary (a torch whose ``addmm`` takes a float32
    input with bf16/fp16 factors)."""
    torch.addmm(out, a.T, b, out_dtype=torch.float32, out=out)


def _add_in_bands(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += aᵀb`` a band of rows of ``out`` at a time, through float32 temporaries of at most
    ``BAND_BYTES`` (``mm`` with ``out_dtype``, where ``addmm`` wants its input in a's dtype)."""
    rows = max(1, BAND_BYTES // (4 * out.shape[1]))
    for start in range(0, out.shape[0], rows):
        out[start : start + rows].add_(torch.mm(a[:, start : start + rows].T, b, out_dtype=torch.float32))


LOW_PRECISION_FORMS = (_add_in_place, _add_in_bands)
"""Ways to add bf16/fp16 products into a float32 Hessian, tried in order."""

TRIANGLE_ROWS = 1024
"""Rows of ``H`` per product when only its upper triangle is multiplied (see ``_RunningProduct``):
a 4096-wide input takes 62 % of the full product's multiplications, a 14336-wide one 54 %."""

CUDA_TRIANGLE = True
"""Whether :func:`collect_hessians` multiplies only the upper triangle on CUDA by default."""


def _triangle_bands(width: int, triangle: bool) -> list[tuple[int, int]]:
    """Row bands ``[r0, r1)`` of ``H`` whose columns ``r0:`` a product fills: the whole matrix in
    one band, or with ``triangle`` bands of ``TRIANGLE_ROWS`` covering the upper triangle."""
    if not triangle:
        return [(0, width)]
    return [(r0, min(r0 + TRIANGLE_ROWS, width)) for r0 in range(0, width, TRIANGLE_ROWS)]


class _RunningProduct:
    """``Σ X Xᵀ`` of one input, in float32, fed through a staging buffer of ``capacity`` rows.

    Samples are copied into the buffer as they arrive and multiplied once it is full, so
    several samples make one larger product; a sample larger than the buffer is multiplied
    directly (``capacity`` 0, or below two samples: one product per sample). With
    ``low_precision``, bf16/fp16 activations on CUDA stay in their dtype (so does the
    buffer) and are multiplied straight into the float32 sum (``LOW_PRECISION_FORMS``: the
    first that this torch runs); products of bf16/fp16 values are exact in float32, so only
    the accumulation order differs from the float32 path, which is taken for good if no form
    runs. With ``triangle``, each product fills only the bands of ``H`` on and above the
    diagonal (``_triangle_bands``: about half the multiplications for a wide input), and
    ``finish`` copies the upper triangle onto the lower one; entries differ from the full
    product's by summation order only. ``finish`` scales the sum to ``2/N``.
    """

    def __init__(self, state: Hessian, capacity: int, low_precision: bool = False, triangle: bool = False) -> None:
        self.state, self.capacity = state, capacity
        self.forms = list(LOW_PRECISION_FORMS) if low_precision else []
        self.bands = _triangle_bands(state.matrix.shape[0], triangle)
        self.staging: torch.Tensor | None = None
        self.filled = 0
        self.dtype = torch.float32  # the activations'

    def add(self, flat: torch.Tensor) -> None:
        rows = flat.shape[0]
        if self.staging is None and 2 * rows > self.capacity:
            self.capacity = 0  # a buffer for fewer than two samples would only add a copy
        if self.filled + rows > self.capacity:
            self.flush()
        self.dtype = flat.dtype
        if rows > self.capacity:
            self._product(flat)
            return
        if self.staging is None:
            dtype = flat.dtype if self.forms and _low_precision(flat) else torch.float32
            self.staging = torch.empty(self.capacity, flat.shape[1], dtype=dtype, device=flat.device)
        self.staging[self.filled : self.filled + rows].copy_(flat)
        self.filled += rows

    def flush(self) -> None:
        if self.filled:
            self._product(self.staging[: self.filled])
            self.filled = 0

    def finish(self) -> None:
        self.flush()
        H = self.state.matrix
        for r0, r1 in self.bands[1:]:
            H[r0:r1, :r0].copy_(H[:r0, r0:r1].T)
        H.mul_(2.0 / self.state.samples)

    def _product(self, flat: torch.Tensor) -> None:
        H = self.state.matrix
        wide = None
        for r0, r1 in self.bands:
            out = H[r0:r1, r0:]
            while self.forms and _low_precision(flat):
                try:
                    self.forms[0](out, flat[:, r0:r1], flat[:, r0:])
                    break
                except (RuntimeError, TypeError) as error:  # rejected before any work: the band is unchanged
                    self.forms.pop(0)
                    if not self.forms:
                        warnings.warn(
                            f"bf16/fp16 Hessian products unavailable ({error}); using float32 copies", stacklevel=2
                        )
            else:
                if wide is None:
                    wide = flat.float()
                with _exact_tf32(self.dtype, flat.device):  # the activations' dtype, not the staging's
                    out.addmm_(wide[:, r0:r1].T, wide[:, r0:])


class _RunningSquares:
    """``Σ x_j²`` of one input, in float32 (no staging: the sum is elementwise)."""

    def __init__(self, state: InputNorms) -> None:
        self.state = state

    def add(self, flat: torch.Tensor) -> None:
        self.state.squares.add_(torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square_())

    def finish(self) -> None:
        pass


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list[tuple[tuple, dict]],
    device: torch.device,
    product_bytes: int | None = None,
    low_precision: bool = False,
    triangle: bool | None = None,
) -> tuple[dict[str, Hessian], list[list[str]]]:
    """Run ``block`` over ``inputs`` (one sample at a time) and average each layer's Hessian.

    Returns the Hessians and the layers grouped by shared input, in the order the forward
    pass reaches them (for a Llama block: [q, k, v], [o], [gate, up], [down]). Layers that
    read the very same input tensor share one ``Hessian`` object. Activations are added
    into a float32 running sum in place (addmm, no temporary product), gathered up to
    ``product_bytes`` of float32 rows per input for each product (default:
    ``CUDA_PRODUCT_BYTES`` on CUDA, 0 = one product per sample elsewhere); the sum is
    scaled by ``2/N`` at the end. ``low_precision``: bf16/fp16 activations on CUDA are
    multiplied in their dtype into the float32 sum (see ``_RunningProduct``). ``triangle``:
    multiply only the upper triangle's bands and mirror them (default ``CUDA_TRIANGLE`` on
    CUDA; off elsewhere, so CPU sums stay those of one full product per sample).
    """
    if product_bytes is None:
        product_bytes = CUDA_PRODUCT_BYTES if device.type == "cuda" else 0
    if triangle is None:
        triangle = CUDA_TRIANGLE and device.type == "cuda"

    def start(flat: torch.Tensor) -> tuple[Hessian, _RunningProduct]:
        width = flat.shape[1]
        state = Hessian(torch.zeros(width, width, dtype=torch.float32, device=flat.device))
        return state, _RunningProduct(state, product_bytes // (4 * width), low_precision, triangle)

    return _collect(block, layers, inputs, device, start)


@torch.no_grad()
def collect_input_norms(
    block: nn.Module, layers: dict[str, nn.Module], inputs: list[tuple[tuple, dict]], device: torch.device
) -> tuple[dict[str, InputNorms], list[list[str]]]:
    """Run ``block`` over ``inputs`` and sum each layer's squared inputs per input column.

    Same grouping and return shape as :func:`collect_hessians`, at the cost of a vector per
    input instead of a matrix: what Wanda needs.
    """

    def start(flat: torch.Tensor) -> tuple[InputNorms, _RunningSquares]:
        state = InputNorms(torch.zeros(flat.shape[1], dtype=torch.float32, device=flat.device))
        return state, _RunningSquares(state)

    return _collect(block, layers, inputs, device, start)


class _AllInputsSeen(Exception):
    """Raised before the last layer of a sample's forward runs: every input is in, and the rest of
    the block's forward (whose output is discarded) need not run."""


def _collect(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list[tuple[tuple, dict]],
    device: torch.device,
    start: Callable[[torch.Tensor], tuple[Any, Any]],
) -> tuple[dict[str, Any], list[list[str]]]:
    """Forward ``inputs`` through ``block``, feeding each distinct layer input's rows to one
    accumulator (``start(rows)`` makes a state and its accumulator on first sight).

    The first sample runs the whole block and shows the order the layers are reached in. When it
    called each layer once, later samples stop as the last layer to be reached is called, once
    every other layer's input of that sample is in (for a Llama block: before down_proj's
    product, a quarter of the block's work). A sample that did not reach every layer by then (a
    mixture of experts routing elsewhere) runs to the end as the first did.
    """
    states: dict[str, Any] = {}
    accumulators: dict[int, Any] = {}
    groups: list[list[str]] = []
    seen: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(layers, 0)

    def hook(name: str):
        def capture(_module: nn.Module, args: tuple, _output: Any) -> None:
            seen[name] = args[0]
            calls[name] += 1

        return capture

    def stop_before(name: str):
        def last_called(_module: nn.Module, args: tuple) -> None:
            seen[name] = args[0]
            if len(seen) == len(layers):
                raise _AllInputsSeen

        return last_called

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        for args, kwargs in on_device(inputs, device):
            with suppress(_AllInputsSeen):
                block(*args, **kwargs)
            shared: dict[tuple, list[str]] = {}
            for name, x in seen.items():
                shared.setdefault((x.data_ptr(), tuple(x.shape), x.stride(), _patches(layers[name])), []).append(name)
            if not groups:
                groups = list(shared.values())
                if set(calls.values()) == {1}:
                    last = next(reversed(seen))  # the last layer to finish, so the last to start in a chain
                    handles.append(layers[last].register_forward_pre_hook(stop_before(last)))
            for names in shared.values():
                x = seen[names[0]]
                flat = input_rows(layers[names[0]], x)
                state = states.get(names[0])
                if state is None:
                    state, accumulators[id(state)] = start(flat)
                    states.update(dict.fromkeys(names, state))
                state.samples += x.shape[0] if x.dim() > 2 else 1
                state.tokens += flat.shape[0]
                accumulators[id(state)].add(flat)
                del flat
            seen.clear()
        for accumulator in accumulators.values():
            accumulator.finish()
    finally:
        for handle in handles:
            handle.remove()
    return states, groups


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight matrix multiplies (``compress.api.weight_matrix``): a Linear's
    input vectors; a Conv2d's input patches, unfolded with its kernel, dilation, padding and
    stride as the reference code's ``add_batch`` does (``nn.Unfold``)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).flatten(0, 1)
    return x.reshape(-1, x.shape[-1])


def _patches(module: nn.Module) -> tuple | None:
    """What besides the input tensor decides a layer's rows: a convolution's unfolding."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size, module.dilation, module.padding, module.stride
    return None


@dataclass
class InverseFactor:
    """``U``, the upper Cholesky factor of the dampened ``H⁻¹``, in the solve's column order."""

    upper: torch.Tensor
    perm: torch.Tensor | None
    """Column order (activation ordering), or None for the natural order."""
    dead: torch.Tensor
    """bool (in,): inputs that never fire (``H_jj = 0``), natural order."""
    damp: float

    def output_error(self, row_errors: torch.Tensor, delta: torch.Tensor) -> float:
        """``tr(ΔW H ΔWᵀ)`` of a column loop's rows, with no H: ``delta`` (rows, in) is ΔW and
        ``row_errors`` its rows' Σ ``((w − q) / U_jj)²``.

        The loop makes ΔW = E·U and U H_d Uᵀ = I, so ``ΔW H_d ΔWᵀ = E Eᵀ`` (``row_errors``); the
        dampening's share ``damp·‖ΔW‖²`` is taken off. Dead columns add nothing: H is zero there.
        """
        delta = delta.float().masked_fill(self.dead.to(delta.device), 0)
        errors, damped = torch.stack([row_errors.sum(), delta.square().sum()]).tolist()  # one sync
        return errors - self.damp * damped


FACTOR_ROUTES = ("inverse", "reversed")
"""How :func:`inverse_factor` computes ``U`` (the same matrix, other rounding): ``"inverse"``
as the reference code, ``chol(cholesky_inverse(chol(H)))ᵀ``; ``"reversed"`` from one
Cholesky factor of the reversed matrix, ``U = J L⁻¹ J`` with ``J H J = L Lᵀ``."""

CUDA_FACTOR_ROUTE = "reversed"
"""The route on CUDA. There ``cholesky_inverse`` solves against the identity (cuSOLVER
``potrs``, 2n³ flops), so the reference route costs about 2.7n³ and the reversed one 1.3n³
(one ``potrf``, one ``trsm``): for a 14336-wide down_proj Hessian, the largest part of the
solve. Elsewhere the reference route is kept (LAPACK's ``potri`` makes both cost about the
same there), so CPU results stay bit for bit the reference code's."""


def inverse_factor(
    hessian: torch.Tensor,
    percdamp: float,
    act_order: bool,
    name: str | None = None,
    *,
    consume: bool = False,
    route: str | None = None,
) -> InverseFactor:
    """Dead inputs, ordering, dampening and ``U``, as GPTQ's and SparseGPT's reference code
    (``gptq.py: fasterquant``, ``sparsegpt.py: fasterprune``): ``H_jj := 1`` where ``H_jj = 0``
    (the caller zeroes those weight columns), ``H += percdamp · mean(diag H) · I``,
    ``U = chol(H⁻¹)ᵀ``. ``act_order``: columns by descending ``diag H`` (GPTQ only).
    ``consume``: ``hessian`` may be overwritten and is released as soon as its Cholesky
    factor exists (the caller must hold no other reference for the memory to go).
    ``route``: one of ``FACTOR_ROUTES``; default ``CUDA_FACTOR_ROUTE`` on CUDA, else ``"inverse"``."""
    H = hessian if consume else hessian.detach().float().clone()
    del hessian
    if route is None:
        route = CUDA_FACTOR_ROUTE if H.device.type == "cuda" else "inverse"
    if route not in FACTOR_ROUTES:
        raise ValueError(f"route must be one of {FACTOR_ROUTES}, not {route!r}")
    if not torch.isfinite(H).all():
        raise UserError("the calibration activations reaching this layer contain NaN or inf", name)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    try:
        if route == "reversed":
            # J H J = L Lᵀ (J: the reversal) gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and J L⁻¹ J is upper
            # triangular with a positive diagonal: U itself, the factor being unique. LAPACK, like
            # cuSOLVER, works in place on column-major matrices: symmetric ones are their own
            # transposes, so .mT gives them (and U) the layout of the reference route's, copy-free
            H = H.flip(0, 1).mT  # a copy; the caller's matrix goes here when consumed
            torch.linalg.cholesky(H, out=H)
            inverse = torch.eye(H.shape[0], dtype=H.dtype, device=H.device).mT
            torch.linalg.solve_triangular(H, inverse, upper=False, out=inverse)
            del H
            upper = inverse.flip(0, 1)
        else:  # the reference code's
            L = torch.linalg.cholesky(H)
            del H
            inverse = torch.cholesky_inverse(L, out=L)  # in place: one matrix fewer at the peak
            del L
            upper = torch.linalg.cholesky(inverse, upper=True)
        del inverse
    except torch.linalg.LinAlgError:
        raise UserError(
            f"the dampened Hessian is not positive definite (percdamp {percdamp}); raise percdamp", name
        ) from None
    if not torch.isfinite(upper).all():
        raise UserError(f"the dampened Hessian is singular (percdamp {percdamp}); raise percdamp", name)
    return InverseFactor(upper, perm, dead, damp.item())


def h_norm(delta: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) = Σ_rows Δ_r H Δ_rᵀ`` (float32), ``ROWS_PER_CHUNK`` rows at a time."""
    return h_norms(H, delta)[0]


def h_norms(H: torch.Tensor, *deltas: torch.Tensor, tf32: bool = False) -> list[float]:
    """:func:`h_norm` of each of ``deltas``, read back with one host synchronisation.

    ``tf32``: on CUDA the products may run in TF32 (factors rounded to 10 mantissa bits,
    float32 sums; several times faster on tensor cores), for figures that are only reported:
    about 1e-4 relative. No effect elsewhere."""
    totals = []
    with _tf32(tf32):
        for delta in deltas:
            total = torch.zeros((), dtype=torch.float32, device=H.device)
            for chunk in _chunks(delta):
                chunk = chunk.float()
                total += ((chunk @ H) * chunk).sum()
            totals.append(total)
    return torch.stack(totals).tolist()


def _chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], ROWS_PER_CHUNK):
        yield x[start : start + ROWS_PER_CHUNK]


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> float:
    """``‖WX − ŴX‖² / ‖WX‖²`` estimated through ``H ∝ X Xᵀ``: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    w = weight.float()
    return h_norm(w - quantized.float(), H) / max(h_norm(w, H), 1e-30)
