"""``eqnet_search``: picks a sub-network of the supernet for a budget and exports it."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.api import (
    Context,
    DataSpec,
    Method,
    MethodKind,
    MethodParams,
    Produces,
    QuantGrid,
    QuantScheme,
    StageRun,
    UserError,
    onloaded,
    point_name,
)
from compress_eqnet.configuration import check_source, configured_subnet, from_stages
from compress_eqnet.efficiency import Efficiency, average_gap, layer_costs
from compress_eqnet.evolution import Evolution, Genes, sample_bits
from compress_eqnet.method import STATE_KEY, SUPERNET_FILE, check_bits, ordered_layers
from compress_eqnet.points import input_point
from compress_eqnet.predictor import AccuracyPredictor, Encoder, fit_predictor
from compress_eqnet.quantizers import BITS
from compress_eqnet.subnets import Measurer
from compress_eqnet.supernet import Space, Subnet, Supernet, latent_weight


class EQNetSearchParams(MethodParams):
    """Parameters of ``eqnet_search``; search defaults from EQ-Net's ``search/04_search_mpq.py``."""

    average_bits: float | None = Field(
        None,
        gt=0,
        description="budget: average weight bits and average input bits both in (c - 0.5, c] (the code's "
        "constraint; parameter- and feature-map-weighted, first and last layer left out)",
    )
    bitops: float | None = Field(
        None, gt=0, description="budget: at most this many bit operations per image (Σ MACs · w_bits · a_bits)"
    )
    bits: int | None = Field(None, description="no search: export the uniform sub-network W{bits}A{bits}")
    configuration: str | None = Field(
        None,
        description="no search: evaluate and export the per-layer configuration an earlier stage of this recipe "
        "recorded (its label: rco or evopress over eqnet's candidates, another eqnet_search), or the last one "
        "a report.json at this path records",
    )
    record_inputs: bool = Field(
        True,
        description="list each layer's input quantization (the sub-network's input bits and learned steps) as "
        "activation points of the output (format dense), so that compress eval quantizes inputs as measured here; "
        "false: the checkpoint holds the weights only (inputs in report.json)",
    )
    granularity: Literal["channel", "tensor"] = Field("tensor", description="weight granularity of the sub-network")
    w_symmetric: bool = Field(True, description="symmetric weight grids (the code's search condition)")
    a_symmetric: bool = Field(False, description="symmetric input grids (the code's search condition)")
    supernet: Path | None = Field(
        None,
        description=f"the {SUPERNET_FILE} of an earlier eqnet run (whose output is the model); unset: the "
        "eqnet stage of this recipe",
    )
    holdout: str = Field("holdout", description="data: entry the sub-networks' accuracy is measured on")
    calibration: str = Field("calibration", description="data: entry (training images) for batch-norm recalibration")
    test_data: str | None = Field(
        None, description="data: entry on which the exported and the uniform sub-networks are also measured"
    )
    evaluate_uniform: list[int] = Field([], description="uniform W{b}A{b} sub-networks also measured, e.g. [2, 4, 8]")
    bn_batches: int = Field(4, gt=0, description="calibration batches that re-estimate batch-norm statistics")
    batch_size: int = Field(256, gt=0, description="images per forward pass when measuring")
    predictor_samples: int = Field(1000, ge=10, description="sub-networks measured to train the accuracy predictor")
    predictor_epochs: int = Field(100, gt=0, description="epochs of the accuracy predictor")
    population: int = Field(100, ge=4, description="genetic search: population size")
    generations: int = Field(500, gt=0, description="genetic search: generations")
    mutate_prob: float = Field(0.1, gt=0, le=1, description="genetic search: per-gene mutation probability")
    seed: int = Field(0, description="seed of sampling and search")

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        given = [key for key in ("average_bits", "bitops", "bits", "configuration") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of average_bits, bitops (a budget), bits (a uniform sub-network) or "
                "configuration (a given one)"
            )
        if self.bits is not None:
            check_bits([self.bits], "bits")
        for bits in self.evaluate_uniform:
            check_bits([bits], "evaluate_uniform")
        return self

    @property
    def searches(self) -> bool:
        """Whether the stage searches (a budget), rather than taking a given sub-network."""
        return self.average_bits is not None or self.bitops is not None


