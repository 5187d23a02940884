"""The base class of search methods: one candidate variant per layer, chosen under a budget.

:class:`SearchMethod` owns what every search shares; a subclass only implements
:meth:`SearchMethod.search` over a :class:`SearchSpace`:

1. ``compress recipe check`` (:meth:`SearchMethod.check_stage`): every requested setting is
   understood and the budget's unit priced by some provider, every targeted layer has one
   that offers its variants and prices that unit (only those are asked at run time),
   the output format can meet the unit, the budget lies between the cheapest and the
   dearest configuration when the providers price (or bound) costs from shapes, and a
   provider whose candidates come from an earlier stage (a supernet) has one before, in
   whose space the requested values lie;
2. collect: when a provider needs input statistics, the calibration data streams through
   the original model's blocks (one on the device at a time in sequential mode) and each
   targeted layer's Hessian ``2/N Σ X Xᵀ`` goes with its request (a target after the blocks,
   such as lm_head, from a pass over the last block's outputs); every provider's candidates
   are gathered per layer (their weights kept on the host, page-locked on CUDA);
3. search: the subclass returns one candidate index per layer, the model on the device in
   both run modes (whole-model forward passes), each layer's input quantized as its current
   candidate says (``Candidate.inputs``);
4. commit: the chosen variants are put into the model and recorded in ``context.layers``;
   report.json gets per layer the candidate, its cost and error, and per stage the budget,
   the achieved cost and the time spent collecting and searching; a PNG of the per-layer
   allocation goes next to report.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from compress.blocks import (
    capture_block_inputs,
    device_batch,
    find_blocks,
    hidden_states,
    run_block,
    skipping_blocks,
    within,
)
from compress.context import Context, StageRun
from compress.devices import onloaded, pinned
from compress.errors import UserError, did_you_mean
from compress.hessian import collect_hessians
from compress.method import Method, MethodKind, MethodParams, Produces
from compress.plots import allocation_png
from compress.quant import QuantScheme
from compress.search import Budget, Candidate, CandidateOffer, CandidateRequest, LayerInputs, collect_candidates


def requested_schemes(settings: dict[str, list[Any]]) -> list[QuantScheme]:
    """The weight grids a search's settings ask for: each bits x group size (or x ``granularity``,
    ``tensor`` or ``channel``, when the settings give one, as eqnet's) x symmetric."""
    if "granularity" in settings:
        layouts = [{"granularity": granularity} for granularity in settings["granularity"]]
    else:
        layouts = [{"group_size": group_size} for group_size in settings.get("group_size", [128])]
    schemes = []
    for bits in settings.get("bits", []):
        for layout in layouts:
            for symmetric in settings.get("symmetric", [True]):
                try:
                    schemes.append(QuantScheme(bits=bits, symmetric=symmetric, **layout))
                except ValidationError as error:
                    problem = error.errors()[0]
                    setting = ".".join(map(str, problem["loc"]))
                    raise ValueError(f"{setting} {problem['input']!r}: {problem['msg']}") from None
    return schemes


class SearchParams(MethodParams):
    """Parameters every search method shares: the candidates it considers and its budget."""

    providers: list[str] | None = Field(
        None,
        description="Methods whose candidates are considered (a list of names such as gptq); default: every installed "
        "method that offers candidates, but those whose candidates come from a stage this recipe lacks (eqnet's "
        "supernet) (`compress methods NAME` says what each understands).",
    )
    settings: dict[str, list[Any]] = Field(
        description="Values to try per setting, e.g. {bits: [2, 3, 4, 5, 6, 7, 8], group_size: [64]}; "
        "settings a provider does not list take its defaults."
    )
    budget: Budget = Field(
        description="The budget, in one cost unit: {bits_per_weight: 3.0} (storage of the targeted "
        "weights with their scales, per weight), {bits: N} (their total), {bitops_per_weight: 48}, "
        "{bitops: N} (per token), {params_kept: 0.5} (fraction of targeted weights kept), {params: N}. "
        "The chosen configuration costs at most the budget, and as close to it as the candidates allow."
    )

    @field_validator("settings")
    @classmethod
    def _schemes_exist(cls, settings: dict[str, list[Any]]) -> dict[str, list[Any]]:
        requested_schemes(settings)
        return settings


