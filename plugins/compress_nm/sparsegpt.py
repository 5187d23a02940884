"""``sparsegpt``: one-shot pruning with second-order weight updates, optionally quantizing in the same pass."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.api import (
    BlockMethod,
    BlockWork,
    Context,
    Hessian,
    Method,
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
    weight_matrix,
)
from compress_nm.params import Pruning, SparsityParams, sparsity_report
from compress_nm.sparsegpt_solve import LoopCache, Mask, prune_in_place


class SparseGPTParams(SparsityParams, QuantParams):
    """Parameters of ``sparsegpt``: the pattern or fraction, the solve's, and optionally a weight grid
    (``bits``) to quantize the kept weights on in the same pass."""

    granularities = ("channel", "group")

    bits: int | None = Field(
        None,
        ge=2,
        le=8,
        description="Quantize the kept weights jointly (2-8 bits, on the grid symmetric/granularity/"
        "group_size describe): each column is pruned, then quantized, before its error is propagated, "
        "so 2:4 + W4 is one stage whose zeros stay zero. null: prune only.",
    )
    block_size: int = Field(
        128,
        gt=0,
        description="Columns per lazy-update block; unstructured masks are chosen per block (adaptive "
        "mask selection). Rounded down to a multiple of M for N:M patterns.",
    )
    percdamp: float = Field(
        0.01,
        ge=0.0,
        description="Dampening: percdamp x mean(diag H) is added to the Hessian's diagonal before the "
        "Cholesky factorisation. Raise it (0.1) if a layer's Hessian is not positive definite.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture the column loop of a block as a CUDA graph and replay it for "
        "the blocks after it (same kernels, same result; far fewer launches). false: launch each "
        "kernel eagerly. No effect on CPU.",
    )

    def scheme(self) -> QuantScheme | None:
        """The grid of the joint quantization, or None when only pruning."""
        return None if self.bits is None else super().scheme()


class SparseGPT(Pruning, BlockMethod):
    """SparseGPT: one-shot pruning by OBS mask selection and weight reconstruction.

    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot" (ICML 2023); official code IST-DASLab/sparsegpt (``sparsegpt.py:
    fasterprune``, ``llama.py``). Block by block, each targeted layer's Hessian
    H = 2/N Σ X Xᵀ is collected from the block's calibration inputs (the outputs of the
    already-pruned earlier blocks) in one pass of the block, as the reference code does.
    Columns are then processed left to right in blocks of ``block_size``: the mask is
    chosen by the OBS saliency w² / [U]_jj² (U the upper Cholesky factor of the dampened
    H⁻¹) over each block for unstructured sparsity (adaptive mask selection), or at every
    M-th column over the next M columns of each row for ``pattern: N:M``; each pruned
    weight's error is propagated to the columns not yet processed, so the layer output
    ‖WX − ŴX‖² stays small. With ``bits`` the kept weights are quantized in the same pass
    (the paper's joint sparsification and quantization): 2:4 + W4 is one stage whose
    weights lie on the grid with their zeros exactly zero. See ``sparsegpt_solve.py`` for
    what is the reference code's and what is our choice.

    Layers reading one input (q/k/v, gate/up) share one Hessian and are solved as one weight
    with their rows stacked (each layer keeps its own unstructured mask and report). Reports
    per layer the relative output error estimated through H, tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
    (``objective``), the same for magnitude pruning with the same pattern (then
    round-to-nearest on the same scheme when quantizing: ``magnitude_objective``), the
    fraction of zeros, the dampening and the timings.
    """

    name = "sparsegpt"
    Params = SparseGPTParams
    params: SparseGPTParams

    def produces(self) -> Produces:
        return Produces(quant=self.params.scheme(), sparsity=self.params.structure)

    def check_previous_stages(self, previous: list[Method]) -> None:
        """Without ``bits``, refuse to follow a stage that quantizes: the updates would move the
        weights off its grid (prune first, or quantize in this stage)."""
        if self.params.bits is not None:
            return
        for index, method in enumerate(previous):
            if method.produces().schemes():
                raise UserError(
                    f"sparsegpt without bits moves the weights off the grid stage {index + 1} ({method.name}) "
                    "leaves: prune first, or set bits to quantize in this stage"
                )

    def __init__(self, params: SparseGPTParams) -> None:
        super().__init__(params)
        self._loops = LoopCache(cuda_graphs=params.cuda_graphs)

    @contextmanager
    def around_stage(self, context: Context, run: StageRun) -> Iterator[None]:
        try:
            yield
        finally:
            self._loops.clear()

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        for name, module in work.targets.items():
            if not torch.isfinite(module.weight.data).all():
                raise UserError("weights contain NaN or inf", name)
        started = time.perf_counter()
        hessians, groups = collect_hessians(work.block, work.targets, work.inputs, work.device, low_precision=True)
        if work.device.type == "cuda":
            torch.cuda.synchronize(work.device)  # the time is the products', not their launches'
        collect_seconds = round(time.perf_counter() - started, 4)
        for name in work.targets:
            if name not in hessians:
                raise UserError("the block's forward pass never reached this layer; it cannot be calibrated", name)
        reports = {}
        for names in groups:
            hessian = hessians[names[0]]
            for name in names:  # the solve frees the matrix once nothing else holds it
                del hessians[name]
            for name, report in self.prune_group(context, {n: work.targets[n] for n in names}, hessian).items():
                reports[name] = {**report, "hessian_seconds": collect_seconds}
        return reports

    def prune_group(self, context: Context, modules: dict[str, nn.Module], hessian: Hessian) -> dict[str, dict]:
        """Prune the layers reading one input as one solve: their rows stacked, one Hessian."""
        params = self.params
        scheme = params.scheme()
        where = ", ".join(modules)
        targets = [weight_matrix(module.weight.data) for module in modules.values()]
        baselines = [self.baseline(target.float(), hessian.matrix, name) for name, target in zip(modules, targets)]
        started = time.perf_counter()
        factor = inverse_factor(hessian.release(), params.percdamp, act_order=False, name=where, consume=True)
        result = prune_in_place(
            torch.cat(targets).float(),
            factor,
            Mask(params.nm, params.sparsity, params.per_row),
            scheme,
            block_size=params.block_size,
            segments=[target.shape[0] for target in targets],
            name=where,
            loops=self._loops,
        )
        seconds = time.perf_counter() - started
        reports = {}
        offset = 0
        for (name, module), target, (reference, magnitude_error) in zip(modules.items(), targets, baselines):
            rows = slice(offset, offset + target.shape[0])
            offset = rows.stop
            error = factor.output_error(result.row_errors[rows], target.float() - result.weight[rows])
            module.weight.data = result.weight[rows].to(module.weight.dtype).view_as(module.weight)
            changes: dict[str, Any] = {"method": self.name, "sparsity": params.structure}
            if result.grid is not None:
                zero_point = None if result.grid.zero_point is None else result.grid.zero_point[rows]
                changes.update(quant=QuantGrid(scheme, result.grid.scale[rows], zero_point).to("cpu"), outliers=None)
            context.update_layer(name, **changes)
            reports[name] = {
                **sparsity_report(module.weight.data),
                "bits": params.bits,
                "percdamp": params.percdamp,
                "damp": factor.damp,
                "dead_inputs": int(factor.dead.sum()),
                "calibration_samples": hessian.samples,
                "calibration_tokens": hessian.tokens,
                "objective": error / max(reference, 1e-30),
                "magnitude_objective": magnitude_error / max(reference, 1e-30),
                "seconds": round(seconds * target.shape[0] / result.weight.shape[0], 4),
                "solved_with": [other for other in modules if other != name],
            }
        return reports

    def baseline(self, weight: torch.Tensor, H: torch.Tensor, name: str) -> tuple[float, float]:
        """``tr(W H Wᵀ)`` and magnitude pruning's ``tr(ΔW H ΔWᵀ)`` with the same pattern (then
        round-to-nearest on the same scheme when quantizing): the report's reference points."""
        pruned = weight.masked_fill(~self.params.keep_mask(weight.abs()), 0)
        scheme = self.params.scheme()
        if scheme is not None:
            pruned = compute_grid(pruned, scheme, name).fake_quantize(pruned)
        reference, error = h_norms(H, weight, weight - pruned)
        return reference, error
