"""``wanda``: pruning by weights and activations (Sun, Liu, Bair, Kolter, 2023)."""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from compress.api import BlockMethod, BlockWork, Context, UserError, collect_input_norms, weight_matrix
from compress_nm.params import Pruning, SparsityParams, sparsity_report


class WandaParams(SparsityParams):
    """Parameters of ``wanda``: the pattern or fraction; unstructured scores are compared per output row."""

    per_row: bool = Field(
        True,
        description="With sparsity: prune that fraction of every output row (the paper's comparison "
        "group, its best); false: compare the scores over the whole layer.",
    )


class Wanda(Pruning, BlockMethod):
    """Wanda: prune the weights of smallest |W_ij| · ‖X_j‖₂, one block at a time, no weight update.

    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
    Models" (2023); official code locuslab/wanda (``lib/prune.py: prune_wanda``,
    ``lib/layerwrapper.py``). For each block, the targeted layers' input norms
    ``‖X_j‖₂ = √(Σ_n ‖x_n,j‖² / N)`` are collected in one pass of the block over its
    calibration inputs (the outputs of the already-pruned earlier blocks, as the reference
    code's sequential loop), every weight is scored ``|W_ij| · ‖X_j‖₂`` in float32 and the
    lowest are zeroed: the ``sparsity`` fraction of each output row (the paper's comparison
    group; ``per_row: false`` compares over the layer), or, with ``pattern: N:M``, all but
    the N highest of every M consecutive input weights of a row. Ties keep the earlier
    weight (``torch.topk``; the reference sorts stably, which agrees). The scores of all the
    block's layers come from the dense block's forward pass, as in the reference code.
    Reports per layer the fraction of zeros and the calibration tokens seen.
    """

    name = "wanda"
    Params = WandaParams
    params: WandaParams

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        started = time.perf_counter()
        norms, _ = collect_input_norms(work.block, work.targets, work.inputs, work.device)
        reports = {}
        for name, module in work.targets.items():
            if name not in norms:
                raise UserError("the block's forward pass never reached this layer; it cannot be calibrated", name)
            weight = weight_matrix(module.weight.data)
            if not torch.isfinite(weight).all():
                raise UserError("weights contain NaN or inf", name)
            statistic = norms[name]
            scores = weight.abs().float() * statistic.norms().to(weight.device)
            keep = self.params.keep_mask(scores)
            module.weight.data = weight.masked_fill(~keep, 0).view_as(module.weight)
            context.update_layer(name, method=self.name, sparsity=self.params.structure)
            reports[name] = {
                **sparsity_report(module.weight.data),
                "calibration_samples": statistic.samples,
                "calibration_tokens": statistic.tokens,
            }
        seconds = round(time.perf_counter() - started, 4)
        return {name: {**report, "block_seconds": seconds} for name, report in reports.items()}