@dataclass
class LayerChoices:
    """One targeted layer and its candidates."""

    name: str
    module: nn.Module
    candidates: list[Candidate]

    @property
    def weights(self) -> int:
        return self.module.weight.numel()

    @property
    def quantizes_inputs(self) -> bool:
        """Some candidate quantizes the layer's input (``Candidate.inputs``)."""
        return any(candidate.inputs is not None for candidate in self.candidates)


class SearchSpace:
    """Every targeted layer's candidates, their costs, and the configuration in the model.

    A configuration is one candidate index per layer. Costs are also given per layer as
    ``density`` (cost per weight of the layer) and ``share`` (the layer's fraction of the
    targeted weights), so that a configuration's cost per weight is ``Σ_i share_i ·
    density_i,k_i``: the weighted average RCO's manifold is built on (bits per weight when
    the unit is bits).
    """

    def __init__(self, layers: list[LayerChoices], budget: Budget) -> None:
        self.layers = layers
        self.budget = budget
        self.weights = sum(layer.weights for layer in layers)
        self.target = budget.total(self.weights) / self.weights
        """The budget as cost per targeted weight."""
        width = max(len(layer.candidates) for layer in layers)
        self.valid = torch.zeros(len(layers), width, dtype=torch.bool)
        self.density = torch.zeros(len(layers), width, dtype=torch.float64)
        self.errors = torch.zeros(len(layers), width, dtype=torch.float64)
        for i, layer in enumerate(layers):
            count = len(layer.candidates)
            self.valid[i, :count] = True
            self.density[i, :count] = torch.tensor([c.cost / layer.weights for c in layer.candidates])
            self.errors[i, :count] = torch.tensor([c.error for c in layer.candidates])
        self.share = torch.tensor([layer.weights / self.weights for layer in layers], dtype=torch.float64)
        self.current: list[int | None] = [None] * len(layers)

    @property
    def costs(self) -> torch.Tensor:
        """(layers, candidates) cost of each candidate per targeted weight (0 where a layer has fewer)."""
        return self.density * self.share[:, None]

    def cost(self, choice: list[int]) -> float:
        """A configuration's cost per targeted weight."""
        return self.costs[torch.arange(len(choice)), torch.tensor(choice, dtype=torch.long)].sum().item()

    def bounds(self) -> tuple[float, float]:
        """The cheapest and the dearest configuration's cost per targeted weight."""
        costs = self.costs
        cheapest = costs.masked_fill(~self.valid, float("inf")).min(1).values.sum().item()
        return cheapest, costs.max(1).values.sum().item()

    @contextmanager
    def quantized_inputs(self) -> Iterator[None]:
        """Inside, a layer whose candidates quantize inputs sees its input as its current candidate
        quantizes it (:meth:`put`); as it is while no candidate is current (as in RCO's mixtures,
        which quantize the inputs themselves)."""
        handles = [
            layer.module.register_forward_pre_hook(self._input_hook(i))
            for i, layer in enumerate(self.layers)
            if layer.quantizes_inputs
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _input_hook(self, i: int) -> Callable[[nn.Module, tuple], tuple | None]:
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            k = self.current[i]
            inputs = None if k is None else self.layers[i].candidates[k].inputs
            return None if inputs is None else (inputs(args[0]), *args[1:])

        return hook

    def put(self, choice: list[int]) -> None:
        """Give every layer the weights of its chosen candidate (only the layers whose choice changed)."""
        with torch.no_grad():
            for i, k in enumerate(choice):
                if self.current[i] != k:
                    self.layers[i].candidates[k].apply(self.layers[i].module)
                    self.current[i] = k


class SearchMethod(Method):
    """A search: one candidate per targeted layer under a budget (subclasses implement :meth:`search`)."""

    kind: ClassVar[MethodKind] = "search"
    Params: ClassVar[type[SearchParams]] = SearchParams
    needs_data: ClassVar[tuple[str, ...]] = ("calibration",)
    supported_modules: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    """What a search may target; ``check_stage`` then refuses a layer no asked provider offers variants of."""

    def __init__(self, params: SearchParams) -> None:
        super().__init__(params)
        self.earlier: list[Method] = []
        """The methods of the recipe's stages before this one (:meth:`check_previous_stages`)."""

    def search(self, context: Context, run: StageRun, space: SearchSpace) -> list[int]:
        """One candidate index per layer of ``space``, costing at most ``space.target`` per weight;
        the model is on the device. Put stage-level results in ``run.record.details``."""
        raise NotImplementedError

    # --- recipe check ----------------------------------------------------------------

    def produces(self) -> Produces:
        """Mixed precision: a grid for each requested bits x group size x symmetric; sparsity when requested."""
        settings = self.params.settings
        schemes = requested_schemes(settings)
        sparsity = None
        if "sparsity" in settings:
            patterns = {value for value in settings["sparsity"] if isinstance(value, str)}
            sparsity = patterns.pop() if len(patterns) == 1 and len(settings["sparsity"]) == 1 else "unstructured"
        return Produces(mixed=tuple(dict.fromkeys(schemes)), sparsity=sparsity)

    def check_previous_stages(self, previous: list[Method]) -> None:
        """Keep the earlier stages' methods: a provider whose candidates come from one of them (a
        supernet) offers them only after it, in the space it trained (:meth:`providers`)."""
        self.earlier = list(previous)

    def providers(self, methods: dict[str, type[Method]]) -> dict[str, CandidateOffer]:
        """The offers of the providers this search asks, by method name: those ``providers`` names, or
        by default every installed one but those the earlier stages leave nothing to offer."""
        offering = {name: cls.offers for name, cls in methods.items() if cls.offers is not None}
        if self.params.providers is None:
            return {name: offer for name, offer in offering.items() if self.missing(offer) is None}
        for name in self.params.providers:
            if name not in offering:
                hint = did_you_mean(name, list(offering))
                raise UserError(f"no installed method named {name!r} offers candidates{hint}")
            reason = self.missing(offering[name])
            if reason is not None:
                raise UserError(f"provider {name!r} has no candidates here: {reason}")
        return {name: offering[name] for name in self.params.providers}

    def missing(self, offer: CandidateOffer) -> str | None:
        """Why ``offer`` has no candidates after this search's earlier stages, or None when it has
        (it raises for requested values those stages rule out)."""
        return None if offer.check_earlier is None else offer.check_earlier(self.params.settings, self.earlier)

    def check_stage(self, methods: dict[str, type[Method]], targets: dict[str, nn.Module], writer: Any) -> None:
        providers = self.providers(methods)
        request = self.request(providers)
        for setting in request.settings:
            if not any(setting in offer.settings for offer in providers.values()):
                known = "; ".join(f"{name}: {', '.join(sorted(offer.settings))}" for name, offer in providers.items())
                raise UserError(f"candidate setting {setting!r} is understood by no provider ({known})")
        unit = self.params.budget.unit
        if not request.methods:
            raise UserError(unpriced(self.params.budget, providers))
        nominal = all(providers[name].nominal for name in request.methods)
        if writer is not None and unit in ("bits", "bitops") and not writer.capabilities.packed_weights and not nominal:
            raise UserError(
                f"a budget in {self.params.budget.key} cannot be met by output format {writer.name!r}, which "
                "does not store weights as their integer codes (use compressed-tensors)"
            )
        cheapest = dearest = 0.0
        priced = exact = True
        for name, module in targets.items():
            offered = {
                provider: settings
                for provider, offer in providers.items()
                if isinstance(module, offer.modules) and (settings := offer.settings_for(module, request))
            }
            if not offered:
                raise UserError(
                    f"no candidate provider offers variants of this {type(module).__name__} with settings "
                    f"{dict(request.settings)} (providers: {', '.join(providers)})",
                    name,
                )
            usable = {provider: settings for provider, settings in offered.items() if provider in request.methods}
            if not usable:
                offering = {provider: providers[provider] for provider in offered}
                raise UserError(unpriced(self.params.budget, offering, f" for this {type(module).__name__}"), name)
            ranges = [
                providers[provider].cost_range(module, setting, unit)
                for provider, settings in usable.items()
                for setting in settings
            ]
            if not priced or None in ranges:
                priced = False
                continue
            exact = exact and all(low == high for low, high in ranges)
            cheapest += min(low for low, _ in ranges)
            dearest += max(high for _, high in ranges)
        if priced:
            weights = sum(module.weight.numel() for module in targets.values())
            self.check_budget(cheapest / weights, dearest / weights, weights, exact)

    def check_budget(self, cheapest: float, dearest: float, weights: int, exact: bool = True) -> None:
        """Refuse a budget below the cheapest or above the dearest configuration (costs per weight); not
        ``exact``: ``cheapest`` and ``dearest`` are only bounds on them (the candidates decide the rest)."""
        budget = self.params.budget
        target = budget.total(weights) / weights
        key = budget.key
        low = f"{'' if exact else 'at least '}{budget.in_key(cheapest * weights, weights):.6g}"
        high = f"{'' if exact else 'at most '}{budget.in_key(dearest * weights, weights):.6g}"
        reachable = f"reachable: {low} to {high}{'' if exact else ', bounds known before the candidates exist'}"
        if target < cheapest * (1 - 1e-9):
            raise UserError(
                f"budget {key}: {budget.value:g} is below the cheapest configuration "
                f"({key}: {low}, every layer at its cheapest candidate; {reachable})"
            )
        if target > dearest * (1 + 1e-9):
            raise UserError(
                f"budget {key}: {budget.value:g} is above the dearest configuration "
                f"({key}: {high}, every layer at its dearest candidate; {reachable})"
            )

    def request(self, providers: dict[str, CandidateOffer]) -> CandidateRequest:
        """What every layer is asked for: the settings, in the budget's unit, from those of the asked
        ``providers`` whose offer prices that unit (the ones ``compress recipe check`` vetted)."""
        unit = self.params.budget.unit
        methods = frozenset(name for name, offer in providers.items() if unit in offer.costs)
        return CandidateRequest(dict(self.params.settings), methods, unit)

    # --- the run ---------------------------------------------------------------------

    def apply(self, context: Context, run: StageRun) -> None:
        started = time.perf_counter()
        space = SearchSpace(self.collect(context, run), self.params.budget)
        cheapest, dearest = space.bounds()
        self.check_budget(cheapest, dearest, space.weights)
        collected = time.perf_counter()
        whole = onloaded(context.model, context.device) if context.sequential else nullcontext()
        with whole, space.quantized_inputs():
            choice = self.search(context, run, space)
            space.put(choice)
        searched = time.perf_counter()
        self.commit(context, run, space, choice)
        budget = self.params.budget
        run.record.details.update(
            {
                "budget": {budget.key: budget.value},
                "achieved": {budget.key: budget.in_key(space.cost(choice) * space.weights, space.weights)},
                "cheapest": {budget.key: budget.in_key(cheapest * space.weights, space.weights)},
                "dearest": {budget.key: budget.in_key(dearest * space.weights, space.weights)},
                "candidates": sum(len(layer.candidates) for layer in space.layers),
                "collect_seconds": collected - started,
                "search_seconds": searched - collected,
            }
        )
        context.files[f"{run.stage.label}-allocation.png"] = allocation_plot(space, choice, run.stage.label)

    def collect(self, context: Context, run: StageRun) -> list[LayerChoices]:
        """Every targeted layer's candidates, with its input statistics when a provider needs them."""
        providers = self.providers(context.host.methods())
        request = self.request(providers)
        if any(providers[name].needs_inputs for name in request.methods):
            found = self.collect_with_inputs(context, run, request)
        else:
            found = {}
            for name, module in run.targets.items():
                with onloaded(module, context.device) if context.sequential else nullcontext():
                    found[name] = collect_candidates(context, name, module, request)
        layers = []
        for name, module in run.targets.items():
            candidates = found.get(name) or []
            if not candidates:
                raise UserError(f"no candidate provider offered a variant of this layer ({request.settings})", name)
            for candidate in candidates:  # page-locked on CUDA: searches copy them to the device often
                candidate.weight = candidate.weight.to("cpu")
                if pinned(context.device):
                    candidate.weight = candidate.weight.pin_memory()
            layers.append(LayerChoices(name, module, candidates))
        return layers

    def collect_with_inputs(
        self, context: Context, run: StageRun, request: CandidateRequest
    ) -> dict[str, list[Candidate]]:
        """Stream the calibration data through the original model's blocks; ask for each targeted
        layer's candidates with its Hessian. Targets outside the blocks (an lm_head) get theirs
        from a pass with the blocks skipped, on the last block's outputs."""
        model, device = context.model, context.device
        samples = context.data("calibration")
        blocks_name, blocks = find_blocks(model)
        inputs = capture_block_inputs(model, blocks, blocks_name, samples, device)
        outside = {n: m for n, m in run.targets.items() if not within(n, blocks_name)}
        found: dict[str, list[Candidate]] = {}
        returns_tuple = False
        for index, block in enumerate(blocks):
            block_name = f"{blocks_name}.{index}"
            in_block = {n: m for n, m in run.targets.items() if within(n, block_name)}
            with onloaded(block, device) if context.sequential else nullcontext():
                if in_block:
                    hessians, _ = collect_hessians(block, in_block, inputs, device)
                    found.update(self.offered(context, in_block, hessians, request))
                    del hessians
                if outside or any(within(n, blocks_name) and n not in found for n in run.targets):
                    inputs, returns_tuple = run_block(block, inputs, device)
            context.host.hook.compress_block_done(
                context=context, stage=run.stage, block_name=block_name, block_index=index, num_blocks=len(blocks)
            )
        if outside:
            with skipping_blocks(model, device, returns_tuple) as skipped:

                def after_blocks(hidden: torch.Tensor, sample: dict[str, torch.Tensor]) -> None:
                    skipped(device_batch(sample, device), hidden)

                pairs = [((hidden_states(args, kwargs), sample), {}) for (args, kwargs), sample in zip(inputs, samples)]
                hessians, _ = collect_hessians(after_blocks, outside, pairs, device)
            found.update(self.offered(context, outside, hessians, request))
        return found

    @staticmethod
    def offered(
        context: Context, layers: dict[str, nn.Module], hessians: dict[str, Any], request: CandidateRequest
    ) -> dict[str, list[Candidate]]:
        """Each layer's candidates, asked with its Hessian (those without one are asked without)."""
        found = {}
        for name, module in layers.items():
            asked = request
            if name in hessians:
                asked = replace(request, inputs=LayerInputs(hessians[name].matrix, hessians[name].tokens))
            with onloaded(module, context.device) if context.sequential else nullcontext():
                found[name] = collect_candidates(context, name, module, asked)
        return found

    def commit(self, context: Context, run: StageRun, space: SearchSpace, choice: list[int]) -> None:
        """Record the chosen variants (already in the model) in ``context.layers`` and the report."""
        for layer, k in zip(space.layers, choice):
            candidate = layer.candidates[k]
            state = candidate.state
            context.update_layer(layer.name, method=state.method, quant=state.quant, sparsity=state.sparsity)
            run.record.layers[layer.name] = {
                "method": candidate.method,
                "setting": candidate.setting,
                "cost": candidate.cost,
                "cost_per_weight": candidate.cost / layer.weights,
                "error": candidate.error,
            }


def unpriced(budget: Budget, offers: dict[str, CandidateOffer], what: str = "") -> str:
    """The one line refusing a budget whose unit none of ``offers`` prices (``what``: for which layer)."""
    listing = "; ".join(f"{name}: {', '.join(sorted(offer.costs))}" for name, offer in offers.items())
    return f"budget in {budget.key}: no candidate provider{what} prices {budget.unit} (they price: {listing})"


def allocation_plot(space: SearchSpace, choice: list[int], title: str) -> bytes:
    """A PNG bar chart of each layer's chosen cost per weight, with the budget as a line."""
    values = space.density[torch.arange(len(choice)), torch.tensor(choice, dtype=torch.long)].tolist()
    return allocation_png(values, space.target, f"{space.budget.unit} per weight", title)
