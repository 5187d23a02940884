"""The supernet's settings as search candidates, so ``rco`` and ``evopress`` allocate over them.

After an ``eqnet`` stage, every elastic layer is offered one candidate per combination of the
requested weight bit widths, weight granularities and symmetries, input bit widths and input
symmetries (:data:`compress_eqnet.offer.DEFAULTS` fill the settings a request omits): its latent
weights fake-quantized with the supernet's learned LSQ+ step (and offset) for that setting,
exactly the weights of the sub-network that sets it, and its input quantized by the supernet's
learned input quantizer at the setting's input bits (``Candidate.inputs``: the activation point
:func:`compress_eqnet.points.input_point`, the one ``eqnet_search`` writes), so the search scores
each configuration as the sub-network computes. The first and the last layer are offered
``fixed_bits`` weights and inputs only, as the supernet holds them.

Costs are EQ-Net's: ``bits`` is parameters x weight bits (the numerator of the code's
parameter-weighted average, ``BW_Estimator``; no scales counted, and inputs are not stored), so
``bits_per_weight`` over the elastic layers is ``eqnet_search``'s average weight bits; ``bitops``
is MACs per image x weight bits x input bits, as :class:`compress_eqnet.efficiency.Efficiency`
counts them, so a BitOps search trades input bits against weight bits.

Our choices: a request's values must lie in the supernet's space (``compress recipe check``
refuses others from the recipe's ``eqnet`` stage); batch-norm statistics are the trained
supernet's, not re-estimated per configuration as ``eqnet_search`` does; the search's written
checkpoint holds the chosen weights, and the inputs' bits only report.json (per layer, in the
setting): an ``eqnet_search`` stage with ``configuration:`` the search's label measures the
chosen configuration as eqnet_search measures its own and writes its input points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.api import ActivationPoint, Candidate, CandidateRequest, Context, LayerState
from compress_eqnet.method import STATE_KEY, EQNet
from compress_eqnet.offer import OFFER, check_request
from compress_eqnet.points import input_point
from compress_eqnet.quantizers import WeightQuantizer
from compress_eqnet.search import space_of

METHOD = EQNet.name


def supernet_candidates(
    context: Context, name: str, module: nn.Module, request: CandidateRequest
) -> list[Candidate] | None:
    """``name``'s candidates from the supernet an ``eqnet`` stage left in ``context.state``; None when
    there is none, the layer is not in it, or the request's unit is not one ``eqnet`` prices."""
    state = context.state.get(STATE_KEY)
    if state is None or name not in state["layers"] or request.cost not in OFFER.costs:
        return None
    settings = OFFER.settings_for(module, request)
    if not settings:
        return None
    space = space_of(state)
    check_request(request.settings, space)
    index = state["layers"].index(name)
    fixed = index in (0, len(state["layers"]) - 1)
    weight = latent(state, name, module).float()
    quantizer = WeightQuantizer(weight.shape[0])
    quantizer.load_state_dict(state["quantizers"]["weights"][name])
    quantizer.to(weight.device)
    inputs: dict[tuple[int, bool], ActivationPoint] = {}
    lowest = (min(s["bits"] for s in settings), min(s["input_bits"] for s in settings))
    costs = state["costs"][name]
    candidates = []
    for setting in settings:
        if fixed:
            if (setting["bits"], setting["input_bits"]) != lowest:
                continue  # one candidate per form: the supernet holds this layer at fixed_bits
            setting = {**setting, "bits": space.fixed_bits, "input_bits": space.fixed_bits}
        quantizer.bits, quantizer.channel = setting["bits"], setting["granularity"] == "channel"
        quantizer.symmetric = setting["symmetric"]
        with torch.no_grad():
            variant = quantizer(weight)
        error = (variant - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)
        form = (setting["input_bits"], setting["input_symmetric"])
        if form not in inputs:
            inputs[form] = input_point(state["quantizers"]["inputs"][name], *form)
        candidates.append(
            Candidate(
                METHOD,
                setting,
                price(costs, setting, request.cost),
                error.item(),
                variant.to(module.weight.dtype).cpu(),
                LayerState(method=METHOD, quant=quantizer.grid()),
                inputs[form],
            )
        )
    return candidates


def latent(state: dict[str, Any], name: str, module: nn.Module) -> torch.Tensor:
    """The layer's latent weights: the supernet's, also after an ``eqnet_search`` stage replaced them."""
    if "latent" in state:
        return state["latent"][f"{name}.weight"].to(module.weight.device)
    return module.weight.detach()


def price(costs: dict[str, float], setting: dict[str, Any], unit: str) -> float:
    """A candidate's cost in ``unit`` from the layer's ``costs`` (:func:`compress_eqnet.efficiency.layer_costs`)."""
    if unit == "bits":
        return costs["params"] * setting["bits"]
    return costs["macs"] * setting["bits"] * setting["input_bits"]
