"""What the stages of a run share: model, tokenizer, data, the original model, the report."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.distributed import fsdp_requested, local_rank
from compress.errors import UserError
from compress.recipe import ModelSpec

if TYPE_CHECKING:
    from compress.activation_points import ActivationPoint
    from compress.checkpoint import LoadedModel, Loader
    from compress.data import Sample
    from compress.host import PluginHost
    from compress.method import Method
    from compress.quant import QuantGrid
    from compress.quant.activations import ActivationQuant
    from compress.recipe import Recipe, Stage


@dataclass
class OutlierSplit:
    """Weights held apart from the layer's main grid, quantized on a grid of their own."""

    mask: torch.Tensor
    """Bool, the weight's shape: True where a weight is an outlier."""
    grid: QuantGrid
    """The grid the outliers lie on; the inliers lie on ``LayerState.quant``."""


@dataclass
class LayerState:
    """How a layer's current weights were compressed; writers and later stages read it."""

    method: str
    quant: QuantGrid | None = None
    """The grid the weights (the inliers, when there are outliers) lie on."""
    outliers: OutlierSplit | None = None
    sparsity: str | None = None
    """The zero pattern the weights hold: ``"unstructured"`` (any zeros) or ``"N:M"``, e.g.
    ``"2:4"``: at most N nonzeros in every M consecutive weights of a row (along the input
    dimension), the pattern semi-structured sparse kernels need. Writers record it in the
    checkpoint's ``sparsity_config``; a later stage that changes the weights must keep the
    pattern and carry this field over (``dataclasses.replace(state, quant=...)``)."""
    activations: ActivationQuant | None = None
    """How the layer's inputs are quantized at inference (W8A8): dynamic per-token or
    per-tensor, or static with a calibrated scale. Writers that store activation
    quantization record it; evaluation applies it to the in-memory model."""


@dataclass
class StageRecord:
    """One stage's entry in report.json."""

    name: str
    method: str
    kind: str
    """The method's kind: data-free, calibration, training or search."""
    params: dict[str, Any]
    produces: dict[str, Any]
    """What the method leaves in the layers (:meth:`compress.method.Produces.to_json`)."""
    seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer details the method reported (error, bits, outlier fraction, ...)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Stage-level results (loss curve, budget reached, ...); methods fill it through ``StageRun.record``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageRun:
    """A stage being run: the method instance and the modules it targets."""

    stage: Stage
    method: Method
    targets: dict[str, nn.Module]
    record: StageRecord
    index: int
    total: int


