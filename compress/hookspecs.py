"""The plugin contract of compress.

Every hook is named ``compress_<what>``. A plugin is a module (or object) with functions
decorated by :data:`compress.hookimpl` whose names and argument names match the specs
below; pluggy lets an implementation take any subset of a spec's arguments, in any order.

Registration hooks receive a ``register`` callback and call it once per thing they
provide, in the style of llm's ``register_models``::

    from compress import hookimpl

    @hookimpl
    def compress_register_methods(register):
        register(MyMethod)

Lifecycle hooks are events: every implementation is called, return values are ignored
(progress bars, logging and the summary table are plugins built on them). An observer
that raises is reported as a broken plugin (one warning line) and not called again; the
run goes on and writes its output. To stop a run on purpose, raise
:class:`compress.errors.UserError`.

Plugins are found through the ``compress`` entry-point group; ``compress plugins`` lists
them with the hooks each implements, and the ones that failed to load. A plugin imports
the classes and helpers these hooks hand around from :mod:`compress.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    from torch import nn

    from compress.context import Context, StageRecord
    from compress.recipe import Stage
    from compress.search import CandidateRequest

hookspec = pluggy.HookspecMarker("compress")


# --- registration -------------------------------------------------------------------


@hookspec
def compress_register_methods(register: Callable[[type], None]) -> None:
    """Register compression methods.

    Called once, when the host first needs the method registry (``compress apply``,
    ``compress recipe check``, ``compress methods``).

    :param register: call ``register(method_class)`` for each method. The class
        subclasses :class:`compress.method.Method`: it has a unique ``name`` (the
        recipe's ``method:`` value), a ``kind`` (``data-free``, ``calibration``,
        ``training`` or ``search``), a pydantic ``Params`` model with
        ``extra="forbid"`` whose field descriptions document every parameter, and a
        docstring that ``compress methods NAME`` prints.

    Registering a second method under a name already taken is an error that names
    both plugins; a class that lacks ``kind`` or a pydantic ``Params``, or is not a
    ``Method`` subclass, is left out and its plugin reported as broken.
    """


@hookspec
def compress_register_loaders(register: Callable[[Any], None]) -> None:
    """Register checkpoint loaders.

    Called once, when a recipe's ``model:`` is first resolved.

    :param register: call ``register(loader)`` with an object that follows
        :class:`compress.checkpoint.Loader`: a ``name``, ``claims(spec)`` saying
        whether it handles a model spec (a built-in name, a directory, a ``.gguf``
        file, a hub id), ``load_config(spec)`` (cheap: used to validate a recipe
        before any weights are read) and ``load(spec)`` returning a
        :class:`compress.checkpoint.LoadedModel`.

    Loaders are asked in registration order; the first that claims a spec loads it.
    ``claims`` must not raise: an exception from it stops the command with one error
    naming the loader and its plugin.
    """


@hookspec
def compress_register_writers(register: Callable[[Any], None]) -> None:
    """Register checkpoint writers (output formats).

    Called once, when a recipe's ``output.format`` is validated or a run writes.

    :param register: call ``register(writer)`` with an object that follows
        :class:`compress.checkpoint.Writer`: a ``name`` (the recipe's
        ``output.format``), ``capabilities`` (what the format can express, so a recipe
        asking for something it cannot hold fails at ``compress recipe check``) and
        ``write(context, directory)`` that fills an empty temporary directory. The
        host makes the write atomic and adds recipe, report and model card.
    """


@hookspec
def compress_register_data_sources(register: Callable[[Any], None]) -> None:
    """Register data sources for calibration, training and evaluation data.

    Called once, when a recipe's ``data:`` section is validated.

    :param register: call ``register(source)`` with an object that follows
        :class:`compress.data.DataSource`: a ``name`` (the recipe's ``source:``),
        ``check(spec)`` raising :class:`compress.errors.UserError` for a bad spec (a
        missing file, an option the source does not support) and ``load(spec, tokenizer)``
        returning a list of samples (:data:`compress.data.Sample`: ``input_ids`` or
        ``pixel_values``, ``labels``, extras of the source's own), which every consumer
        batches with :func:`compress.data.collate`.
    """


@hookspec
def compress_register_metrics(register: Callable[[type], None]) -> None:
    """Register evaluation metrics (the recipe's ``evaluate:`` list, ``compress eval``).

    Called once, when metrics are first needed.

    :param register: call ``register(metric_class)``; the class follows
        :class:`compress.evaluate.Metric`: a ``name``, the model ``tasks`` it applies
        to, optionally ``Params`` (a :class:`compress.evaluate.MetricParams` subclass
        validating the ``evaluate:`` entry's other keys), and
        ``update(original, compressed, batch)`` / ``result()`` that accumulate over
        batches (:data:`compress.data.Batch`) of evaluation data run through the original
        and the compressed model; or, subclassing :class:`compress.evaluate.ModelMetric`,
        ``measure(original, compressed, inputs)`` that runs the models itself (generation,
        other data entries, other checkpoints). ``check(spec, data, config)`` refuses an
        entry at ``compress recipe check``.
    """


@hookspec
def compress_register_commands(cli: click.Group) -> None:
    """Add commands to the ``compress`` command line.

    Called once, when the CLI is built.

    :param cli: the root :class:`click.Group`; add commands with ``@cli.command()``.
    """


# --- candidates for search / allocation methods ---------------------------------


@hookspec
def compress_layer_candidates(
    context: Context, name: str, module: nn.Module, request: CandidateRequest
) -> list[Any] | None:
    """Offer compressed variants of one layer to a search or allocation method.

    Called by a search method (RCO, EvoPress, EQ-Net's search) for each layer it
    allocates, before it chooses one variant per layer under a budget; only on the plugins
    that register the methods in ``request.methods`` (on every plugin when it is None).

    :param context: the run's context (model, data, report).
    :param name: the layer's qualified module name, e.g. ``model.layers.3.mlp.up_proj``.
    :param module: the layer itself, with its current (original) weights.
    :param request: what the search wants: :class:`compress.search.CandidateRequest`
        with the methods it accepts, the settings to vary (bits, sparsity), the cost
        unit of its budget (``bits``, ``bitops`` or ``params``) and, when the search
        collected them, the layer's input statistics (``inputs.hessian``).
    :return: a list of :class:`compress.search.Candidate` (cost, error, the variant's
        weights, the state applying it records and, optionally, how it quantizes the
        layer's input), or ``None`` when the plugin has nothing for this layer. The results
        of the plugins asked are concatenated. A method
        that answers declares what its candidates can be as its class's ``offers``
        (:class:`compress.search.CandidateOffer`), which ``compress recipe check`` reads.
    """


# --- lifecycle events -----------------------------------------------------------


@hookspec
def compress_run_start(context: Context) -> None:
    """A ``compress apply`` run begins: the model is loaded, no stage has run.

    :param context: the run's context; ``context.recipe`` is the validated recipe.
    """


@hookspec
def compress_stage_start(context: Context, stage: Stage, index: int, total: int) -> None:
    """A stage is about to run.

    :param context: the run's context.
    :param stage: the validated stage (method name, targets, parameters).
    :param index: its 0-based position; ``total`` is the number of stages.
    """


@hookspec
def compress_block_done(context: Context, stage: Stage, block_name: str, block_index: int, num_blocks: int) -> None:
    """The sequential engine finished one block (a transformer layer) of a stage.

    :param context: the run's context.
    :param stage: the stage being run.
    :param block_name: the block's module name, e.g. ``model.layers.7``.
    :param block_index: 0-based; ``num_blocks`` blocks in all.
    """


@hookspec
def compress_stage_progress(
    context: Context, stage: Stage, step: int, total: int | None, logs: dict[str, float]
) -> None:
    """A training or search stage made progress (stages that do not run block by block).

    Called by the training loop every logging step and by search methods once per
    iteration.

    :param context: the run's context.
    :param stage: the stage being run.
    :param step: steps done so far (1-based); ``total`` is the number planned, or None.
    :param logs: the latest values to show, e.g. ``{"loss": 2.31, "lr": 1e-5}``. The
        training loop also reports held-out evaluation as ``{"eval_loss": ...}`` (keys
        starting with ``eval_``) and, once after ``--resume``, ``{"resumed_from_step": N}``
        with ``step`` = N.
    """


@hookspec
def compress_stage_end(context: Context, stage: Stage, record: StageRecord) -> None:
    """A stage finished.

    :param record: what the stage did: wall time, peak host and device memory, the
        layers it changed and its per-layer details; it is already in
        ``context.report``.
    """


@hookspec
def compress_phase_start(context: Context, phase: str) -> None:
    """A phase of a ``compress apply`` run begins, after ``compress_run_start``.

    :param context: the run's context.
    :param phase: ``stages`` (all stages; each also has its stage hooks), ``write`` (the
        writer fills the output's staging directory) or ``evaluation`` (the ``evaluate:``
        metrics, when there are any; after the write when the recipe has an output). The model's ``load`` is
        measured too but comes before any hook: its figures are in
        ``context.report.phases["load"]`` at ``compress_run_start``.
    """


@hookspec
def compress_phase_end(context: Context, phase: str, usage: dict[str, Any]) -> None:
    """A phase of a ``compress apply`` run finished. Not called for a phase that raised
    (``compress_run_failed`` is); an evaluation interrupted after the write ends normally.

    :param context: the run's context.
    :param phase: the phase, as :func:`compress_phase_start` names it.
    :param usage: what ``report.json`` records for it under ``phases``: ``seconds``,
        ``peak_host_bytes``, ``peak_device_bytes`` and, for an evaluation interrupted after
        the write, ``interrupted: True``.
    """


@hookspec
def compress_run_end(context: Context) -> None:
    """A run finished: all stages ran, evaluation is in the report, the output is written.

    :param context: the run's context; ``context.report`` holds everything
        ``report.json`` holds.
    """


@hookspec
def compress_run_failed(context: Context, error: BaseException) -> None:
    """A run stopped early: a stage or the write raised, or the user interrupted it.

    Called before the error reaches the command line, so observers can close progress
    bars and flush logs. No output directory was written.

    :param context: the run's context, with the report of the stages that finished.
    :param error: the exception, e.g. a :class:`compress.errors.UserError` naming the
        layer, or ``KeyboardInterrupt``.
    """
