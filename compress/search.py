"""The search contract (version 2): candidate variants of a layer, their costs, budgets.

A search method (``rco``, ``evopress``, EQ-Net's search) asks every plugin, through the
``compress_layer_candidates`` hook, for variants of each layer it allocates, then picks one
per layer under a budget (:class:`compress.search_method.SearchMethod` owns that loop).

- A provider declares what its candidates can be on its method class
  (``Method.offers``, a :class:`CandidateOffer`): the settings it understands, the cost
  units it prices, whether it needs the layer's input statistics, and a price computed from
  shapes alone, so ``compress recipe check`` can refuse a setting no provider understands, a
  unit no provider prices, or a budget outside the reachable range before any weight is read.
- A :class:`Candidate` exposes its variant, the weights it would give the layer
  (``weight``) and the state it would record (``state``), so a search can put any mix of
  variants into the model and take them out again without copying the model.
- Costs come in three units (:data:`COST_UNITS`): storage ``bits``, ``bitops`` per token
  and ``params`` kept; a :class:`Budget` is written in any of them, per weight or in total.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from compress.errors import did_you_mean

if TYPE_CHECKING:
    from compress.context import Context, LayerState
    from compress.method import Method
    from compress.quant import QuantScheme

CostUnit = Literal["bits", "bitops", "params"]

COST_UNITS: dict[str, str] = {
    "bits": "storage of the layer's weights with their scales and zero points",
    "bitops": "BitOps per token: multiply-accumulates x weight bits x input bits (16 unless quantized)",
    "params": "weights kept (nonzero)",
}
"""The cost units a request can ask for, with what each counts."""

SCALE_BITS = 16
"""Bits of one stored scale (fp16/bf16)."""
ZERO_POINT_BITS = 8
"""Bits of one stored zero point (int8)."""
INPUT_BITS = 16
"""Bits of a layer's inputs when they are not quantized (fp16/bf16), for BitOps."""


@dataclass(frozen=True)
class LayerInputs:
    """Statistics of the inputs a layer receives on the calibration data, for providers whose
    variants depend on them (GPTQ, SparseGPT)."""

    hessian: torch.Tensor
    """``2/N Σ_n X_n X_nᵀ`` in float32, (in, in), as :func:`compress.hessian.collect_hessians` builds it."""
    tokens: int
    """Calibration tokens that went into it."""


@dataclass(frozen=True)
class CandidateRequest:
    """What a search method wants variants of."""

    settings: dict[str, list[Any]]
    """Values to try for each setting, e.g. ``{"bits": [2, 3, 4, 8], "group_size": [64]}``."""
    methods: frozenset[str] | None = None
    """Methods whose variants are wanted; None accepts all."""
    cost: CostUnit = "bits"
    """Unit of ``Candidate.cost`` (one of :data:`COST_UNITS`)."""
    inputs: LayerInputs | None = None
    """The layer's input statistics, when the search collected them (one request per layer then)."""


@dataclass
class Candidate:
    """One compressed variant of a layer: its weights and the state it records, not yet applied."""

    method: str
    setting: dict[str, Any]
    cost: float
    """In the request's cost unit."""
    error: float
    """Relative squared error of the variant: ‖(W − Ŵ)X‖² / ‖WX‖² when the provider had the
    layer's inputs, else the data-free ‖W − Ŵ‖² / ‖W‖²."""
    weight: torch.Tensor = field(repr=False)
    """The weights the variant gives the layer (same shape and dtype), on the host."""
    state: LayerState = field(repr=False)
    """What applying the variant records in ``context.layers`` (its grid, its sparsity)."""
    inputs: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    """How the variant quantizes the layer's input (its first argument; fake quantization, on the
    input's device, differentiable for searches that need gradients), or None when it leaves the
    input as it is. A search scores the variant with it: while the search runs, the layer's input
    passes through its current candidate's ``inputs``. The written checkpoint holds the weights only."""

    def apply(self, module: nn.Module) -> LayerState:
        """Copy the variant's weights into ``module`` (in place, on its device); return its state
        (the search, not this, quantizes the inputs with ``inputs``)."""
        module.weight.data.copy_(self.weight)
        return self.state