@dataclass
class Report:
    """Everything report.json holds."""

    model: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each phase of the run as far as it got, in order: ``load``, ``stages`` (all stages, moves
    between host and device included), ``write``, ``evaluation``: ``seconds``, ``peak_host_bytes``
    and ``peak_device_bytes``; an evaluation that Ctrl-C stopped after the write also has
    ``interrupted: true``. (report.json is written after the evaluation: its own writing and
    the model card's are not counted.)"""
    evaluation: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    """Where the recipe came from (``source``: its file, or ``<mapping>``) and the ``overrides``
    (``--set`` options) applied to it; the output's recipe.yaml holds the recipe as run."""

    @property
    def totals(self) -> dict[str, float]:
        """All phases together: their seconds added up, the largest of their peaks."""
        if not self.phases:
            return {}
        return {
            "seconds": sum(phase["seconds"] for phase in self.phases.values()),
            "peak_host_bytes": max(phase["peak_host_bytes"] for phase in self.phases.values()),
            "peak_device_bytes": max(phase["peak_device_bytes"] for phase in self.phases.values()),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stages": [stage.to_json() for stage in self.stages],
            "phases": self.phases,
            "totals": self.totals,
            "evaluation": self.evaluation,
            "environment": self.environment,
            "recipe": self.recipe,
        }


def environment_info(device: torch.device) -> dict[str, str]:
    import transformers

    from compress import __version__

    info = {
        "compress": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(name: str) -> torch.device:
    """The recipe's device; under ``accelerate launch`` / torchrun each process takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank() is not None:
        return torch.device("cuda", local_rank())
    return torch.device(name)


@dataclass
class Context:
    """The state one ``compress apply`` run shares between its stages.

    Stages never talk to each other except through the context.
    """

    host: PluginHost
    recipe: Recipe
    loaded: LoadedModel
    loader: Loader
    device: torch.device
    report: Report
    layers: dict[str, LayerState] = field(default_factory=dict)
    points: dict[str, ActivationPoint] = field(default_factory=dict)
    """Activation quantization at points beyond what ``LayerState.activations`` holds (attention
    operands, low-bit Linear inputs), by point name (:mod:`compress.activation_points`); the
    evaluation of the in-memory model computes through them and writers that cannot store
    them are refused (``Produces.activation_points``)."""
    resume: bool = False
    """Training stages continue from their checkpoints (``compress apply --resume``)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-plugin state across stages, by key (by convention the method's name): a stage writes
    ``context.state[key]``, a later one reads it. Methods declare the keys they write and read
    (``Method.writes_state`` / ``reads_state``; ``compress recipe check`` refuses a read no earlier
    stage writes). Training checkpoints hold it (pickled) and ``--resume`` restores it, tensors on
    the host."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Files a stage adds to the output directory, by name (a search's allocation plot); written
    next to report.json, with the checkpoint, atomically."""
    _data: dict[str, list[Sample]] = field(default_factory=dict)
    _reference: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def task(self) -> str:
        return self.loaded.task

    @property
    def sequential(self) -> bool:
        """Whether blocks go to the device one at a time (``sequential`` and ``lazy`` modes, and
        FSDP runs, whose training stage shards the model over the devices instead)."""
        return self.recipe.run.mode in ("sequential", "lazy") or fsdp_requested()

    def update_layer(self, name: str, **changes: Any) -> LayerState:
        """Record what a stage did to a layer, keeping what earlier stages recorded.

        ``changes`` are LayerState fields; e.g. a quantizer after a pruner sets ``method``
        and ``quant`` and the layer keeps its ``sparsity``.
        """
        previous = self.layers.get(name)
        self.layers[name] = replace(previous, **changes) if previous else LayerState(**changes)
        return self.layers[name]

    def data(self, name: str) -> list[Sample]:
        """The recipe's dataset ``name`` as samples (:data:`compress.data.Sample`; read once, then cached)."""
        if name not in self._data:
            spec = self.recipe.data[name]
            source = self.host.data_sources()[spec.source]
            self._data[name] = source.load(spec, self.tokenizer)
        return self._data[name]

    def load_model(self, spec: ModelSpec | str) -> nn.Module:
        """Another model than the run's (a teacher, a reference checkpoint), on the host in eval mode
        (weightless until sharded where FSDP loads lazily: :func:`compress.training.sharding.loads_lazily`).

        ``spec`` is written like a recipe's ``model:`` (or is just its name) and is loaded by
        the loader that would load it as a recipe's model; a UserError naming it when no
        loader knows it. Each call loads afresh: keep what you need.
        """
        from compress.training.sharding import load_for_run

        if isinstance(spec, str):
            spec = ModelSpec(name=spec)
        return load_for_run(self.host, self.recipe, self.host.loader_for(spec), spec).model.eval()

    def reference_model(self) -> nn.Module:
        """The original, uncompressed model, loaded again on first use (on the host); refused
        in ``run: mode: lazy``, which exists because the model does not fit the host."""
        if self._reference is None:
            if self.recipe.run.mode == "lazy":
                raise UserError(
                    "run: mode: lazy never loads the whole model, so nothing here can read the original "
                    "one (e.g. gptq's target: original); use mode: sequential"
                )
            from compress.training.sharding import load_for_run

            self._reference = load_for_run(self.host, self.recipe, self.loader, self.recipe.model).model.eval()
        return self._reference
