"""Checkpoint loading and writing: the contracts loaders and writers plugins follow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from compress.context import Context
    from compress.method import Produces
    from compress.recipe import ModelSpec


@dataclass
class LoadedModel:
    """A model as a loader returns it, on the host, in eval mode."""

    model: nn.Module
    tokenizer: Any
    """Tokenizer (text models) or image processor (vision models); may be None."""
    config: PretrainedConfig
    task: str
    """``causal-lm``, ``encoder`` or ``image-classification``."""
    base_model: str
    """What the model card names as the base model: a hub id or a local name."""
    extra_files: list[Path] = field(default_factory=list)
    provenance: str | None = None
    """How the weights relate to ``base_model`` when they are not that checkpoint's own (the
    built-in SmolLM2 is its Q4_1 GGUF, dequantized); the report and model card say so."""


class Loader(Protocol):
    """Loads a recipe's ``model:``. Register instances with ``compress_register_loaders``."""

    name: str

    def claims(self, spec: ModelSpec) -> bool:
        """Whether this loader handles ``spec`` (checked in registration order)."""

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        """The model's config and task, without reading weights; raise UserError if unusable."""

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Read the weights."""

    # Optional: ``load_tokenizer(spec, config, task)`` returns what ``load`` returns as the
    # tokenizer, without reading weights (``config`` and ``task`` are ``load_config``'s);
    # ``compress recipe check`` then checks the data with it (token counts, chat templates).
    # Optional: ``weights_directory(spec)`` returns the local directory of the safetensors
    # shards ``load`` reads; ``run: mode: lazy`` needs it (:mod:`compress.checkpoint.lazy`).


UNKNOWN_MODEL = "not a built-in model name, a directory, a .gguf file or a Hub id (org/name)"


@dataclass(frozen=True)
class WriterCapabilities:
    """What an output format can express; recipes are checked against it up front."""

    weight_bits: frozenset[int] = frozenset(range(2, 17))
    """Integer grids the format stores as such; empty for formats with their own codebook."""
    granularities: frozenset[str] = frozenset({"tensor", "channel", "group"})
    symmetric_only: bool = False
    activation_quantization: bool = False
    activation_points: bool = False
    """Keeps activation points (``Context.points``: attention operands, low-bit layer inputs),
    at least as a list of what a runtime must quantize."""
    sparsity: bool = False
    sparsity_patterns: bool = True
    """With ``sparsity``: records an N:M pattern (compressed-tensors' ``sparsity_structure``) for
    sparse kernels to find, not only the zeros."""
    outliers: bool = False
    """Can store weights held apart from the main grid (kl_ptq's outliers)."""
    packed_weights: bool = False
    """Stores quantized weights as their integer codes, so a layer's storage is its grid's bits
    (a search's budget in bits or BitOps is met in the file only then)."""
    layer_types: frozenset[str] | None = None
    """Class names of the layers whose compressed weights the format stores (e.g. ``Linear``);
    None: any layer."""

    def refusal(self, produced: Produces) -> str | None:
        """Why this format cannot hold what a method produces, or None if it can."""
        for scheme in produced.schemes():
            if scheme.bits not in self.weight_bits:
                held = ", ".join(map(str, sorted(self.weight_bits))) or "none"
                return f"cannot store {scheme.bits}-bit weight grids (it stores: {held})"
            if scheme.granularity not in self.granularities:
                return (
                    f"cannot store per-{scheme.granularity} scales (it stores: {', '.join(sorted(self.granularities))})"
                )
            if self.symmetric_only and not scheme.symmetric:
                return "stores symmetric grids only (no zero points)"
        if produced.outliers and not self.outliers:
            return "cannot store outlier weights held apart from the grid"
        if produced.activation_bits is not None and not self.activation_quantization:
            return "cannot store activation quantization"
        if produced.activation_points and not self.activation_points:
            return (
                f"cannot store activation quantization at {', '.join(produced.activation_points)} "
                "(output format dense keeps it, listing the points a runtime must quantize)"
            )
        if produced.sparsity is not None and not self.sparsity:
            return f"cannot record {produced.sparsity} sparsity"
        if produced.sparsity not in (None, "unstructured") and not self.sparsity_patterns:
            return f"cannot record the {produced.sparsity} pattern sparse kernels need (it keeps only the zeros)"
        return None


class WriterOptions(BaseModel):
    """A writer's own ``output:`` keys; subclass it and describe every field."""

    model_config = ConfigDict(extra="forbid")


class Writer(Protocol):
    """Writes the compressed model. Register instances with ``compress_register_writers``."""

    name: str
    capabilities: WriterCapabilities
    Options: type[WriterOptions]
    requantizes: bool
    """True when the written weights differ from the in-memory model's (the format applies
    its own quantization, like bitsandbytes); evaluation then reads the checkpoint back,
    with the recipe's loader when it reads directories (else the first loader claiming one)."""

    def write(self, context: Context, directory: Path, options: WriterOptions) -> None:
        """Fill ``directory`` (an empty temporary directory) with weights, config and tokenizer.

        The host adds recipe.yaml, report.json and README.md and renames the directory
        into place once everything is written.
        """

    # Optional, for ``run: mode: lazy`` (:mod:`compress.lazy`), both or neither:
    # ``stored_tensors(context, prefix, module, options)`` returns the tensors the format
    # stores for the submodule named ``prefix``, by full name; ``write_metadata(context,
    # directory, options)`` writes everything beside the streamed shards (config, tokenizer).
