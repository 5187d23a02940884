"""Base classes for compression methods. Plugins subclass one of them and register it.

A method declares how it runs through the class it derives from:

- :class:`LayerMethod` (data-free): ``compress_layer`` is called for every targeted
  layer; the engine streams the layers' blocks through the device.
- :class:`BlockMethod` (sequential calibration): ``compress_block`` is called for every
  transformer block with the inputs that the already-compressed earlier blocks produce.
- :class:`compress.training.method.TrainingMethod` (training): supplies a ``loss`` for the
  shared training loop, which trains the targeted layers (through their grids and masks
  when an earlier stage compressed them).
- :class:`compress.search_method.SearchMethod` (search/allocation): chooses one candidate
  variant per layer under a budget, with its own ``search``.

The engine dispatches on that class; this module imports nothing from the engine.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from compress.errors import UserError

if TYPE_CHECKING:
    import torch

    from compress.context import Context, StageRun
    from compress.quant import QuantScheme
    from compress.recipe import DataSpec
    from compress.search import CandidateOffer

MethodKind = Literal["data-free", "calibration", "training", "search"]


@dataclass(frozen=True)
class Produces:
    """What a method leaves in the layers it compresses; checked against the output format."""

    quant: QuantScheme | None = None
    """The integer grid of the weights, when the method quantizes them."""
    activation_bits: int | None = None
    sparsity: str | None = None
    """``"unstructured"`` or an ``"N:M"`` pattern."""
    outliers: bool = False
    """Some weights are held apart from the main grid on a grid of their own (``OutlierSplit``)."""
    mixed: tuple[QuantScheme, ...] = ()
    """Mixed precision: the grids a search may give its layers, one per layer (``quant`` is then
    None); the output format must hold each of them."""
    activation_points: tuple[str, ...] = ()
    """Sites quantized as activation points (``Context.points``: ``input``, ``query``, ``key``,
    ``value``, ``probs``); only formats with ``WriterCapabilities.activation_points`` hold them."""

    def schemes(self) -> tuple[QuantScheme, ...]:
        """Every grid some layer may hold: ``quant`` and the ``mixed`` ones."""
        return (() if self.quant is None else (self.quant,)) + self.mixed

    def to_json(self) -> dict[str, Any]:
        """As report.json records it for each stage."""
        return {
            "quant": None if self.quant is None else self.quant.model_dump(mode="json"),
            "activation_bits": self.activation_bits,
            "sparsity": self.sparsity,
            "outliers": self.outliers,
            "mixed": [scheme.model_dump(mode="json") for scheme in self.mixed],
            "activation_points": list(self.activation_points),
        }


class MethodParams(BaseModel):
    """Parameters of a method; subclass it and describe every field."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """A compression method. Subclasses set ``name``, ``kind`` and ``Params``.

    The class docstring is the method's documentation (``compress methods NAME``).
    """

    name: ClassVar[str]
    kind: ClassVar[MethodKind]
    Params: ClassVar[type[BaseModel]] = MethodParams
    default_targets: ClassVar[list[str]] = ["Linear"]
    default_ignore: ClassVar[list[str]] = ["lm_head"]
    supported_modules: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    needs_data: ClassVar[tuple[str, ...]] = ()
    """Names of ``data:`` entries the method reads (e.g. ``("calibration",)``)."""
    writes_state: ClassVar[tuple[str, ...]] = ()
    """Keys of ``context.state`` the method writes for later stages (e.g. ``("allocate",)``)."""
    reads_state: ClassVar[tuple[str, ...]] = ()
    """Keys of ``context.state`` the method reads; ``compress recipe check`` refuses the stage
    when no earlier stage writes one of them."""
    keeps_zeros: ClassVar[bool] = False
    """The method leaves a zero weight zero (its grid holds 0 and it moves no weight onto a
    pruned one), so a layer an earlier stage pruned keeps its pattern. ``compress recipe check``
    refuses a stage without it on layers an earlier stage pruned, unless it prunes them itself."""
    offers: ClassVar[CandidateOffer | None] = None
    """What the method's candidates for search methods can be (``compress_layer_candidates``):
    the settings it understands, the cost units it prices. None: it offers none."""

    def __init__(self, params: MethodParams) -> None:
        self.params = params
        self.label: str = self.name
        """The stage's label in the recipe (its ``name:``, else the method's name); the host sets it
        when it builds the stage, so a later stage's check can find an earlier one by label."""

    def check_layer(self, name: str, module: nn.Module) -> None:
        """Raise :class:`compress.errors.UserError` if ``module`` cannot be compressed.

        Called at ``compress recipe check`` on a weightless (meta) copy of the model, so
        only shapes and types are known here.
        """

    def check_data(self, data: dict[str, DataSpec]) -> None:
        """Raise :class:`compress.errors.UserError` if the recipe's ``data:`` entries cannot
        serve this method (one it reads is missing, too few samples for a batch).

        Called at ``compress recipe check``, before any data is read. The default checks
        that every name in ``needs_data`` is present.
        """
        for name in self.needs_data:
            if name not in data:
                raise UserError(f"method {self.name!r} needs data: {name}: in the recipe")

    def check_previous_stages(self, previous: list[Method]) -> None:
        """Raise :class:`compress.errors.UserError` if this stage cannot follow ``previous``.

        Called at ``compress recipe check`` with the methods of the stages before this one,
        in order (e.g. a stage that reuses an earlier stage's grid checks it exists).
        """

    def check_stage(self, methods: dict[str, type[Method]], targets: dict[str, nn.Module], writer: Any) -> None:
        """Raise :class:`compress.errors.UserError` if the stage cannot run as planned, from what
        only the whole plan tells: the installed ``methods`` (by name), all ``targets`` together
        (weightless meta modules) and the output ``writer`` (None when nothing is written).

        Called at ``compress recipe check`` after the per-layer and format checks (a search
        checks its candidate providers and its budget here). The default does nothing.
        """

    def check_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor] | None, earlier: list[tuple[Method, list[str]]]
    ) -> None:
        """Raise :class:`compress.errors.UserError` if the stage cannot run as planned, from the
        shapes the model's forward pass gives (a cost per input, a budget): the weightless (meta)
        ``model``, one input on the meta device shaped as the data will be (one image as the
        model's image processor makes it; two tokens for a language model) and ``earlier``, the
        stages before this one with the module names each targets, in model order.

        Called at ``compress recipe check`` after :meth:`check_stage`, only for methods that
        override it. ``inputs`` is None when the check cannot know the shape without reading data
        (an image processor whose output size follows the image's) or the model's forward cannot
        run on the meta device. The default does nothing.
        """

    def produces(self) -> Produces:
        """What the compressed layers will hold; a writer that cannot store it is refused
        at ``compress recipe check``. The default: nothing a writer needs to know of."""
        return Produces()

    def reads_original_model(self) -> str | None:
        """The setting that makes this stage read the uncompressed model through
        ``context.reference_model()`` (e.g. ``"target: original"``), or None when it does not.
        ``run: mode: lazy``, which never loads the whole model, refuses such a stage at
        ``compress recipe check``. The default: None."""
        return None

    def around_stage(self, context: Context, run: StageRun) -> AbstractContextManager[None]:
        """A context manager the engine enters before the stage runs and leaves after it, also
        when it fails: check what only the loaded model can tell, hold and release caches.

        The default does nothing.
        """
        return nullcontext()

    def apply(self, context: Context, run: StageRun) -> None:
        """Run the stage of a method that is none of :class:`LayerMethod`, :class:`BlockMethod`
        or ``TrainingMethod`` (search, allocation); the engine runs those itself."""
        raise NotImplementedError(f"method {self.name!r} does not implement apply()")


