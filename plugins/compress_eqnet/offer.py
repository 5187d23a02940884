"""What ``eqnet`` offers search methods (``rco``, ``evopress``), and the checks of a request against
the supernet's space, which ``compress recipe check`` runs from the recipe's ``eqnet`` stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from compress.api import CandidateOffer, UserError
from compress_eqnet.quantizers import BITS
from compress_eqnet.supernet import Space

DEFAULTS: dict[str, list[Any]] = {
    "granularity": ["tensor"],
    "symmetric": [True],
    "input_bits": [8],
    "input_symmetric": [False],
}
"""The settings besides ``bits``, with the values a request that omits them gets: ``eqnet_search``'s
defaults (per-tensor symmetric weights, asymmetric inputs), inputs at 8 bits."""


def cost_range(module: nn.Module, setting: dict[str, Any], unit: str) -> tuple[float, float] | None:
    """Bounds from shapes on a candidate's cost in ``bits`` (parameters x weight bits): the layer may be
    the supernet's first or last, held at its ``fixed_bits`` (2..8, unknown here) whatever the
    setting, so from parameters x ``min(bits, 2)`` to parameters x ``max(bits, 8)``. None in BitOps,
    which count the MACs per image a forward pass measures."""
    if unit != "bits":
        return None
    params = float(module.weight.numel())
    return params * min(setting["bits"], BITS[0]), params * max(setting["bits"], BITS[-1])


def check_request(settings: dict[str, list[Any]], space: Space) -> None:
    """Refuse a value the supernet's ``space`` does not hold, among those the search asks for (or,
    for a setting it omits, the default it gets)."""
    for key, allowed in (
        ("bits", space.w_bits),
        ("granularity", ["channel" if channel else "tensor" for channel in space.channel]),
        ("symmetric", space.w_symmetric),
        ("input_bits", space.a_bits),
        ("input_symmetric", space.a_symmetric),
    ):
        values = settings.get(key, DEFAULTS.get(key, []))
        outside = [value for value in values if value not in allowed]
        if outside:
            default = "" if key in settings else " (the default)"
            raise UserError(
                f"settings: {key}: {outside[0]}{default} is outside the eqnet supernet's space ({list(allowed)})"
            )


def check_earlier(settings: dict[str, list[Any]], earlier: Sequence[Any]) -> str | None:
    """Whether the recipe's stages before a search give ``eqnet`` candidates: the space of the last
    ``eqnet`` stage among ``earlier`` (a request it would not answer, naming a setting it does not
    understand, is not checked); why not when there is none."""
    trained = [method for method in earlier if method.name == "eqnet"]
    if not trained:
        return "eqnet offers the sub-networks of the supernet an eqnet stage trains, and no earlier stage is one"
    if set(settings) <= OFFER.settings:
        check_request(settings, trained[-1].params.space())
    return None


OFFER = CandidateOffer(
    DEFAULTS,
    required=frozenset({"bits"}),
    costs=frozenset({"bits", "bitops"}),
    modules=(nn.Conv2d, nn.Linear),
    nominal=True,
    price_range=cost_range,
    check_earlier=check_earlier,
)
"""The supernet's settings as search candidates (:mod:`compress_eqnet.candidates`): weight ``bits``,
``granularity`` (tensor or channel) and weight ``symmetric``, ``input_bits`` and ``input_symmetric``
of the inputs each candidate quantizes; costs in bits (parameters x weight bits, bounded from shapes
at recipe check) and BitOps."""
