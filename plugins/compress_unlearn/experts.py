"""Mixture-of-experts layers as transformers builds them: the router, one expert's weights, gate probabilities.

transformers 5 builds a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) as a
module with a router ``gate`` (a module holding ``weight`` of shape ``[experts, hidden]``,
not an ``nn.Linear``) and ``experts``, whose parameters are fused 3-D tensors with the
experts along dim 0 (``gate_up_proj``, ``down_proj``); older layouts keep an
``nn.ModuleList`` of per-expert MLPs, also handled here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_NAMES = ("gate", "router")


def router_of(block: nn.Module) -> nn.Module | None:
    """The block's router (a module with a 2-D ``weight``, one row per expert) when ``block``
    is a sparse MoE layer with ``experts``; None otherwise (a dense MLP)."""
    if not hasattr(block, "experts"):
        return None
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            return router
    return None


def experts_count(block: nn.Module) -> int:
    """How many routed experts ``block`` has (rows of its router)."""
    return router_of(block).weight.shape[0]


def expert_slices(block: nn.Module, expert: int) -> list[tuple[nn.Module, str, int | None]]:
    """Where expert ``expert``'s weights live: ``(module, parameter name, index along dim 0)``,
    the index None where the parameter belongs to that expert alone (a ModuleList layout)."""
    experts = block.experts
    if isinstance(experts, nn.ModuleList):
        owner = experts[expert]
        return [
            (owner.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], None)
            for path, _ in owner.named_parameters()
        ]
    count = experts_count(block)
    return [
        (experts, name, expert)
        for name, parameter in experts.named_parameters(recurse=False)
        if parameter.dim() >= 1 and parameter.shape[0] == count
    ]


def gate_probabilities(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The router's softmax gate g = softmax(W·h (+ b)) in float32, ``[tokens, experts]``, for
    ``hidden`` of any leading shape (as SEUF's hook recomputes it from the router's input)."""
    flat = hidden.reshape(-1, router.weight.shape[1])
    bias = getattr(router, "bias", None)
    logits = F.linear(flat.float(), router.weight.float(), None if bias is None else bias.float())
    return logits.softmax(dim=-1)
