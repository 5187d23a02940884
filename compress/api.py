"""The public plugin API: everything a plugin imports from compress, in one module.

A plugin imports this module and the ``compress.hookimpl`` marker, nothing else of
``compress`` (``tests/test_architecture.py`` holds the built-in plugins and the scaffold
to that). The names in ``__all__`` keep their meaning within one major version of
:data:`API_VERSION`; a plugin states the versions it works with in its entry-point module
(``compress_api = ">=2,<3"``) and the host refuses it, naming both versions, when its own
version is outside that range.

This module and the modules it imports are contract modules: they import nothing from the
engine, checkpoint IO or the CLI, so importing a plugin stays cheap. The one name that
needs checkpoint IO, :class:`DirectoryLoader` (for loaders that delegate to it), is
imported on first use.
"""

from typing import Any

from compress.activation_points import (
    ACTIVATION_SITES,
    ActivationPoint,
    PointQuantization,
    PointScheme,
    point_name,
    site_modules,
    uniform_range_params,
)
from compress.blocks import hidden_states, stack_inputs, with_hidden_states
from compress.checkpoint import LoadedModel, WriterCapabilities, WriterOptions
from compress.context import Context, LayerState, OutlierSplit, StageRecord, StageRun
from compress.cuda_graphs import GraphReplay
from compress.data import IGNORE_INDEX, JsonLinesSource, Sample, collate, model_inputs, records
from compress.devices import move, on_device, onloaded, settle
from compress.errors import UserError, did_you_mean
from compress.evaluate import (
    Metric,
    MetricInputs,
    MetricParams,
    ModelMetric,
    next_token_labels,
    next_token_log_probs,
)
from compress.gradients import (
    ChunkLoss,
    OutputLoss,
    after_block,
    after_module,
    block_output_gradients,
    chunks,
    gradients_after_block,
)
from compress.hessian import (
    Hessian,
    InputNorms,
    InverseFactor,
    collect_hessians,
    collect_input_norms,
    h_norms,
    input_rows,
    inverse_factor,
    relative_output_error,
)
from compress.method import BlockMethod, BlockWork, LayerMethod, Method, MethodKind, MethodParams, Produces
from compress.quant import QuantGrid, QuantScheme, check_group_width, compute_grid, weight_matrix
from compress.quant.activations import ActivationQuant, ActivationScheme, activation_qparams, input_quantizer
from compress.quant.params import QuantParams
from compress.recipe import DataSpec, ModelSpec, load_recipe
from compress.scoring import ClassifierKL, ReferenceKL, Scorer, reference_kl
from compress.search import (
    COST_UNITS,
    Budget,
    Candidate,
    CandidateOffer,
    CandidateRequest,
    LayerInputs,
    collect_candidates,
    grid_storage_bits,
    quantizer_price,
    quantizer_settings,
    weight_cost,
)
from compress.search_method import SearchMethod, SearchParams, SearchSpace
from compress.training.method import Batch, TrainingMethod, TrainParams
from compress.training.sharding import frozen_placed
from compress.training.slices import trainable_slice

API_VERSION = "2.2"
"""The version of this API: the major number changes when a name is removed or changes
meaning, the minor number when names are added."""

__all__ = [
    "ACTIVATION_SITES",
    "API_VERSION",
    "COST_UNITS",
    "IGNORE_INDEX",
    "ActivationPoint",
    "ActivationQuant",
    "ActivationScheme",
    "Batch",
    "BlockMethod",
    "BlockWork",
    "Budget",
    "Candidate",
    "CandidateOffer",
    "CandidateRequest",
    "ChunkLoss",
    "ClassifierKL",
    "Context",
    "DataSpec",
    "DirectoryLoader",  # noqa: F822 (module __getattr__, imported on first use)
    "GraphReplay",
    "Hessian",
    "InputNorms",
    "InverseFactor",
    "JsonLinesSource",
    "LayerInputs",
    "LayerMethod",
    "LayerState",
    "LoadedModel",
    "Method",
    "MethodKind",
    "MethodParams",
    "Metric",
    "MetricInputs",
    "MetricParams",
    "ModelMetric",
    "ModelSpec",
    "OutlierSplit",
    "OutputLoss",
    "PointQuantization",
    "PointScheme",
    "Produces",
    "QuantGrid",
    "QuantParams",
    "QuantScheme",
    "ReferenceKL",
    "Sample",
    "Scorer",
    "SearchMethod",
    "SearchParams",
    "SearchSpace",
    "StageRecord",
    "StageRun",
    "TrainParams",
    "TrainingMethod",
    "UserError",
    "WriterCapabilities",
    "WriterOptions",
    "activation_qparams",
    "after_block",
    "after_module",
    "block_output_gradients",
    "check_group_width",
    "chunks",
    "collate",
    "collect_candidates",
    "collect_hessians",
    "collect_input_norms",
    "compute_grid",
    "did_you_mean",
    "frozen_placed",
    "gradients_after_block",
    "grid_storage_bits",
    "h_norms",
    "hidden_states",
    "input_quantizer",
    "input_rows",
    "inverse_factor",
    "load_recipe",
    "model_inputs",
    "move",
    "next_token_labels",
    "next_token_log_probs",
    "on_device",
    "onloaded",
    "point_name",
    "quantizer_price",
    "quantizer_settings",
    "records",
    "reference_kl",
    "relative_output_error",
    "semi_structured_layers",  # noqa: F822 (module __getattr__, imported on first use)
    "settle",
    "site_modules",
    "stack_inputs",
    "to_semi_structured",  # noqa: F822 (module __getattr__, imported on first use)
    "trainable_slice",
    "uniform_range_params",
    "verify_n_m",  # noqa: F822 (module __getattr__, imported on first use)
    "weight_cost",
    "weight_matrix",
    "with_hidden_states",
]


def __getattr__(name: str) -> Any:
    if name == "DirectoryLoader":  # imports transformers: only for the loaders that ask for it
        from compress.checkpoint.loaders import DirectoryLoader

        return DirectoryLoader
    if name in ("semi_structured_layers", "to_semi_structured", "verify_n_m"):  # checkpoint IO: the 2:4 speed path
        from compress.checkpoint import sparse

        return getattr(sparse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
