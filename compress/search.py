"""Candidates for search and allocation methods: compressed variants of one layer.

A search method (RCO, EvoPress, EQ-Net's search) asks every plugin, through the
``compress_layer_candidates`` hook, for variants of each layer, then picks one per layer
under its budget and applies it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

if TYPE_CHECKING:
    from compress.context import Context, LayerState


@dataclass(frozen=True)
class CandidateRequest:
    """What a search method wants variants of."""

    settings: dict[str, list[Any]]
    """Values to try for each setting, e.g. ``{"bits": [2, 3, 4, 8], "group_size": [64]}``."""
    methods: frozenset[str] | None = None
    """Methods whose variants are wanted; None accepts all."""
    cost: Literal["bits"] = "bits"
    """Unit of ``Candidate.cost``: bits of storage for the layer's weights and their metadata."""


@dataclass
class Candidate:
    """One compressed variant of a layer."""

    method: str
    setting: dict[str, Any]
    cost: float
    """Storage in the request's cost unit."""
    error: float
    """Relative squared weight error ‖W − Ŵ‖² / ‖W‖² of the variant (data-free estimate)."""
    apply: Callable[[nn.Module], LayerState] = field(repr=False)
    """Puts the variant's weights into the module (in place) and returns its LayerState."""


def quantizer_settings(
    module: nn.Module, request: CandidateRequest, defaults: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Every combination of the requested settings a weight quantizer can apply to ``module``.

    ``bits`` must be requested; other settings take ``defaults`` when the request omits
    them. Only Linear layers qualify, and only group sizes that divide their input width
    (``None``, per output channel, fits every layer).
    """
    if not isinstance(module, nn.Linear) or "bits" not in request.settings:
        return []
    names = ["bits", *defaults]
    values = [request.settings.get(name, defaults.get(name)) for name in names]
    settings = [dict(zip(names, combination)) for combination in itertools.product(*values)]
    # group_size None is one scale per output channel: every width qualifies
    return [s for s in settings if module.in_features % (s.get("group_size") or 1) == 0]


def collect_candidates(context: Context, name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """Every plugin's candidates for one layer, filtered to the requested methods."""
    offers = context.host.hook.compress_layer_candidates(context=context, name=name, module=module, request=request)
    found = [candidate for offer in offers if offer for candidate in offer]
    if request.methods is not None:
        found = [candidate for candidate in found if candidate.method in request.methods]
    return found
