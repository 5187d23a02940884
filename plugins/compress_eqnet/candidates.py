"""The supernet's settings as search candidates, so ``rco`` and ``evopress`` allocate over them.

After an ``eqnet`` stage, every elastic layer is offered one candidate per requested weight
bit width of the supernet's space (at the requested granularity and weight symmetry): its
latent weights fake-quantized with the supernet's learned LSQ+ step (and offset) for that
setting, exactly the weights of the sub-network that sets it. The first and the last layer
are offered their ``fixed_bits`` only, as the supernet holds them.

Costs are EQ-Net's: ``bits`` is parameters x weight bits (the numerator of the code's
parameter-weighted average, ``BW_Estimator``; no scales counted), so ``bits_per_weight`` over
the elastic layers is ``eqnet_search``'s average weight bits; ``bitops`` is MACs per image x
weight bits x input bits, as :class:`compress_eqnet.efficiency.Efficiency` counts them.

Our choice, as the contract's variants are weights only: a candidate does not quantize the
layer's inputs (the search's forward passes run them in full precision), so input bits are no
search dimension; ``input_bits`` (one value) only prices BitOps, the first and last layers at
``fixed_bits``. Batch-norm statistics are the trained supernet's, not re-estimated per
configuration as ``eqnet_search`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.api import Candidate, CandidateRequest, Context, LayerState, UserError
from compress_eqnet.method import STATE_KEY, EQNet
from compress_eqnet.quantizers import WeightQuantizer
from compress_eqnet.search import space_of
from compress_eqnet.supernet import Space

METHOD = EQNet.name
OFFER = EQNet.offers


def supernet_candidates(
    context: Context, name: str, module: nn.Module, request: CandidateRequest
) -> list[Candidate] | None:
    """``name``'s candidates from the supernet an ``eqnet`` stage left in ``context.state``; None when
    there is none, the layer is not in it, or the request's unit is not one ``eqnet`` prices."""
    if request.methods is not None and METHOD not in request.methods:
        return None
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
    costs = state["costs"][name]
    candidates = []
    for setting in settings:
        if fixed:
            if setting["bits"] != min(request.settings["bits"]):
                continue  # one candidate: the supernet holds this layer at fixed_bits
            setting = {**setting, "bits": space.fixed_bits, "input_bits": space.fixed_bits}
        quantizer.bits, quantizer.channel = setting["bits"], setting["granularity"] == "channel"
        quantizer.symmetric = setting["symmetric"]
        with torch.no_grad():
            variant = quantizer(weight)
        error = (variant - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30)
        candidates.append(
            Candidate(
                METHOD,
                setting,
                price(costs, setting, request.cost),
                error.item(),
                variant.to(module.weight.dtype).cpu(),
                LayerState(method=METHOD, quant=quantizer.grid()),
            )
        )
    return candidates


def check_request(settings: dict[str, list[Any]], space: Space) -> None:
    """Refuse requested values the supernet's space does not hold, and more than one ``input_bits``."""
    inputs = settings.get("input_bits", [])
    if len(inputs) > 1:
        raise UserError(
            f"settings: input_bits: give one value, not {inputs} (eqnet's candidates quantize weights only; "
            "input_bits prices BitOps)"
        )
    for key, allowed in (
        ("bits", space.w_bits),
        ("granularity", ["channel" if channel else "tensor" for channel in space.channel]),
        ("symmetric", space.w_symmetric),
        ("input_bits", space.a_bits),
    ):
        outside = [value for value in settings.get(key, []) if value not in allowed]
        if outside:
            raise UserError(f"settings: {key}: {outside[0]} is outside the eqnet supernet's space ({list(allowed)})")


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