class EQNetSearch(Method):
    """Search and export of one EQ-Net sub-network (Xu et al., ICCV 2023; ``search/0{2,3,4}_*.py``).

    Restores the supernet of an ``eqnet`` stage (or of ``supernet:``, the file an earlier run
    wrote), then, for a budget: measures ``predictor_samples`` random sub-networks on the
    ``holdout`` data after re-estimating batch-norm statistics on ``calibration`` images,
    trains the conditional accuracy predictor on them (Kendall τ on a held-out fifth; later
    search stages of the run reuse it), and runs the genetic search for the best predicted
    sub-network under the budget at the given condition (granularity, symmetries). With
    ``bits`` the uniform sub-network is taken instead, with ``configuration`` a given one
    (:mod:`compress_eqnet.configuration`: what rco/evopress chose among eqnet's candidates,
    measured exactly as the search measures its sub-networks). The chosen sub-network is
    measured (inputs quantized, batch norms re-estimated; the statistics stay in the
    output), its weights are replaced by their quantized values (symmetric grids are
    recorded as the layer's grid, so formats that store them can), and report.json gets its
    configuration, average bits, BitOps, predicted and measured accuracy. Each layer's
    input quantizer at the chosen bits becomes the activation point ``<layer>:input``
    (:mod:`compress_eqnet.points`; ``record_inputs``), which the dense writer lists for a
    runtime and ``compress eval`` and the recipe's ``evaluate`` apply.
    """

    name = "eqnet_search"
    kind: ClassVar[MethodKind] = "search"
    Params = EQNetSearchParams
    params: EQNetSearchParams
    default_targets: ClassVar[list[str]] = ["Conv2d", "Linear"]
    default_ignore: ClassVar[list[str]] = []
    supported_modules = (nn.Conv2d, nn.Linear)

    def data_entries(self) -> list[str]:
        """The ``data:`` entries the stage reads."""
        params = self.params
        names = [params.holdout, params.calibration] if params.searches else [params.calibration]
        return names + ([params.test_data] if params.test_data else [])

    def check_data(self, data: dict[str, DataSpec]) -> None:
        for name in self.data_entries():
            if name not in data:
                raise UserError(f"method {self.name!r} needs data: {name}: in the recipe")
            if data[name].source != "images":
                raise UserError(
                    f"eqnet_search measures image classifiers: data: {name}: has source {data[name].source!r}"
                )

    def check_previous_stages(self, previous: list[Method]) -> None:
        trained = [method for method in previous if method.name == "eqnet"]
        if not trained and self.params.supernet is None:
            raise UserError(
                "eqnet_search needs an eqnet stage before it (the supernet), or supernet: the "
                f"{SUPERNET_FILE} an earlier eqnet run wrote"
            )
        if self.params.configuration is not None:
            check_source(self.params.configuration, previous)
        if trained:
            self.check_space(trained[-1].params.space())
        elif self.params.supernet is not None:
            state = load_supernet(self.params.supernet)
            space = space_of(state)
            self.check_space(space)
            self.check_reachable(
                Efficiency([state["costs"][name] for name in state["layers"]], space.fixed_bits), space
            )

    def check_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor] | None, earlier: list[tuple[Method, list[str]]]
    ) -> None:
        """Refuse a budget no sub-network of the recipe's ``eqnet`` stage meets (:meth:`check_reachable`):
        its layers' costs per image come from the meta model's forward pass on one image shaped as
        the data, as ``eqnet`` measures them on one training image when it runs."""
        trained = [(method, names) for method, names in earlier if method.name == "eqnet"]
        if not self.params.searches or inputs is None or not trained:
            return
        method, names = trained[-1]
        layers = ordered_layers(model, {name: model.get_submodule(name) for name in names})
        costs = layer_costs(model, layers, inputs["pixel_values"])
        uncalled = [name for name in layers if name not in costs]
        if uncalled:
            raise UserError(f"the model's forward pass never calls {uncalled[0]}, a layer of the eqnet stage")
        space = method.params.space()
        self.check_reachable(Efficiency([costs[name] for name in layers], space.fixed_bits), space)

    def check_space(self, space: Space) -> None:
        """Refuse a condition, a uniform width or an average-bits budget the supernet's space cannot meet."""
        params = self.params
        conditions = (
            ()
            if params.configuration is not None
            else (  # a given configuration names its own
                ("granularity", params.granularity == "channel", space.channel),
                ("w_symmetric", params.w_symmetric, space.w_symmetric),
                ("a_symmetric", params.a_symmetric, space.a_symmetric),
            )
        )
        for key, value, allowed in conditions:
            if value not in allowed:
                shown = params.granularity if key == "granularity" else value
                raise UserError(f"{key}: {shown} is not in the supernet's elastic space")
        for bits in [*params.evaluate_uniform, *([params.bits] if params.bits else [])]:
            if bits not in space.w_bits or bits not in space.a_bits:
                raise UserError(
                    f"W{bits}A{bits} is outside the supernet's elastic space "
                    f"(weights {list(space.w_bits)}, inputs {list(space.a_bits)})",
                    "bits",
                )
        if params.average_bits is not None:
            c = params.average_bits
            smallest = max(min(space.w_bits), min(space.a_bits))
            largest = min(max(space.w_bits), max(space.a_bits))
            if c < smallest:
                raise UserError(
                    f"average_bits: {c:g} is below every sub-network (smallest reachable average_bits: {smallest})",
                    "average_bits",
                )
            if c - 0.5 >= largest:
                raise UserError(
                    f"average_bits: {c:g} asks for more than {c - 0.5:g} bits on average; the largest sub-network "
                    f"has {largest} (largest reachable average_bits: {largest + 0.5:g}, exclusive)",
                    "average_bits",
                )

    def check_stage(self, methods: dict[str, Any], targets: dict[str, nn.Module], writer: Any) -> None:
        if writer is not None and writer.name != "dense" and not self.params.w_symmetric:
            raise UserError(
                "asymmetric LSQ+ weights have a real-valued offset that no integer zero-point grid holds: "
                "use output format dense"
            )

    def produces(self) -> Produces:
        granularity = self.params.granularity
        symmetric = self.params.w_symmetric
        return Produces(
            mixed=tuple(QuantScheme(bits=b, granularity=granularity, symmetric=symmetric) for b in BITS),
            activation_points=("input",) if self.params.record_inputs else (),
        )

    # --- the run ---------------------------------------------------------------------

    def apply(self, context: Context, run: StageRun) -> None:
        params = self.params
        state = self.supernet_state(context)
        space = space_of(state)
        self.check_space(space)
        model = context.model
        modules = dict(model.named_modules())
        missing = [name for name in state["layers"] if name not in modules]
        if missing:
            raise UserError("the supernet's layer is not in the model (a supernet of another model?)", missing[0])
        layers = {name: modules[name] for name in state["layers"]}
        efficiency = Efficiency([state["costs"][name] for name in layers], space.fixed_bits)
        self.check_reachable(efficiency, space)
        if "latent" in state:  # an earlier search stage replaced the weights: start from the supernet's again
            model.load_state_dict(state["latent"])
        else:
            state["latent"] = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        details = run.record.details
        with onloaded(model, context.device):
            supernet = Supernet(layers, space)
            supernet.load_state_dict(state["quantizers"])
            supernet.install()
            try:
                measurer = Measurer(context, supernet, params)
                condition = (params.granularity == "channel", params.w_symmetric, params.a_symmetric)
                details["uniform"] = {
                    f"W{b}A{b}": measurer.report(Subnet.uniform(len(layers), b, b, *condition))
                    for b in params.evaluate_uniform
                }
                predicted = None
                if params.bits is not None:
                    chosen = Subnet.uniform(len(layers), params.bits, params.bits, *condition)
                elif params.configuration is not None:
                    entries = from_stages(params.configuration, context.report.stages)
                    chosen = configured_subnet(entries, list(layers), space)
                else:
                    chosen, predicted = self.search(context, state, space, efficiency, measurer, condition, details)
                details["measured"] = measurer.report(chosen)  # leaves its batch-norm statistics in the model
                supernet.set(chosen)
                quantized = {name: supernet.weights[name](latent_weight(m)).detach() for name, m in layers.items()}
                grids = {name: supernet.weights[name].grid() for name in layers}
                inputs = {name: supernet.inputs[name].grid() for name in layers}
                points = {
                    point_name(name, "input"): input_point(
                        state["quantizers"]["inputs"][name], supernet.inputs[name].bits, supernet.inputs[name].symmetric
                    )
                    for name in layers
                }
            finally:
                supernet.remove()
            with torch.no_grad():
                for name, module in layers.items():
                    module.weight.copy_(quantized[name])
        self.commit(context, run, layers, chosen, grids, inputs, space)
        for name in points:  # an earlier eqnet_search stage's points give way to this sub-network's
            context.points.pop(name, None)
        if params.record_inputs:
            context.points.update(points)
        w_avg, a_avg = efficiency.average_bits(chosen.w_bits, chosen.a_bits)
        details.update(
            subnet=chosen.to_json(),
            average_bits={"weights": w_avg, "inputs": a_avg},
            bitops=efficiency.bitops(chosen.w_bits, chosen.a_bits),
            predicted_accuracy=predicted,
        )

    def supernet_state(self, context: Context) -> dict[str, Any]:
        if self.params.supernet is not None:
            return load_supernet(self.params.supernet)
        return context.state[STATE_KEY]

    def check_reachable(self, efficiency: Efficiency, space: Space) -> None:
        """Refuse a BitOps budget below the smallest sub-network's (a budget above the largest's is a
        ceiling every sub-network meets), and an ``average_bits`` window that no choice of weight bits
        (or of input bits: each side is chosen per layer on its own) averages in, with the nearest
        averages reached (:func:`~compress_eqnet.efficiency.average_gap`)."""
        if self.params.average_bits is not None:
            c = self.params.average_bits
            sides = (("weight", efficiency.params, space.w_bits), ("input", efficiency.feature_maps, space.a_bits))
            for side, weights, bits in sides:
                gap = average_gap(weights[1:-1], bits, c - 0.5, c)
                if gap is not None:
                    nearest = " and ".join(f"{average:.2f}" for average in gap if average is not None)
                    raise UserError(
                        f"average_bits: {c:g} — no sub-network's {side} bits average in ({c - 0.5:g}, {c:g}]; "
                        f"nearest reachable: {nearest}",
                        "average_bits",
                    )
        if self.params.bitops is None:
            return
        layers = len(efficiency.macs)
        smallest, largest = (
            efficiency.bitops((pick(space.w_bits),) * layers, (pick(space.a_bits),) * layers) for pick in (min, max)
        )
        if self.params.bitops < smallest:
            raise UserError(
                f"bitops: {self.params.bitops:.6g} is below every sub-network (smallest reachable bitops: "
                f"{smallest:.6g}, largest {largest:.6g}, per image)",
                "bitops",
            )

    def search(
        self,
        context: Context,
        state: dict[str, Any],
        space: Space,
        efficiency: Efficiency,
        measurer: Measurer,
        condition: tuple[bool, bool, bool],
        details: dict[str, Any],
    ) -> tuple[Subnet, float]:
        """The predictor (trained once per run) and the genetic search: the best sub-network and its prediction."""
        params = self.params
        layers = len(state["layers"])
        encoder = Encoder(space, layers)
        rng = random.Random(params.seed)
        started = time.perf_counter()
        if "predictor" not in state:
            state["predictor"] = self.train_predictor(space, encoder, measurer, layers, rng)
        cached = state["predictor"]
        predictor = AccuracyPredictor(encoder.width)
        predictor.load_state_dict(cached["weights"])
        predictor.eval()
        details["predictor"] = {**cached["fit"], "seconds": time.perf_counter() - started}

        def subnet(genes: Genes) -> Subnet:
            return Subnet(genes[0], genes[1], *((value,) * layers for value in condition))

        def predict(population: list[Genes]) -> list[float]:
            with torch.no_grad():
                return predictor(encoder.encode_all([subnet(genes) for genes in population])).tolist()

        feasible, targets = self.constraint(efficiency, space)
        evolution = Evolution(
            w_choices=space.w_bits,
            a_choices=space.a_bits,
            layers=layers,
            feasible=feasible,
            predict=predict,
            targets=targets,
            rng=rng,
            population=params.population,
            generations=params.generations,
            mutate_prob=params.mutate_prob,
        )
        started = time.perf_counter()
        predicted, genes, history = evolution.run()
        details["search"] = {
            "seconds": time.perf_counter() - started,
            "best_by_generation": history[:: max(1, len(history) // 50)],
        }
        return subnet(genes), predicted

    def constraint(self, efficiency: Efficiency, space: Space):
        """Whether genes meet the budget, and where the initial population's bits centre."""
        params = self.params
        if params.average_bits is not None:
            c = params.average_bits

            def feasible(genes: Genes) -> bool:
                w, a = efficiency.average_bits(*genes)
                return c - 0.5 < w <= c and c - 0.5 < a <= c

            return feasible, (c - 0.25, c - 0.25)

        limit = params.bitops

        def under(genes: Genes) -> bool:
            return efficiency.bitops(*genes) <= limit

        # centre the draws on the uniform width whose BitOps are closest below the budget
        layers = len(efficiency.macs)
        widths = [b for b in space.w_bits if efficiency.bitops((b,) * layers, (b,) * layers) <= limit]
        centre = float(max(widths)) if widths else float(min(space.w_bits))
        return under, (centre, centre)

    def train_predictor(
        self, space: Space, encoder: Encoder, measurer: Measurer, layers: int, rng: random.Random
    ) -> dict[str, Any]:
        """Measure random sub-networks (random condition, bits around a target drawn in [min + 0.4,
        max − 0.4], the code's 2.4..7.6) and fit the predictor on them."""
        params = self.params
        low, high = min(space.w_bits) + 0.4, max(space.w_bits) - 0.4
        subnets, accuracies = [], []
        for _ in range(params.predictor_samples):
            forms = [rng.choice(space.channel), rng.choice(space.w_symmetric), rng.choice(space.a_symmetric)]
            w = sample_bits(space.w_bits, layers, rng.uniform(low, high), rng)
            a = sample_bits(space.a_bits, layers, rng.uniform(low, high), rng)
            subnet = Subnet(w, a, *((value,) * layers for value in forms))
            subnets.append(subnet)
            accuracies.append(measurer.holdout(subnet))
        fit = fit_predictor(encoder.encode_all(subnets), torch.tensor(accuracies), params.predictor_epochs, params.seed)
        return {
            "weights": {k: v.detach().cpu() for k, v in fit.predictor.state_dict().items()},
            "fit": fit.report(),
        }

    def commit(
        self,
        context: Context,
        run: StageRun,
        layers: dict[str, nn.Module],
        chosen: Subnet,
        grids: dict[str, QuantGrid | None],
        inputs: dict[str, dict[str, float | bool]],
        space: Space,
    ) -> None:
        """Record each layer's setting, weight grid (symmetric weights only) and input grid."""
        last = len(layers) - 1
        for index, name in enumerate(layers):
            fixed = index in (0, last)
            w_bits = space.fixed_bits if fixed else chosen.w_bits[index]
            a_bits = space.fixed_bits if fixed else chosen.a_bits[index]
            channel, symmetric = chosen.channel[index], chosen.w_symmetric[index]
            context.update_layer(name, method=self.name, quant=grids[name])
            run.record.layers[name] = {
                "w_bits": w_bits,
                "a_bits": a_bits,
                "granularity": "channel" if channel else "tensor",
                "w_symmetric": symmetric,
                "a_symmetric": chosen.a_symmetric[index],
                "input_grid": inputs[name],
                "input_point": point_name(name, "input") if self.params.record_inputs else None,
            }


def load_supernet(path: Path) -> dict[str, Any]:
    """The supernet state an eqnet run wrote to ``path`` (``eqnet-supernet.pt``)."""
    if not path.is_file():
        raise UserError(f"the file {path} does not exist", "supernet")
    return torch.load(path, map_location="cpu", weights_only=True)


def space_of(state: dict[str, Any]) -> Space:
    """The elastic space recorded in a supernet state."""
    return Space(**{key: tuple(value) if isinstance(value, list) else value for key, value in state["space"].items()})