class LayerMethod(Method):
    """A data-free method that compresses each targeted layer on its own."""

    kind: ClassVar[MethodKind] = "data-free"

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        """Compress ``module`` in place (it is on the compute device) and return what to report."""
        raise NotImplementedError


@dataclass
class BlockWork:
    """One block of a sequential calibration stage, on the compute device.

    A target outside the repeated blocks (``lm_head``, a classifier) comes after the blocks
    as a work of its own: ``block`` is the target itself, ``index`` counts on from the
    last block, ``inputs`` are what the model with its compressed blocks feeds it. One that
    the forward pass reaches before the blocks (a ViT's patch embedding) comes before them,
    ``index`` negative (counting back from -1), ``inputs`` what the model feeds it.
    """

    name: str
    """The block's qualified name (``model.layers.3``), or the target's outside the blocks."""
    index: int
    block: nn.Module
    targets: dict[str, nn.Module]
    """Targeted layers inside the block, by their qualified names."""
    inputs: list[tuple[tuple, dict]]
    """The block's positional and keyword arguments, one entry per calibration sample, on
    the host, as produced by the already-compressed earlier blocks."""
    device: torch.device
    original_inputs: list[tuple[tuple, dict]] | None = None
    """Only for a method with ``needs_original_inputs``: the block's arguments as the model
    as it was when the stage started (before this stage changed any block) produces them,
    one entry per calibration sample, on the host. None otherwise."""
    output_gradients: list[torch.Tensor] | None = None
    """Only for a method with ``needs_output_gradients``: per calibration sample, the
    gradient of the method's ``output_loss`` with respect to this block's output (hidden
    states), on the host, computed on the model as it was when the stage started. None
    otherwise, and for targets outside the blocks."""


class BlockMethod(Method):
    """A calibration method that compresses one transformer block at a time."""

    kind: ClassVar[MethodKind] = "calibration"
    needs_data: ClassVar[tuple[str, ...]] = ("calibration",)
    needs_original_inputs: ClassVar[bool] = False
    """Keep a second input stream, the uncompressed one, in ``BlockWork.original_inputs``
    (one more copy of the block inputs on the host, two while a block runs)."""
    needs_output_gradients: ClassVar[bool] = False
    """Fill ``BlockWork.output_gradients`` with the gradients of :meth:`output_loss`: one
    gradient pass over the calibration data before the first block (see
    ``compress.api.block_output_gradients``)."""

    def prefetches_blocks(self) -> bool:
        """Whether the sequential engine, on CUDA, copies the next block to the device while this
        method compresses the current one and writes each block back to the host while the next
        runs (``compress.devices.BlockMover``): the same results, one or two blocks more on the
        device. Off by default: a method that changes another block's host weights while it
        works must keep it off."""
        return False

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        """Compress the targeted layers of ``work.block`` in place; return per-layer reports."""
        raise NotImplementedError

    def output_loss(self, context: Context, output: Any, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """With ``needs_output_gradients``: the scalar loss of one calibration sample, from the
        model's ``output`` on ``batch`` (that sample as a batch of one, on the device); ``index``
        is the sample's position in ``context.data("calibration")``. E.g. cross-entropy with
        ``batch["labels"]``, or KL to the original model's outputs."""
        raise NotImplementedError(f"method {self.name!r} sets needs_output_gradients but has no output_loss()")