Price = Callable[[nn.Module, dict[str, Any], str], float]
"""``price(module, setting, unit)``: a candidate's cost from the layer's shapes alone (a meta
module at recipe check)."""
PriceRange = Callable[[nn.Module, dict[str, Any], str], tuple[float, float] | None]
"""``price_range(module, setting, unit)``: the lowest and the highest cost a candidate can have,
from the layer's shapes alone, when they do not decide the exact one; None when they bound
nothing in ``unit``."""
EarlierCheck = Callable[[dict[str, list[Any]], Sequence["Method"]], str | None]
"""``check_earlier(settings, earlier)``: why a provider has no candidates after the recipe's earlier
stages (their methods, in order), or None when it has; raises UserError for requested values they rule out."""


@dataclass(frozen=True)
class CandidateOffer:
    """What a method's candidates can be; set as the method class's ``offers``."""

    defaults: dict[str, list[Any]]
    """The settings it understands besides those in ``required``, with the values it uses when a request omits them."""
    required: frozenset[str] = frozenset({"bits"})
    """Settings a request must give for it to offer anything."""
    costs: frozenset[str] = frozenset(COST_UNITS)
    """Cost units it prices."""
    needs_inputs: bool = False
    """It offers nothing without the layer's :class:`LayerInputs`."""
    price: Price | None = None
    """Its candidates' exact cost from shapes, or None when it depends on the weights."""
    price_range: PriceRange | None = None
    """With no ``price``: bounds on its candidates' cost from shapes, so that ``compress recipe check``
    refuses a budget outside every configuration the bounds allow; a budget inside them is checked
    against the exact range when the candidates exist. Neither: it is checked only then."""
    modules: tuple[type[nn.Module], ...] = (nn.Linear,)
    """Layer types it offers variants of."""
    check_earlier: EarlierCheck | None = None
    """For a provider whose candidates come from an earlier stage of the recipe (a supernet it trains):
    whether those stages give it candidates, and in which space (:data:`EarlierCheck`), asked by
    ``compress recipe check``; a search naming it without them is refused, one asking every
    provider leaves it out. None: its candidates need no earlier stage."""
    nominal: bool = False
    """Its ``bits`` and ``bitops`` count the variant's arithmetic (parameters x weight bits, as a
    supernet's search does) rather than a packed checkpoint's storage, so an output format that
    stores the weights unpacked (``dense``) does not refuse a budget in them."""

    @property
    def settings(self) -> frozenset[str]:
        """Every setting it understands."""
        return self.required | frozenset(self.defaults)

    def cost_range(self, module: nn.Module, setting: dict[str, Any], unit: str) -> tuple[float, float] | None:
        """A candidate's cost from shapes as (lowest, highest), the two equal when exact; None when unknown."""
        if self.price is not None:
            cost = self.price(module, setting, unit)
            return cost, cost
        return None if self.price_range is None else self.price_range(module, setting, unit)

    def settings_for(self, module: nn.Module, request: CandidateRequest) -> list[dict[str, Any]]:
        """Every combination of the request's values (defaults filling the gaps) it offers for ``module``:
        none when the request lacks a required setting or names one it does not understand; a
        ``group_size`` must divide the layer's input width (None, per output channel, fits all)."""
        if not self.required <= set(request.settings) or not set(request.settings) <= self.settings:
            return []
        names = [*sorted(self.required), *self.defaults]
        values = [request.settings.get(name, self.defaults.get(name)) for name in names]
        settings = [dict(zip(names, combination)) for combination in itertools.product(*values)]
        width = getattr(module, "in_features", None)
        return [s for s in settings if width is None or width % (s.get("group_size") or 1) == 0]


