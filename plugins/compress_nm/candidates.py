"""Magnitude pruning's candidates for search methods: each layer at several unstructured sparsity levels.

EvoPress's pruning database (``prune.py``) holds SparseGPT levels per layer; this provider
offers the data-free magnitude levels (the smallest |w| of the layer zeroed), priced in
weights kept (``params``) or BitOps. Stored zeros cost the same storage as any weight in
the formats compress writes, so no storage-bits price is offered.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.api import Candidate, CandidateOffer, CandidateRequest, LayerState, weight_cost
from compress_nm.patterns import unstructured_keep_mask

NAME = "magnitude"


def kept_weights(module: nn.Module, sparsity: float) -> int:
    """Weights a layer keeps at ``sparsity`` (the pruned count rounds down, as the method's mask does)."""
    numel = module.weight.numel()
    return numel - int(numel * sparsity)


def magnitude_price(module: nn.Module, setting: dict, unit: str) -> float:
    kept = kept_weights(module, setting["sparsity"])
    return weight_cost(unit, kept=kept, weight_bits=16, storage_bits=16 * module.weight.numel())


MAGNITUDE_OFFER = CandidateOffer(
    {}, required=frozenset({"sparsity"}), costs=frozenset({"params", "bitops"}), price=magnitude_price
)


@torch.no_grad()
def magnitude_candidates(module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """Magnitude-pruned variants of a Linear layer for each requested ``sparsity`` level (0 keeps it dense)."""
    if not isinstance(module, nn.Linear):
        return []
    weight = module.weight.data
    candidates = []
    for setting in MAGNITUDE_OFFER.settings_for(module, request):
        sparsity = setting["sparsity"]
        keep = unstructured_keep_mask(weight.abs().float(), sparsity, per_row=False)
        pruned = weight.masked_fill(~keep, 0)
        error = ((pruned.float() - weight.float()).pow(2).sum() / weight.float().pow(2).sum().clamp_min(1e-24)).item()
        state = LayerState(method=NAME, sparsity="unstructured" if sparsity else None)
        cost = magnitude_price(module, setting, request.cost)
        candidates.append(Candidate(NAME, setting, cost, error, pruned, state))
    return candidates