def grid_storage_bits(shape: tuple[int, int], scheme: QuantScheme) -> int:
    """Bits to store a weight of ``shape`` (out, in) on ``scheme``: the codes plus a scale (and a zero point) per group."""
    rows, columns = shape
    if scheme.granularity == "group":
        groups = rows * (columns // scheme.group_size)
    else:
        groups = rows if scheme.granularity == "channel" else 1
    return rows * columns * scheme.bits + groups * (SCALE_BITS + (0 if scheme.symmetric else ZERO_POINT_BITS))


def weight_cost(unit: str, *, kept: int, weight_bits: int, storage_bits: int, input_bits: int = INPUT_BITS) -> float:
    """A variant's cost in ``unit``: ``storage_bits``, ``kept`` x ``weight_bits`` x ``input_bits`` BitOps
    per token (a weight is one multiply-accumulate per token), or ``kept`` weights."""
    if unit == "bits":
        return float(storage_bits)
    if unit == "bitops":
        return float(kept * weight_bits * input_bits)
    return float(kept)


def quantizer_settings(
    module: nn.Module, request: CandidateRequest, defaults: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Every combination of the requested settings a weight quantizer can apply to ``module``.

    ``bits`` must be requested; other settings take ``defaults`` when the request omits
    them; a request naming a setting outside ``bits`` and ``defaults`` gets nothing. Only
    Linear layers qualify, and only group sizes that divide their input width (``None``, per
    output channel, fits every layer).
    """
    if not isinstance(module, nn.Linear):
        return []
    return CandidateOffer(defaults).settings_for(module, request)


def quantizer_price(module: nn.Module, setting: dict[str, Any], unit: str) -> float:
    """The cost of a weight-only quantizer's variant: every weight kept, on the setting's grid."""
    from compress.quant import QuantScheme

    scheme = QuantScheme(**{key: setting[key] for key in ("bits", "group_size", "symmetric") if key in setting})
    shape = (module.out_features, module.in_features)
    return weight_cost(
        unit, kept=shape[0] * shape[1], weight_bits=scheme.bits, storage_bits=grid_storage_bits(shape, scheme)
    )


def collect_candidates(context: Context, name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """The requested methods' candidates for one layer.

    Only the plugins that register the methods in ``request.methods`` are asked (every plugin
    when it is None), so an unasked provider computes nothing; a plugin registering several
    providers may still answer for one that was not asked, whose candidates are dropped.
    """
    host = context.host
    if request.methods is None:
        hook = host.hook.compress_layer_candidates
    else:
        hook = host.hook_of_methods("compress_layer_candidates", request.methods)
    offers = hook(context=context, name=name, module=module, request=request)
    found = [candidate for offer in offers if offer for candidate in offer]
    if request.methods is not None:
        found = [candidate for candidate in found if candidate.method in request.methods]
    return found


class Budget(BaseModel):
    """A budget in one cost unit, per targeted weight or in total, written ``{KEY: value}``.

    Keys: ``bits_per_weight`` (average storage bits of the targeted weights, scales and zero
    points included: 4-bit codes in groups of 64 with a 16-bit scale are 4.25), ``bits`` (their
    total), ``bitops_per_weight`` (BitOps per token divided by the targeted weights: 4-bit
    weights on 16-bit inputs are 64), ``bitops`` (per token), ``params_kept`` (the fraction of
    targeted weights kept: 0.5 is 50% sparsity) and ``params`` (their number).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: CostUnit
    per_weight: bool
    value: float

    KEYS: ClassVar = {
        "bits_per_weight": ("bits", True),
        "bits": ("bits", False),
        "bitops_per_weight": ("bitops", True),
        "bitops": ("bitops", False),
        "params_kept": ("params", True),
        "params": ("params", False),
    }

    @model_validator(mode="before")
    @classmethod
    def _from_key(cls, data: Any) -> Any:
        if not isinstance(data, dict) or set(data) <= {"unit", "per_weight", "value"}:
            return data
        if len(data) != 1:
            raise ValueError(f"give the budget in one unit, not {len(data)} ({', '.join(map(str, data))})")
        ((key, value),) = data.items()
        if key not in cls.KEYS:
            raise ValueError(f"unknown cost unit {key!r}{did_you_mean(str(key), list(cls.KEYS))}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"budget {key} must be a positive number, not {value!r}")
        unit, per_weight = cls.KEYS[key]
        return {"unit": unit, "per_weight": per_weight, "value": value}

    @property
    def key(self) -> str:
        """How the recipe writes it (``bits_per_weight``)."""
        return next(key for key, spec in self.KEYS.items() if spec == (self.unit, self.per_weight))

    def total(self, weights: int) -> float:
        """The budget in the unit's total, for ``weights`` targeted weights."""
        return self.value * weights if self.per_weight else self.value

    def in_key(self, total: float, weights: int) -> float:
        """A total cost written as this budget is (per weight or not)."""
        return total / weights if self.per_weight else total
